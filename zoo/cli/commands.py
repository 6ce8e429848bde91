"""The registry of `zoo` subcommands other than Lightning's fit / validate / test / predict.

A package adds a subcommand by declaring an entry point in the group ``byol_zoo.commands`` (``pyproject.toml``)::

    [project.entry-points."byol_zoo.commands"]
    probe = "zoo.eval.probe_cli:main"

The target is a ``main(argv: list[str]) -> int`` function. Why entry points rather than a CLI module above every
package: ``zoo`` stays the bottom layer (it never names ``byol`` or ``lm``, not even in a string), the table of
commands lives in the packaging metadata next to the console script, and another distribution can add a command
without editing ``zoo``. A command's one-line description is the first line of its ``main`` docstring, read from
the source with ``ast`` without importing the module, so ``zoo --help`` imports neither torch nor the command.

The table is read through ``zoo.plugins`` (installed metadata, overridden by a source checkout's own
``pyproject.toml``: the checkout wins, since it is the code that runs).

Nothing here imports torch or Lightning.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zoo.plugins import DISTRIBUTION, from_checkout, from_metadata  # noqa: F401 - DISTRIBUTION re-exported

GROUP = "byol_zoo.commands"
HELP_WIDTH = 80  # every help zoo prints fits this: zoo --help (zoo.cli) and the rendered Lightning help (help_cache)

# One-line descriptions of Lightning's subcommands: `zoo --help` prints them without importing Lightning, and each
# subcommand's own --help uses the same words (Lightning's `test` docstring is cut mid-sentence by its first line).
LIGHTNING_COMMANDS = {
    "fit": "Train the model: preflight checks, the output folder's run lock, then Lightning's fit.",
    "validate": "Run one evaluation epoch over the validation set.",
    "test": "Run one evaluation epoch over the test set (kept apart from fit so the test set is used only when "
            "you ask).",
    "predict": "Run inference on the predict set and return the predictions.",
}


@dataclass(frozen=True)
class Command:
    """One registered subcommand: its name and ``module:function`` target."""

    name: str
    target: str

    @property
    def module(self) -> str:
        """The module that holds the command's ``main``."""
        return self.target.partition(":")[0]

    @property
    def function(self) -> str:
        """The name of the command's entry function."""
        return self.target.partition(":")[2] or "main"

    def source(self) -> Path | None:
        """The ``.py`` file of the command's module, found without importing it or its parent packages (importing
        ``lm`` would pull in torch just to print ``zoo --help``)."""
        top, *rest = self.module.split(".")
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: located, not imported
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if not rest:
            return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
        for folder in spec.submodule_search_locations or ():
            base = Path(folder).joinpath(*rest)
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
        return None

    def available(self) -> bool:
        """Whether the command's module can be found (without importing it)."""
        return self.source() is not None

    def description(self) -> str:
        """First line of the entry function's docstring (else the module's), read from source without importing."""
        path = self.source()
        if path is None:
            return f"(unavailable: module {self.module} is not installed)"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = [next((ast.get_docstring(node) for node in tree.body if isinstance(node, ast.FunctionDef)
                      and node.name == self.function), None), ast.get_docstring(tree)]
        for doc in docs:
            first = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
            if first and not first.startswith("`"):  # a usage line (`zoo x ...`) says how, not what
                return first.rstrip(".") + "."
        return ""

    def load(self) -> Callable[[list[str]], int]:
        """Import the module and return its entry function."""
        return getattr(importlib.import_module(self.module), self.function)


def _from_metadata() -> dict[str, str]:
    return from_metadata(GROUP)


def _from_checkout() -> dict[str, str]:
    return from_checkout(GROUP)


def registered_commands() -> dict[str, Command]:
    """Every registered subcommand by name, sorted (installed metadata, overridden by the checkout's pyproject)."""
    table = {**_from_metadata(), **_from_checkout()}
    return {name: Command(name, target) for name, target in sorted(table.items())}
