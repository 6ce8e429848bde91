"""Helpers shared by the command-line fronts of lm: argv defaulting and subcommand parsing (no torch)."""
from __future__ import annotations

import sys
from typing import Any

from zoo.cli.errors import parse_tool_args


def argv_or_sys(argv: list[str] | None) -> list[str]:
    """The arguments given, or the process's own (``sys.argv[1:]``)."""
    return list(sys.argv[1:] if argv is None else argv)


def subcommand_args(parser: Any, argv: list[str], tool: str, dest: str) -> Any:
    """The chosen subcommand's arguments with its name at ``dest``, or None when parsing failed (already said)."""
    named = [a for a in argv if not a.startswith("-")][:1]
    if named and named[0] in (parser._subcommands_action.choices if parser._subcommands_action else {}):
        tool = f"{tool} {named[0]}"  # errors and the --help hint name the subcommand: zoo scaling fit
    parsed = parse_tool_args(parser, argv, tool)
    if parsed is None:
        return None
    args = parsed[parsed[dest]]
    args[dest] = parsed[dest]
    return args
