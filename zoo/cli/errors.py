"""One-line configuration errors: which key, where it came from, the closest valid keys, and where to look.

jsonargparse reports a misspelt key under a subclass as ~10 lines of union wording (``Does not validate against
any of the Union subtypes ... Expected a <class 'NoneType'>``) after ~50 lines of usage. ``explain_parse_error``
turns its message into one line such as::

    unknown key model.init_args.base_lrr (from flag --model.init_args.base_lrr); did you mean base_lr? See zoo fit --help

Nothing here imports torch or Lightning; class signatures are read only for classes jsonargparse already imported.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Iterable

from zoo.train.errors import UsageError


class ConfigError(UsageError):
    """A configuration key or value the parser refused; the message is one line."""


TOP_LEVEL_KEYS = ("trainer", "model", "data", "ckpt_path", "seed_everything", "overwrite", "weights_only", "config",
                  "print_config", "optimizer", "lr_scheduler")


def closest(word: str, candidates: Iterable[str], n: int = 2) -> list[str]:
    """Up to ``n`` candidates closest to ``word`` (difflib ratio >= 0.6), best first."""
    return difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.6)


def class_parameters(class_path: str) -> list[str]:
    """Constructor parameter names of ``module.Class`` (empty when it cannot be imported), with those of the base
    classes a ``**kwargs`` passes on to (as jsonargparse accepts them: a method's ``**kwargs`` reach its base)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            break
        names += [p for p in params if p != "self" and p not in names and params[p].kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return names


def group_parameters(group: str) -> list[str]:
    """Keys accepted under a top-level group of ``zoo fit`` whose class is fixed (``trainer``)."""
    if group == "trainer":
        return class_parameters("lightning.pytorch.Trainer")
    return []


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


def _subcommand(argv: list[str]) -> str:
    return next((a for a in argv if a in ("fit", "validate", "test", "predict")), "fit")


def _help_hint(argv: list[str], group: str | None = None, class_path: str | None = None) -> str:
    cmd = _subcommand(argv)
    if group in ("model", "data") and class_path:
        return f"see zoo {cmd} --{group}.help {class_path}"
    return f"see zoo {cmd} --help"


def _line(head: str, word: str, candidates: list[str], hint: str) -> str:
    """``head; did you mean x or y? see ...`` (or ``head; see ...`` with no close candidate)."""
    near = closest(word, candidates)
    return f"{head}; did you mean {' or '.join(near)}? {hint[0].upper()}{hint[1:]}" if near else f"{head}; {hint}"


_TYPE_NAMES = {"<class 'float'>": "a float", "<class 'int'>": "an integer", "<class 'bool'>": "true or false",
               "<class 'str'>": "a string"}


def explain_parse_error(message: str, argv: list[str]) -> str:
    """One line for jsonargparse's error ``message`` about ``argv`` (the command line after ``zoo``)."""
    group = (re.search(r'Parser key "([^"]+)"', message) or re.search(r"Group '([^']+)'", message))
    group_name = group.group(1) if group else None
    class_path = re.search(r"class_path '([^']+)'", message)
    cls = class_path.group(1) if class_path else None
    unknown = (re.search(r"Option '([^']+)' is not accepted", message)
               or re.search(r"Group '[^']+' does not accept option '([^']+)'", message))
    if unknown and group_name:
        leaf = unknown.group(1)
        if cls:
            key, candidates = f"{group_name}.init_args.{leaf}", class_parameters(cls)
        else:
            key, candidates = f"{group_name}.{leaf}", group_parameters(group_name)
        return _line(f"unknown key {key} (from {origin(key, argv)})", leaf, candidates,
                     _help_hint(argv, group_name, cls))
    dotted = re.search(r"does not accept option '([^']+)'", message)
    if dotted:  # a key under a group of fixed class given in a config file, e.g. trainer.max_stepz
        key = dotted.group(1)
        head, _, leaf = key.rpartition(".")
        candidates = group_parameters(head) if head else list(TOP_LEVEL_KEYS)
        return _line(f"unknown key {key} (from {origin(key, argv)})", leaf or key, candidates, _help_hint(argv))
    flags = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if flags:
        bad = flags.group(1).split()[0]
        key = bad.lstrip("-").split("=", 1)[0]
        first, _, rest = key.partition(".")
        head, _, leaf = key.rpartition(".")
        if first not in TOP_LEVEL_KEYS:  # the group itself is misspelt: --modell.x
            word, candidates = first, list(TOP_LEVEL_KEYS)
        else:
            word, candidates = leaf, group_parameters(head)
        return _line(f"unknown key {key} (from flag {bad.split('=', 1)[0]})", word, candidates, _help_hint(argv))
    typed = (re.search(r'Parser key "([^"]+)":\s*Expected a (<class \'\w+\'>)\. Got value: (.*)', message)
             # an optional value (``float | None``: null keeps a default) reports both subtypes; name the real one
             or re.search(r'Parser key "([^"]+)":\s*Does not validate against any of the Union subtypes\s*'
                          r'Subtypes: \[(<class \'\w+\'>), <class \'NoneType\'>\].*?Given value: ([^\n]*)', message,
                          flags=re.S))
    if typed:
        leaf, want, got = typed.group(1), typed.group(2), typed.group(3).strip()
        key = f"{group_name}.init_args.{leaf}" if class_path and group_name else leaf
        return (f"{key} must be {_TYPE_NAMES.get(want, want)}, got {got!r} (from {origin(key, argv)}); "
                f"{_help_hint(argv, group_name, cls)}")
    required = re.search(r"the following arguments are required: (?:\w+\.)?(model|data)\b", message)
    if required:  # `zoo fit` alone, or a config without a model / data section
        what = {"model": "a LightningModule", "data": "a LightningDataModule"}[required.group(1)]
        return (f"no {required.group(1)} given: pass a config that names one (--config configs/byol/digits.yaml) "
                f"or --{required.group(1)} CLASS_PATH ({what}); {_help_hint(argv)}")
    missing = re.search(r'Parser key "config": File does not exist: (.*)', message)
    if missing:
        return f"--config {missing.group(1).strip()}: no such file; {_help_hint(argv)}"
    # anything else: the last meaningful line of jsonargparse's message, still on one line
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(
        ("Given value", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Does not validate"))]
    return f"{' '.join(lines) or message.strip()}; {_help_hint(argv)}"


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
