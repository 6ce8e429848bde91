"""The errors a user sees, below every layer of zoo (no torch, no zoo import), so any module and any command-line
front can use them: the two exceptions a run raises, and one-line argument errors for every registered tool
(``zoo probe``, ``zoo export-hf``, ``zoo data`` ...: which key, where it came from, the closest valid ones).

``zoo fit``'s own parse errors (jsonargparse under LightningCLI) are explained by ``zoo.cli.errors``, which builds on
the helpers here.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Iterable


class UsageError(ValueError):
    """A run refused before it starts (impossible value, busy or occupied folder, mismatched resume): ``zoo fit``
    prints the one-line message and exits with status 2, without a traceback."""


class RunError(OSError):
    """A run that stopped on an outside condition (disk full): ``zoo fit`` prints the one line and exits 1."""


def closest(word: str, candidates: Iterable[str], n: int = 2) -> list[str]:
    """Up to ``n`` candidates closest to ``word`` (difflib ratio >= 0.6), best first."""
    return difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.6)


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files of a command line, in order."""
    files = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def _yaml_has(path: str, keys: list[str]) -> bool:
    import yaml

    try:
        node: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def origin(key: str, argv: list[str]) -> str:
    """Where ``key`` (dotted) was given: ``flag --key``, ``file.yaml`` or ``the configuration``."""
    flag = f"--{key}"
    if any(a == flag or a.startswith(flag + "=") for a in argv):
        return f"flag {flag}"
    parts = key.split(".")
    for path in reversed(config_files(argv)):  # a later file overrides an earlier one
        if _yaml_has(path, parts) or (len(parts) > 2 and _yaml_has(path, [parts[0], parts[-1]])):
            return f"file {path}"
    return "the configuration"


def _line(head: str, word: str, candidates: list[str], hint: str) -> str:
    """``head; did you mean x or y? see ...`` (or ``head; see ...`` with no close candidate)."""
    near = closest(word, candidates)
    return f"{head}; did you mean {' or '.join(near)}? {hint[0].upper()}{hint[1:]}" if near else f"{head}; {hint}"


_TYPE_NAMES = {"<class 'float'>": "a float", "<class 'int'>": "an integer", "<class 'bool'>": "true or false",
               "<class 'str'>": "a string"}


def explain_tool_error(tool: str, message: str, argv: list[str], keys: list[str]) -> str:
    """One line for a jsonargparse error of a registered tool (``zoo probe`` ...) whose valid keys are ``keys``."""
    hint = f"see zoo {tool} --help"
    flags = re.search(r"[Uu]nrecognized arguments: (\S+)", message)
    if flags:
        flag = flags.group(1).split("=", 1)[0]
        return _line(f"unknown key {flag.lstrip('-')} (from flag {flag})", flag.lstrip("-"), keys, hint)
    unknown = (re.search(r"[Kk]ey[s]? ['\"]?([\w.]+)['\"]? (?:is|are) not (?:accepted|expected)", message)
               or re.search(r"does not accept (?:option|key) '([^']+)'", message)
               or re.search(r"Option '([^']+)' is not accepted", message))
    if unknown:
        key = unknown.group(1)
        return _line(f"unknown key {key} (from {origin(key, argv)})", key.rpartition(".")[2], keys, hint)
    typed = re.search(r'[Kk]ey "([^"]+)":\s*Expected a (<class \'\w+\'>)\. Got value: (.*)', message)
    if typed:
        key, want, got = typed.group(1), typed.group(2), typed.group(3).strip()
        # the option as the user spells it (--max-bytes), not the parser's destination name (max_bytes)
        key = next((k for k in keys if k != key and k.replace("-", "_") == key), key)
        return f"{key} must be {_TYPE_NAMES.get(want, want)}, got {got!r} (from {origin(key, argv)}); {hint}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith("Given value")]
    return f"{' '.join(lines) or message.strip()}; {hint}"


def tool_parser(prog: str, description: str) -> Any:
    """A jsonargparse parser for a registered tool, configured like ``zoo fit``'s: abbreviations refused, errors
    raised (``parse_tool_args`` prints them as one line) instead of ~50 lines of usage."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, description=description, allow_abbrev=False, exit_on_error=False)


def parse_tool_args(parser: Any, argv: list[str], tool: str) -> Any:
    """``parser.parse_args(argv)``, or None after printing ``zoo <tool>: error: <one line>`` on stderr."""
    import argparse
    import sys

    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        keys = sorted({o.lstrip("-") for a in _all_actions(parser) for o in a.option_strings} |
                      {a.dest for a in _all_actions(parser) if not a.option_strings})
        print(f"zoo {tool}: error: {explain_tool_error(tool, str(err), argv, keys)}", file=sys.stderr)
        return None


def _all_actions(parser: Any) -> list[Any]:
    """Every action of ``parser`` and of its subcommand parsers."""
    actions = list(parser._actions)
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            actions += _all_actions(sub)
    return actions


def user_error_line(tool: str, err: Exception) -> str | None:
    """``zoo <tool>: error: <one line>`` for a user's mistake (bad value, unknown name, missing file, parse error),
    else None (a bug keeps its traceback)."""
    user_error = isinstance(err, (ValueError, KeyError, OSError)) or type(err).__module__.startswith(("jsonargparse",
                                                                                          "argparse"))
    if not user_error:
        return None
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"zoo {tool}: error: " + " ".join(part.strip() for part in str(message).splitlines() if part.strip())
