"""lm/'s layout (issue 28): subpackages in one order, no import cycle between any two lm modules, library modules never
import the command-line fronts, every subpackage packaged and every entry point resolvable. Read from the AST, so lazy
imports (inside functions) and import strings count too."""
from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "lm"
# subpackage -> rank: a module may import lm modules of its own subpackage or of a lower rank only
ORDER = {"parallel": 0, "modules": 1, "evals": 2, "scaling": 2, "cli": 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lm_imports(path: Path, known: set[str]) -> set[str]:
    """The lm modules this file imports: statements anywhere in it (module level or lazy) and ``"lm.x"`` strings."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from lm.scaling import sweep` names the module lm.scaling.sweep; `from lm.x import f` names lm.x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"(lm(?:\.\w+)+)(:\w+)?", node.value)
            names = [m.group(1)] if m else []
        for name in names:
            while name and name not in known:  # "lm.scaling.laws.fit_parametric" -> the module lm.scaling.laws
                name = name.rpartition(".")[0]
            # a string naming a public class ("lm.MultimodalLM", a checkpoint's "method" field) is data, not an import
            if name.startswith("lm") and not (name == "lm" and isinstance(node, ast.Constant)):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in LM.rglob("*.py")}
    known = set(files)
    return {name: _lm_imports(path, known) - {name} for name, path in files.items()}


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else None


def test_lm_is_subpackages_only():
    assert sorted(p.name for p in LM.glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in LM.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ORDER)
    for sub in ORDER:
        assert (LM / sub / "__init__.py").is_file(), sub


def test_no_import_cycle_between_lm_modules():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles in lm/:\n" + "\n".join(cycles)


def test_subpackages_import_only_their_own_or_lower_ones():
    bad = []
    for module, targets in _graph().items():
        sub = _subpackage(module)
        if sub is None:
            continue  # lm/__init__.py: the lazy names users import (lm.CausalLM)
        for target in targets:
            other = _subpackage(target)
            if other is None or (other != sub and ORDER[other] >= ORDER[sub]):
                bad.append(f"{module} imports {target}")
    assert not bad, "lm layering broken (parallel < modules < evals, scaling < cli):\n" + "\n".join(sorted(bad))


def test_cli_fronts_import_no_torch_at_module_level():
    for path in sorted((LM / "cli").glob("*.py")):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        top = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        heavy = [n for n in names if n.split(".")[0] in ("torch", "lightning", "numpy", "scipy")
                 or (n.startswith("lm.") and not n.startswith("lm.cli"))]
        assert not heavy, f"{path.relative_to(ROOT)} imports {heavy} at module level; import them inside main()"


def test_packaging_and_entry_points_reach_the_subpackages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    from setuptools import find_packages

    packages = set(find_packages(str(ROOT), include=include))
    assert {f"lm.{sub}" for sub in ORDER} <= packages, sorted(packages)
    for name, target in project["project"]["entry-points"]["byol_zoo.commands"].items():
        module, _, func = target.partition(":")
        if not module.startswith("lm."):
            continue
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, (name, target)
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), (name, target)


def test_the_public_lm_names_still_resolve():
    import lm

    for name in lm.__all__:
        assert getattr(lm, name).__name__ == name


def test_the_checker_sees_lazy_imports_import_strings_and_from_package_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('def f():\n    from lm.cli.plan import main\n    from lm.scaling import sweep\n'
                   '    return "lm.parallel.plan:run_plan", "lm.CausalLM"\n')
    known = set(_graph())
    assert _lm_imports(src, known) == {"lm.cli.plan", "lm.scaling.sweep", "lm.parallel.plan"}
