"""`zoo`: Lightning's fit / validate / test / predict plus the subcommands the packages register.

- fit / validate / test / predict: LightningCLI over ``zoo.train.trainer.ZooTrainer`` (``zoo.cli.lightning``,
  imported only when one of them runs).
- every other subcommand (probe, export, export-hf, eval, scaling, plan, ...) is an entry point in the group
  ``byol_zoo.commands`` declared by the package that owns it (``zoo.cli.commands`` says why), so ``zoo`` never
  imports ``byol`` or ``lm``, not even by a string.

``zoo --help`` is written here from those tables without importing torch or Lightning, so it returns at once; the
Lightning subcommands' own help is cached after its first rendering (``zoo.cli.help_cache``).
"""
from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Iterator

from zoo.cli.commands import HELP_WIDTH, LIGHTNING_COMMANDS, Command, registered_commands
from zoo.train.quiet import QUIET_LOG_PREFIXES, QUIET_WARNINGS, _DropChatter, quiet_lightning  # noqa: F401


def main_help(commands: dict[str, Command] | None = None) -> str:
    """The text of ``zoo --help``: every subcommand in the usage line, one description each, 80 columns."""
    commands = registered_commands() if commands is None else commands
    names = [*LIGHTNING_COMMANDS, *commands]
    # wrapped after a comma, never inside a name (the spaces only give textwrap its break points)
    usage = textwrap.fill("usage: zoo [-h] {" + ", ".join(names) + "} ...", HELP_WIDTH, subsequent_indent=" " * 11,
                          break_on_hyphens=False).replace(", ", ",")
    width = max(len(n) for n in names) + 4
    rows = [*LIGHTNING_COMMANDS.items(), *((name, cmd.description()) for name, cmd in commands.items())]
    body = "\n".join(textwrap.fill(text, HELP_WIDTH, initial_indent=f"  {name:<{width - 2}}",
                                   subsequent_indent=" " * width) for name, text in rows)
    about = textwrap.fill("byol-zoo: self-supervised pretraining, a zoo of vision and language models, their "
                          "evaluation and export.", HELP_WIDTH)
    return (f"{usage}\n\n{about}\n\nsubcommands (zoo <subcommand> --help shows its options):\n{body}\n\n"
            "options:\n  -h, --help     show this help message and exit\n"
            "  -V, --version  print byol-zoo, Python, torch (with CUDA), Lightning versions\n")


# Tools whose weight file is checked before dispatch: the flag naming it (None: the first positional argument).
WEIGHT_FILE_ARGS = {"probe": "--backbone", "export": None}
_WEIGHT_KINDS = "a weight file (.ckpt, .safetensors, .pth or official .pkl)"


def _weight_file_arg(tool: str, args: list[str]) -> str | None:
    flag = WEIGHT_FILE_ARGS[tool]
    i = 0
    while i < len(args):
        a = args[i]
        if flag is not None:
            if a == flag:
                return args[i + 1] if i + 1 < len(args) else None
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        elif a == "--":
            return args[i + 1] if i + 1 < len(args) else None
        elif a.startswith("-"):
            i += 1 if "=" in a or a in ("-h", "--help") else 2  # every other option of `zoo export` takes a value
            continue
        else:
            return a
        i += 1
    return None


def check_weight_file(tool: str, args: list[str]) -> str | None:
    """One line saying why the weight file given to ``zoo probe`` / ``zoo export`` cannot be read, else None."""
    src = _weight_file_arg(tool, args) if tool in WEIGHT_FILE_ARGS else None
    if src is None or src.startswith("random:"):
        return None  # argparse reports a missing argument; random:<arch> needs no file
    path = Path(src).expanduser()
    expected = _WEIGHT_KINDS + (" or random:<arch>" if tool == "probe" else "")
    if path.is_dir():
        found = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda c: (c.name == "last.ckpt", c.stat().st_mtime))
        hint = (f"; it looks like a run folder: pass {str(found[-1])!r}" if found
                else "; pass the checkpoint file inside it")
        return f"{src!r} is a folder; zoo {tool} expects {expected}{hint}"
    if not path.exists():
        return f"{src!r} does not exist; zoo {tool} expects {expected}"
    if path.is_file() and path.stat().st_size == 0:
        return f"{src!r} is an empty file (0 bytes); zoo {tool} expects {expected}, e.g. a run's checkpoints/last.ckpt"
    return None


def version_text() -> str:
    """What ``zoo --version`` prints: the package, Python, torch with its CUDA build and the GPUs it sees, Lightning."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    import torch  # the CUDA build and the visible GPUs are only known to torch itself

    if torch.version.cuda is None:
        cuda = "CPU-only build"
    elif torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"
    else:
        cuda = f"CUDA {torch.version.cuda} build, no GPU visible"
    rows = [("byol-zoo", installed("byol-zoo")), ("python", platform.python_version()),
            ("torch", f"{torch.__version__} ({cuda})"), ("lightning", installed("lightning")),
            ("torchvision", installed("torchvision")), ("timm", installed("timm"))]
    return "".join(f"{name:<12}{value}\n" for name, value in rows)


def run_cli(args: list[str] | None = None, run: bool = True) -> "ZooCLI":  # noqa: F821 - zoo.cli.lightning
    """Build (and by default run) the Lightning part of ``zoo`` on ``args`` (default: ``sys.argv[1:]``)."""
    from zoo.cli.lightning import run_cli as lightning_run_cli

    return lightning_run_cli(list(sys.argv[1:] if args is None else args), run)


def run_command(name: str, command: Command, args: list[str]) -> int:
    """Run a registered subcommand's ``main(args)`` after the checks that need no import; its exit code."""
    problem = check_weight_file(name, args)
    if problem:
        print(f"zoo {name}: error: {problem}", file=sys.stderr)
        return 2
    if not command.available():
        print(f"zoo {name}: error: the module {command.module} that provides it is not installed; reinstall byol-zoo "
              "(pip install -e .) or check the byol_zoo.commands entry points", file=sys.stderr)
        return 2
    return int(command.load()(args) or 0)


def _first_word(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``zoo <subcommand> ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = registered_commands()
    tool_help = bool(argv) and argv[0] in commands and any(a in ("-h", "--help") for a in argv)
    if argv and argv[0] not in ("-h", "--help") and not tool_help and not _cwd_exists():
        return _without_cwd(argv, commands)  # a tool's --help needs no folder (nor torch) and still prints
    if not argv or argv[0] in ("-h", "--help"):
        print(main_help(commands), end="", file=sys.stdout if argv else sys.stderr)
        if not argv:
            print("zoo: error: choose a subcommand", file=sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_text(), end="")
        return 0
    if argv[0] in commands:
        return run_command(argv[0], commands[argv[0]], argv[1:])
    if not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
        from zoo.cli.errors import closest

        near = closest(argv[0], [*LIGHTNING_COMMANDS, *commands])
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        print(f"zoo: error: unknown subcommand {argv[0]!r}; {hint}zoo --help lists them all", file=sys.stderr)
        return 2
    name = _first_word(argv) if _first_word(argv) in LIGHTNING_COMMANDS else "fit"
    from zoo.cli import help_cache

    if help_cache.is_help_request(argv):
        # LightningCLI's help needs torch and Lightning; the same text, once rendered, comes from the cache
        return help_cache.serve(argv, lambda: _run_lightning(argv, name))
    return _run_lightning(argv, name)


def _cwd_exists() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    return True


def _without_cwd(argv: list[str], commands: dict[str, Command]) -> int:
    """``zoo`` run from a folder that was deleted: the shipped help of ``zoo fit --help`` (and the like) still
    prints; anything else is one line (relative paths, output folders and torch itself cannot work there)."""
    from zoo.cli import help_cache

    text = help_cache.shipped_text(argv) if help_cache.shipped_command(argv) else None
    if text:
        sys.stdout.write(text)
        return 0
    word = _first_word(argv)
    name = argv[0] if argv[0] in commands else word if word in LIGHTNING_COMMANDS else "fit"
    print(f"zoo {name}: error: the current folder no longer exists (it was deleted or "
          "moved); cd into an existing folder and run the command again", file=sys.stderr)
    return 2


def _run_lightning(argv: list[str], name: str) -> int:
    """Run ``zoo fit|validate|test|predict``; a refusal or outside stop is one line on stderr. The exit status."""
    from zoo.errors import RunError, UsageError

    try:
        run_cli(argv)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is a refusal
        # refused before or at the start of training (exit 2), or stopped by an outside condition such as a full
        # disk (exit 1): one line, no traceback. jsonargparse wraps a constructor's error: look down the chain.
        # Lightning's MisconfigurationException is its refusal of a Trainer argument (max_steps -5, ...).
        chain = list(exception_chain(e))
        cause = next((c for c in chain if isinstance(c, (UsageError, RunError))
                      or type(c).__name__ == "MisconfigurationException"), None)
        if cause is None:
            line = constructor_error(e) if isinstance(e, ValueError) else None
            if line is None:
                raise  # not a refusal: a bug keeps its traceback
            print(f"zoo {name}: error: {line}", file=sys.stderr)
            return 2
        print(f"zoo {name}: error: {one_line(cause)}", file=sys.stderr)
        return 1 if isinstance(cause, RunError) else 2
    return 0


def one_line(err: BaseException) -> str:
    """``err``'s message on one line; a DataLoader worker's re-raised error (its message embeds the worker's
    traceback) gives the original message, its last line."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then what it was raised from or during, and so on down (each exception once)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


# jsonargparse's wording when a class in the config could not be built (its constructor raised)
_INSTANTIATION_WRAPPER = "Does not validate against any of the Union subtypes"


def constructor_error(err: BaseException) -> str | None:
    """One line for a class's constructor refusing its arguments while LightningCLI builds it (a missing file, a
    bad value), which jsonargparse wraps in its union-type wording; None for anything else."""
    if _INSTANTIATION_WRAPPER not in str(err):
        return None
    # the constructor's own exception: the first in the chain that is not the wrapper
    root = next((c for c in exception_chain(err) if _INSTANTIATION_WRAPPER not in str(c)), None)
    if not isinstance(root, (ValueError, OSError)):
        return None  # a TypeError, KeyError, AttributeError... inside a constructor is a bug: keep the traceback
    built = re.search(r"class_path='([^']+)'", str(err))
    return f"{built.group(1)}: {root}" if built else str(root)
