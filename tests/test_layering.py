"""The package dependency rules of ARCHITECTURE.md, checked on every import statement (module level or inside a
function) and every import string, so a lazy import cannot quietly break them."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("zoo", "byol", "simsiam", "barlowtwins", "lm", "augment")
# package -> packages of ours it may import (itself always allowed)
ALLOWED = {
    "augment": set(),
    "zoo": {"augment"},  # intended: the image-pretraining base and the image data use the one augmentation op set
    "byol": {"zoo", "augment"},
    "simsiam": {"zoo", "augment"},  # a sibling of byol: never imports it
    "barlowtwins": {"zoo", "augment"},  # a method like byol and simsiam: imports neither
    "lm": {"zoo"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every (line, top-level package) this file imports, statically or through an import string."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "pkg.module" / "pkg.module:function" strings handed to importlib or a registry
            m = re.fullmatch(r"(\w+)(\.\w+)+(:\w+)?", node.value)
            if m and m.group(1) in OURS:
                found.append((node.lineno, m.group(1)))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_layering_allows(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in _imports(path):
            if target in OURS and target != package and target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "layering broken (see ARCHITECTURE.md):\n" + "\n".join(bad)


def test_the_checker_sees_lazy_imports_and_import_strings(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('def f():\n    import byol.module\n    return "lm.evals:main"\n')
    assert _imports(src) == [(2, "byol"), (3, "lm")]
