"""The dependency rules of ARCHITECTURE.md, checked on every import statement (module level, inside a function or
under ``TYPE_CHECKING``) and every import string, so a lazy import cannot quietly break them:

1. between packages: ``augment`` imports nothing of ours, ``zoo`` only ``augment``, a method package only ``zoo`` and
   ``augment`` (never another method), ``lm`` only ``zoo``;
2. inside ``zoo``, the layer order (lowest first) errors and files < models < weights < data < train < eval < cli: a
   module imports only its own layer or lower ones;
3. no import cycle between any two modules of the project;
4. library modules never import a command-line front; the fronts import the library.

The packages are read from the repository (every top-level folder with an ``__init__.py``), so a new method package
is checked without editing this file."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "bench", "tools", "configs"}  # folders of the checkout that are not import packages we ship


def packages(root: Path = ROOT) -> tuple[str, ...]:
    """Every top-level import package of the checkout: a folder holding ``__init__.py`` (tests and tools aside)."""
    return tuple(sorted(p.parent.name for p in root.glob("*/__init__.py") if p.parent.name not in NOT_SHIPPED))


OURS = packages()
# package -> packages of ours it may import (itself always allowed). A package missing here is a method package:
# it may import zoo and augment, never another method.
ALLOWED = {
    "augment": set(),
    "zoo": {"augment"},  # intended: the image-pretraining base and the image data use the one augmentation op set
    "lm": {"zoo"},
}
METHOD_ALLOWED = {"zoo", "augment"}

# zoo's layers, lowest first. ``zoo.<module>`` (errors.py, files.py, progress.py) is layer 0; ``zoo.<sub>.*`` has its
# subpackage's layer. The package face ``zoo/__init__.py`` (zoo.create, zoo.load_backbone, ...) sits above every
# layer: it re-exports lazily, and as nothing in zoo may import it (it is above them all), it never closes a cycle.
ZOO_LAYERS = ("models", "weights", "data", "train", "eval", "cli")
ZOO_FACE = len(ZOO_LAYERS) + 1


def allowed(package: str) -> set[str]:
    """The packages of ours that ``package`` may import besides itself."""
    return ALLOWED.get(package, METHOD_ALLOWED)


# ---------------------------------------------------------------------------------------------------------- the graph
def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a source file (``pkg/sub/__init__.py`` -> ``pkg.sub``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT, pkgs: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Module name -> source file for every module of our packages."""
    found = {}
    for pkg in pkgs if pkgs is not None else packages(root):
        for path in sorted((root / pkg).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _raw_imports(path: Path, name: str) -> list[tuple[int, str, list[str]]]:
    """Every (line, dotted target, imported names) of a file: import statements anywhere (relative ones resolved) and
    ``"pkg.module"`` / ``"pkg.module:attr"`` strings handed to importlib, entry points or ``class_path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"(\w+(?:\.\w+)+)(?::\w+(?:\.\w+)*)?", node.value)
            if m:
                found.append((node.lineno, m.group(1), []))
    return found


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``target`` names (``pkg.mod.Class`` -> ``pkg.mod``), or None when not ours."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports(path: Path, known: dict[str, Path], root: Path = ROOT) -> list[tuple[int, str]]:
    """Every (line, module of ours) that the file at ``path`` imports. ``from pkg import sub`` counts as importing the
    submodule ``pkg.sub`` when it is one, else as importing ``pkg`` itself."""
    name = module_name(path, root)
    ours = {m.split(".")[0] for m in known}
    found = []
    for line, target, names in _raw_imports(path, name):
        if target.split(".")[0] not in ours:
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
        if subs and len(subs) == len(names):
            found += [(line, s) for s in subs]
            continue
        if subs:  # from pkg import sub, attr: both the submodule and the package itself
            found += [(line, s) for s in subs]
        resolved = _resolve(target, known)
        if resolved is not None and resolved != name:
            found.append((line, resolved))
    return found


def graph(root: Path = ROOT, pkgs: tuple[str, ...] | None = None) -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: first line}."""
    known = modules(root, pkgs)
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        out = edges.setdefault(name, {})
        for line, target in imports(path, known, root):
            out.setdefault(target, line)
    return edges


def circles(edges: dict[str, dict[str, int]]) -> list[set[str]]:
    """Every strongly connected group of more than one module (or a module importing itself): the modules that
    import each other, directly or around a circle. Tarjan's algorithm, iterative (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(group)
    return groups


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle path (``a -> b -> ... -> a``) through every circle of ``circles``."""
    return [_cycle_through(group, edges) for group in circles(edges)]


def _cycle_through(group: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle inside one strongly connected group, starting at its first module by name."""
    start = min(group)
    previous = {start: None}
    frontier = [start]
    while frontier:  # breadth first from start back to start, staying inside the group
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return list(reversed(path)) + [start]
                if child in group and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def describe(cycle: list[str], edges: dict[str, dict[str, int]], known: dict[str, Path], root: Path = ROOT) -> str:
    """``a (a.py:3) -> b (b.py:9) -> a``: each step with the line that imports the next module."""
    steps = [f"{a} ({known[a].relative_to(root)}:{edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


# ----------------------------------------------------------------------------------------------------------- layers
def zoo_layer(module: str, known: dict[str, Path]) -> int:
    """The layer of a module of zoo: 0 for a module directly in zoo (errors.py, files.py, progress.py), then
    ZOO_LAYERS for a subpackage and everything in it; the face ``zoo`` above all. A subpackage missing from ZOO_LAYERS
    fails the check: its place in the order has to be decided, not assumed."""
    parts = module.split(".")
    if len(parts) == 1:
        return ZOO_FACE
    if parts[1] in ZOO_LAYERS:
        return ZOO_LAYERS.index(parts[1]) + 1
    if len(parts) == 2 and known[module].name != "__init__.py":
        return 0
    raise AssertionError(f"zoo/{parts[1]}/ has no place in the layer order: add it to ZOO_LAYERS and ARCHITECTURE.md")


def layer_name(level: int) -> str:
    """A layer's name for messages."""
    return "errors/files" if level == 0 else "the zoo face" if level == ZOO_FACE else ZOO_LAYERS[level - 1]


def upward_imports(edges: dict[str, dict[str, int]], known: dict[str, Path], root: Path = ROOT) -> list[str]:
    """Every import inside zoo from a layer to a higher one."""
    bad = []
    for src, targets in sorted(edges.items()):
        if src.split(".")[0] != "zoo":
            continue
        for dst, line in sorted(targets.items()):
            if dst.split(".")[0] == "zoo" and zoo_layer(dst, known) > zoo_layer(src, known):
                bad.append(f"{known[src].relative_to(root)}:{line} ({layer_name(zoo_layer(src, known))}) imports "
                           f"{dst} ({layer_name(zoo_layer(dst, known))})")
    return bad


# ----------------------------------------------------------------------------------------------------------- fronts
def entry_point_modules(root: Path = ROOT) -> set[str]:
    """Modules that pyproject registers as commands: ``[project.scripts]`` and ``byol_zoo.commands``."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    targets = list(project.get("scripts", {}).values())
    targets += list(project.get("entry-points", {}).get("byol_zoo.commands", {}).values())
    return {t.split(":")[0].strip() for t in targets}


def is_front(module: str, entry_points: set[str]) -> bool:
    """A command-line front: a module registered as a command in pyproject (``zoo.eval.probe_cli``, ``lm.cli``,
    ``zoo.weights.export``), anything in or under a package named ``cli`` (``zoo/cli/**``), a module named ``cli`` or
    ``*_cli`` (a tool's parser, ``zoo/data/pack_cli.py``), or a ``__main__``."""
    parts = module.split(".")
    return (module in entry_points or "cli" in parts or parts[-1].endswith("_cli") or parts[-1] == "__main__")


def front_imports(edges: dict[str, dict[str, int]], known: dict[str, Path], root: Path = ROOT) -> list[str]:
    """Every import of a front by a library module."""
    entry_points = entry_point_modules(root)
    bad = []
    for src, targets in sorted(edges.items()):
        if is_front(src, entry_points):
            continue
        for dst, line in sorted(targets.items()):
            if is_front(dst, entry_points):
                bad.append(f"{known[src].relative_to(root)}:{line} (library) imports the front {dst}")
    return bad


# ------------------------------------------------------------------------------------------------------------ tests
EDGES = graph()
KNOWN = modules()


@pytest.mark.parametrize("package", OURS)
def test_package_imports_only_what_the_layering_allows(package):
    bad = []
    for src, targets in sorted(EDGES.items()):
        if src.split(".")[0] != package:
            continue
        for dst, line in sorted(targets.items()):
            top = dst.split(".")[0]
            if top != package and top not in allowed(package):
                bad.append(f"{KNOWN[src].relative_to(ROOT)}:{line} imports {top}")
    # Strings that name a package of ours whose module is not (yet) in the checkout still count.
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target, _ in _raw_imports(path, module_name(path)):
            top = target.split(".")[0]
            if (top in OURS and top != package and top not in allowed(package)
                    and _resolve(target, KNOWN) is None):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not bad, "layering broken (see ARCHITECTURE.md):\n" + "\n".join(bad)


def test_zoo_subpackages_import_only_lower_layers():
    bad = upward_imports(EDGES, KNOWN)
    assert not bad, ("zoo's layer order is errors/files < " + " < ".join(ZOO_LAYERS) + " (ARCHITECTURE.md); these "
                     "imports go up (move the code down, or let the higher layer pass it in):\n" + "\n".join(bad))


def test_no_import_cycle_between_modules():
    found = circles(EDGES)
    report = []
    for group in found:
        cycle = _cycle_through(group, EDGES)
        report.append(describe(cycle, EDGES, KNOWN))
        if len(group) > len(cycle) - 1:
            report.append(f"    (the circle holds {len(group)} modules: {', '.join(sorted(group))})")
    assert not found, (f"{len(found)} import circle(s) (every import counts: lazy ones and import strings too); "
                       "move the shared part into a module both import, or pass it in:\n" + "\n".join(report))


def test_library_modules_never_import_a_command_line_front():
    bad = front_imports(EDGES, KNOWN)
    assert not bad, "a front imports the library, never the reverse:\n" + "\n".join(bad)


def test_every_package_is_shipped():
    # A new method package that pyproject's package list misses would import here and not once installed.
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = [p for p in OURS if not any(re.fullmatch(pat.replace("*", ".*"), p) for pat in include)]
    assert not missing, f"pyproject [tool.setuptools.packages.find] include misses {missing}"


# ------------------------------------------------------------------------------------------------ the checker itself
def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checker_sees_lazy_imports_and_import_strings(tmp_path):
    _plant(tmp_path, {"byol/__init__.py": "", "byol/module.py": "", "lm/__init__.py": "", "lm/evals.py": "",
                      "m/__init__.py": "", "m/x.py": 'def f():\n    import byol.module\n    return "lm.evals:main"\n'})
    known = modules(tmp_path)
    assert imports(tmp_path / "m" / "x.py", known, tmp_path) == [(2, "byol.module"), (3, "lm.evals")]


def test_the_checker_resolves_relative_and_from_imports(tmp_path):
    _plant(tmp_path, {"p/__init__.py": "X = 1\n", "p/a.py": "", "p/sub/__init__.py": "",
                      "p/sub/b.py": "from .. import a\nfrom ..a import thing\nfrom . import c\nfrom p import X, a\n",
                      "p/sub/c.py": ""})
    known = modules(tmp_path)
    assert imports(tmp_path / "p" / "sub" / "b.py", known, tmp_path) == [
        (1, "p.a"), (2, "p.a"), (3, "p.sub.c"), (4, "p.a"), (4, "p")]


def test_the_checker_finds_a_planted_cycle_through_a_lazy_import(tmp_path):
    _plant(tmp_path, {"p/__init__.py": "", "p/a.py": "import p.b\n", "p/b.py": "from p import c\n",
                      "p/c.py": "def f():\n    from p.a import g\n", "p/d.py": "import p.a\n"})
    edges = graph(tmp_path, ("p",))
    found = cycles(edges)
    assert found == [["p.a", "p.b", "p.c", "p.a"]]
    assert describe(found[0], edges, modules(tmp_path, ("p",)), tmp_path) == (
        f"p.a ({Path('p/a.py')}:1) -> p.b ({Path('p/b.py')}:1) -> p.c ({Path('p/c.py')}:2) -> p.a")
    assert cycles(graph(tmp_path, ("p",)) | {"p.c": {}}) == []


def test_the_checker_finds_a_planted_upward_import_and_front_import(tmp_path):
    _plant(tmp_path, {"zoo/__init__.py": "", "zoo/errors.py": "", "zoo/data/__init__.py": "",
                      "zoo/data/loaders.py": "def f():\n    from zoo.train.errors import UsageError\n",
                      "zoo/data/pack_cli.py": "from zoo.data import loaders\n",
                      "zoo/data/pack.py": "X = 'zoo.data.pack_cli:main'\n",
                      "zoo/train/__init__.py": "", "zoo/train/errors.py": "from zoo.errors import UsageError\n",
                      "zoo/models/__init__.py": "", "zoo/models/m.py": "import zoo\n",
                      "zoo/weights/__init__.py": "", "zoo/weights/w.py": "from zoo.models import m\n",
                      "pyproject.toml": "[project]\nname = 'x'\n"})
    known = modules(tmp_path, ("zoo",))
    edges = graph(tmp_path, ("zoo",))
    assert upward_imports(edges, known, tmp_path) == [
        f"{Path('zoo/data/loaders.py')}:2 (data) imports zoo.train.errors (train)",
        f"{Path('zoo/models/m.py')}:1 (models) imports zoo (the zoo face)"]
    assert front_imports(edges, known, tmp_path) == [
        f"{Path('zoo/data/pack.py')}:1 (library) imports the front zoo.data.pack_cli"]
    _plant(tmp_path, {"zoo/newsub/__init__.py": "", "zoo/newsub/n.py": "from zoo.errors import UsageError\n"})
    with pytest.raises(AssertionError, match="zoo/newsub/ has no place in the layer order"):
        upward_imports(graph(tmp_path, ("zoo",)), modules(tmp_path, ("zoo",)), tmp_path)


def test_fronts_are_read_from_pyproject():
    entry_points = entry_point_modules()
    assert "zoo.cli" in entry_points and "zoo.eval.probe_cli" in entry_points
    assert is_front("zoo.cli.errors", entry_points) and is_front("zoo.data.pack_cli", entry_points)
    assert not is_front("zoo.data.pack", entry_points) and not is_front("zoo.models.registry", entry_points)
    assert not is_front("zoo.models.clip", entry_points)  # a name holding "cli" is not a front
    assert is_front("lm.cli.plan", set()) and is_front("zoo.cli.__main__", set())


METHOD_NAMES = re.compile(r"online_|target_")  # a method's own module / metric names (BYOL's online and target)


def method_name_literals(root: Path = ROOT) -> list[str]:
    """``path:line`` of every line of ``zoo/**.py`` (code, strings or comments) naming a method's modules."""
    return [f"{p.relative_to(root)}:{i}" for p in sorted((root / "zoo").rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if METHOD_NAMES.search(line)]


def test_zoo_never_names_a_methods_modules():
    """The shared base speaks of "the encoder" and "the classifier"; the method chooses the names (``encoder_attrs``,
    ``classifier_attr``, ``metric_prefix``), so ``online_`` / ``target_`` appear in the method packages only."""
    assert method_name_literals() == []


def test_the_name_check_finds_a_planted_literal(tmp_path):
    _plant(tmp_path, {"zoo/__init__.py": "", "zoo/train/a.py": "x = 1\n# the target_encoder\n",
                      "zoo/b.py": "log('val/online_top1')\n", "zoo/c.py": "target = online = 1\n"})
    assert method_name_literals(tmp_path) == [f"{Path('zoo/b.py')}:1", f"{Path('zoo/train/a.py')}:2"]
