"""One-line configuration errors: which key, where it came from, the closest valid keys, and where to look.

jsonargparse reports a misspelt key under a subclass as ~10 lines of union wording (``Does not validate against
any of the Union subtypes ... Expected a <class 'NoneType'>``) after ~50 lines of usage. ``explain_parse_error``
turns its message into one line such as::

    unknown key model.init_args.base_lrr (from flag --model.init_args.base_lrr); did you mean base_lr? See zoo fit --help

Nothing here imports torch or Lightning; class signatures are read only for classes jsonargparse already imported.
The registered tools' one-line errors (``tool_parser``, ``parse_tool_args``, ``user_error_line``) live in
``zoo.errors``, below every layer, so a tool's front in zoo/data, zoo/weights or zoo/eval needs nothing from zoo/cli.
"""
from __future__ import annotations

import importlib
import inspect
import re

from zoo.errors import (_TYPE_NAMES, UsageError, _dash_value, _line, _must_be, closest, config_files, explain_tool_error,  # noqa: F401
                        origin, parse_tool_args, tool_parser, user_error_line)  # (re-exported: the tools' helpers)


class ConfigError(UsageError):
    """A configuration key or value the parser refused; the message is one line."""


TOP_LEVEL_KEYS = ("trainer", "model", "data", "ckpt_path", "seed_everything", "overwrite", "weights_only", "config",
                  "print_config", "optimizer", "lr_scheduler")


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


def _subcommand(argv: list[str]) -> str:
    return next((a for a in argv if a in ("fit", "validate", "test", "predict")), "fit")


def _help_hint(argv: list[str], group: str | None = None, class_path: str | None = None) -> str:
    cmd = _subcommand(argv)
    if group in ("model", "data") and class_path:
        return f"see zoo {cmd} --{group}.help {class_path}"
    return f"see zoo {cmd} --help"


def explain_parse_error(message: str, argv: list[str]) -> str:
    """One line for jsonargparse's error ``message`` about ``argv`` (the command line after ``zoo``)."""
    dash = _dash_value(message, argv)
    if dash:
        return f"{dash}; {_help_hint(argv)}"
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
        return (f"{key} must be {_must_be(want, got)}, got {got!r} (from {origin(key, argv)}); "
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
