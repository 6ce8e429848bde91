"""``--help`` of ``zoo fit / validate / test / predict`` without waiting for Lightning.

LightningCLI builds its parser from the classes it serves, which means importing torch and Lightning (~7-11 s on
an idle 2-core machine, much longer under load) before it can print a single line of help. The text it prints is a
pure function of the command line, the help width, the installed versions, whether a GPU is visible (the Trainer's
defaults differ) and our source code, so it is printed from one of two stores when the function's inputs match:

- **Shipped** (``zoo/cli/help/``): the bare ``zoo fit|validate|test|predict --help`` rendered once at 80 columns
  with no GPU by ``python -m zoo.cli.help_cache --ship``, with a manifest of what it was rendered against (Python
  minor version, package versions, a digest of the *contents* of our ``.py`` files). A fresh install's very first
  ``zoo fit --help`` prints it. Any mismatch (another Lightning, an edited source, a GPU, a narrow terminal, a
  ``JSONARGPARSE_*`` / ``LIGHTNING_*`` variable) falls through to the next store; ``tests/test_startup.py`` fails
  when the shipped text is stale and names the command that refreshes it.
- **Cached** (``zoo.files.cache_dir("help")``): any other help request is rendered live the first time and stored;
  later identical calls print it without importing torch. The key covers the arguments after ``zoo`` and the
  contents of every ``--config`` file they name, the working folder, the help width, Python and package versions,
  GPU visibility, the size and modification time of every ``.py`` file of byol-zoo's packages and the
  ``JSONARGPARSE_*`` / ``LIGHTNING_*`` environment variables.

Help is wrapped to the terminal's width but at most 80 columns (as ``zoo --help`` is), so one shipped rendering
serves every terminal at least that wide. Importing this module has no side effect; ``ZOO_HELP_CACHE=0`` turns
both stores off (every request renders live).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from zoo.cli.commands import HELP_WIDTH  # the widest help we print: zoo --help's
from zoo.files import atomic_write_text, cache_dir

DISABLE_ENV = "ZOO_HELP_CACHE"
DISTRIBUTION = "byol-zoo"
# what jsonargparse renders with: the classes' signatures and docstrings (torch, Lightning), the parser and the
# optional packages that change its output (docstrings per argument, stub-resolved types, --parser_mode choices)
VERSIONED = ("torch", "lightning", "jsonargparse", "docstring-parser", "typeshed-client", "omegaconf", DISTRIBUTION)
MAX_ENTRIES = 64  # help texts are ~10-40 KB each; older ones are removed beyond this many
SHIPPED_DIR = Path(__file__).with_name("help")
SHIPPED_COMMANDS = ("fit", "validate", "test", "predict")
REFRESH_COMMAND = "python -m zoo.cli.help_cache --ship"


def enabled() -> bool:
    """Whether stored help may be used (``ZOO_HELP_CACHE=0`` turns it off)."""
    return os.environ.get(DISABLE_ENV, "1") != "0"


def is_help_request(argv: list[str]) -> bool:
    """Whether ``argv`` asks for help (``--help``, ``-h``, ``--model.help CLASS``) and nothing that runs."""
    if any(a.startswith("--print_config") for a in argv):
        return False
    return any(a in ("-h", "--help") or (a.startswith("--") and a.split("=", 1)[0].endswith(".help")) for a in argv)


def help_columns() -> int:
    """The width help is wrapped to: the terminal's (``COLUMNS`` first, as argparse reads it), at most 80."""
    return min(shutil.get_terminal_size().columns, HELP_WIDTH)


def gpu_visible() -> bool:
    """Whether torch would probably see a GPU, judged without importing it (an NVIDIA or ROCm device node and no
    ``CUDA_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES`` hiding it). The Trainer's defaults (precision, devices)
    differ with a GPU, so the help does too."""
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if os.environ.get(var, "unset").strip() in ("", "-1"):
            return False
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def package_dirs() -> list[Path]:
    """The folders of byol-zoo's top-level packages (from the installed metadata, plus ``zoo`` itself), located
    without importing them."""
    names = {"zoo"}
    with contextlib.suppress(metadata.PackageNotFoundError, FileNotFoundError):
        names |= set((metadata.distribution(DISTRIBUTION).read_text("top_level.txt") or "").split())
    dirs = []
    for name in sorted(names):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            dirs += [Path(p) for p in (spec.submodule_search_locations or ())] if spec else []
    return dirs


def _sources(dirs: Iterable[Path]) -> Iterable[tuple[str, Path]]:
    """(path relative to the package's parent, path) of every ``.py`` file under ``dirs``, in a fixed order."""
    for root in sorted(Path(d) for d in dirs):
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = Path(folder, name)
                yield path.relative_to(root.parent).as_posix(), path


def source_fingerprint(dirs: Iterable[Path]) -> str:
    """A digest of the path, size and modification time of every ``.py`` file under ``dirs`` (cheap; for the
    per-user cache, where an edit must render the help again)."""
    h = hashlib.sha256()
    for _, path in _sources(dirs):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def content_fingerprint(dirs: Iterable[Path]) -> str:
    """A digest of the relative path and contents of every ``.py`` file under ``dirs``: the same in every clone
    and install of one source tree (~50 ms for ours), which is what the shipped help is checked against."""
    h = hashlib.sha256()
    for rel, path in _sources(dirs):
        h.update(f"{rel}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _help_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("JSONARGPARSE", "LIGHTNING"))}


def environment() -> dict:
    """What rendered help depends on besides the arguments and our sources."""
    return {"python": "%d.%d" % sys.version_info[:2], "versions": {dist: _version(dist) for dist in VERSIONED},
            "gpu": gpu_visible(), "columns": help_columns(), "env": _help_env()}


def _config_files(argv: list[str]) -> list[str]:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def help_key(argv: list[str], dirs: Iterable[Path] | None = None) -> str | None:
    """The cache key of the help ``argv`` prints, or None when it cannot be cached (a ``--config`` file that cannot
    be read: the live parser reports that)."""
    configs = {}
    for name in _config_files(argv):
        try:
            configs[name] = hashlib.sha256(Path(name).expanduser().read_bytes()).hexdigest()
        except OSError:
            return None
    parts = {
        "argv": argv,
        "configs": configs,
        "cwd": os.getcwd(),  # relative paths in the arguments resolve against it
        "full_python": sys.version,
        **environment(),
        "source": source_fingerprint(package_dirs() if dirs is None else dirs),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def shipped_command(argv: list[str]) -> str | None:
    """The subcommand whose bare help ``argv`` asks for (``fit --help``, ``test -h``), else None."""
    if len(argv) == 2 and argv[0] in SHIPPED_COMMANDS and argv[1] in ("--help", "-h"):
        return argv[0]
    return None


def shipped_manifest(folder: Path = SHIPPED_DIR) -> dict | None:
    """The shipped help's manifest (what it was rendered against), or None when there is none."""
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def expected_manifest(dirs: Iterable[Path] | None = None) -> dict:
    """The manifest shipped help must carry to be printed here: this environment, with no GPU, 80 columns."""
    return {**environment(), "gpu": False, "columns": HELP_WIDTH, "env": {},
            "source": content_fingerprint(package_dirs() if dirs is None else dirs)}


def shipped_text(argv: list[str], folder: Path = SHIPPED_DIR, dirs: Iterable[Path] | None = None) -> str | None:
    """The shipped help for ``argv`` when it was rendered against exactly this environment and source, else None."""
    name = shipped_command(argv)
    manifest = shipped_manifest(folder) if name else None
    if manifest is None or manifest.get("commands", {}).get(name) is None:
        return None
    here = environment()
    if here["gpu"] or here["columns"] != HELP_WIDTH or here["env"]:
        return None  # cheap refusals first: the digest of our sources reads every file
    if {k: manifest.get(k) for k in ("python", "versions")} != {k: here[k] for k in ("python", "versions")}:
        return None
    if manifest.get("source") != content_fingerprint(package_dirs() if dirs is None else dirs):
        return None
    try:
        return (folder / manifest["commands"][name]).read_text(encoding="utf-8") or None
    except OSError:
        return None


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.txt"), key=lambda p: p.stat().st_mtime)
    for old in entries[:-MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            old.unlink()


@contextlib.contextmanager
def _columns(width: int):
    """``COLUMNS=width`` while argparse formats (it reads the variable before asking the terminal)."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def serve(argv: list[str], live: Callable[[], int]) -> int:
    """Print the help ``argv`` asks for: the user's cache when the key matches, else the shipped text when it was
    rendered against this environment, else by calling ``live`` (which prints it and exits, as argparse does) and
    storing what it printed. Returns the exit status."""
    key = help_key(argv) if enabled() else None
    try:
        folder = cache_dir("help")
    except OSError:  # the cache folder is a file: the help is printed, just not stored
        key = None
    if key is not None:
        try:
            text = (folder / f"{key}.txt").read_text(encoding="utf-8")
        except OSError:
            text = None
        text = text or shipped_text(argv)
        if text:
            sys.stdout.write(text)
            return 0
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), _columns(help_columns()):
            code = live()
    except SystemExit as exit_:  # argparse ends help with sys.exit(0)
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.stdout.write(buf.getvalue())
    if key is not None and code == 0 and buf.getvalue():
        with contextlib.suppress(OSError):  # a read-only cache folder costs the speed-up, not the help
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / f"{key}.txt", buf.getvalue())
            _prune(folder)
    return code


def render(name: str, python: str = sys.executable) -> str:
    """The bare ``zoo <name> --help`` as shipped: rendered live in a fresh interpreter at 80 columns, with no GPU
    visible and no stored help, from the folder above our packages."""
    env = {k: v for k, v in os.environ.items() if k not in _help_env()}
    env.update(COLUMNS=str(HELP_WIDTH), CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="", **{DISABLE_ENV: "0"})
    # `python -m <this package>` (zoo.cli) in a child process: rendering runs the front, it does not import it here
    run = subprocess.run([python, "-m", __package__, name, "--help"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    if run.returncode != 0 or not run.stdout:
        raise RuntimeError(f"zoo {name} --help failed (exit {run.returncode}): {run.stderr[-2000:]}")
    return run.stdout


def ship(folder: Path = SHIPPED_DIR) -> dict:
    """Render the bare help of every Lightning subcommand into ``folder`` with its manifest; the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**expected_manifest(), "commands": {}}
    for name in SHIPPED_COMMANDS:
        atomic_write_text(folder / f"{name}.txt", render(name))
        manifest["commands"][name] = f"{name}.txt"
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m zoo.cli.help_cache --ship``: refresh the shipped help after changing our sources or versions."""
    ap = argparse.ArgumentParser(prog="python -m zoo.cli.help_cache", description=main.__doc__)
    ap.add_argument("--ship", action="store_true", help=f"render the bare help into {SHIPPED_DIR}")
    ap.add_argument("--check", action="store_true", help="exit 1 when the shipped help does not match this tree")
    a = ap.parse_args(argv)
    if a.ship:
        manifest = ship()
        print(f"wrote {', '.join(manifest['commands'].values())} and manifest.json to {SHIPPED_DIR}")
    if a.check or not a.ship:
        shipped, expected = shipped_manifest() or {}, expected_manifest()
        stale = sorted(k for k in expected if shipped.get(k) != expected[k])
        print("shipped help is current" if not stale else f"shipped help is stale ({', '.join(stale)} differ); "
              f"run: {REFRESH_COMMAND}")
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
