"""Cached ``--help`` of ``zoo fit / validate / test / predict``, so that asking for help does not wait for Lightning.

LightningCLI builds its parser from the classes it serves, which means importing torch and Lightning (~7 s on an
idle 2-core machine, much longer under load) before it can print a single line of help. The text it prints is a
pure function of the command line, the terminal width, the installed versions and our source code, so the first
call renders it live and stores it under ``zoo.files.cache_dir("help")``; later identical calls print the stored
text without importing torch. The key covers:

- the arguments after ``zoo`` and the contents of every ``--config`` file they name;
- the terminal width (``COLUMNS`` or the terminal's), which argparse wraps to;
- the Python version and the versions of torch, Lightning, jsonargparse and byol-zoo;
- the size and modification time of every ``.py`` file of byol-zoo's packages (any edit to our code, including a
  new option or docstring, renders the help again);
- ``JSONARGPARSE_*`` / ``LIGHTNING_*`` environment variables, which can change defaults.

Nothing is rendered ahead of time: importing this module has no side effect. ``ZOO_HELP_CACHE=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from zoo.files import atomic_write_text, cache_dir

DISABLE_ENV = "ZOO_HELP_CACHE"
DISTRIBUTION = "byol-zoo"
VERSIONED = ("torch", "lightning", "jsonargparse", DISTRIBUTION)
MAX_ENTRIES = 64  # help texts are ~10-40 KB each; older ones are removed beyond this many


def enabled() -> bool:
    """Whether cached help may be used (``ZOO_HELP_CACHE=0`` turns it off)."""
    return os.environ.get(DISABLE_ENV, "1") != "0"


def is_help_request(argv: list[str]) -> bool:
    """Whether ``argv`` asks for help (``--help``, ``-h``, ``--model.help CLASS``) and nothing that runs."""
    if any(a.startswith("--print_config") for a in argv):
        return False
    return any(a in ("-h", "--help") or (a.startswith("--") and a.split("=", 1)[0].endswith(".help")) for a in argv)


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


def source_fingerprint(dirs: Iterable[Path]) -> str:
    """A digest of the path, size and modification time of every ``.py`` file under ``dirs``."""
    h = hashlib.sha256()
    for root in dirs:
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                st = os.stat(os.path.join(folder, name))
                h.update(f"{os.path.join(folder, name)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


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
        "columns": shutil.get_terminal_size().columns,
        "python": sys.version,
        "versions": {dist: _version(dist) for dist in VERSIONED},
        "source": source_fingerprint(package_dirs() if dirs is None else dirs),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("JSONARGPARSE", "LIGHTNING"))},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.txt"), key=lambda p: p.stat().st_mtime)
    for old in entries[:-MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            old.unlink()


def serve(argv: list[str], live: Callable[[], int]) -> int:
    """Print the help ``argv`` asks for: from the cache when the key matches, else by calling ``live`` (which prints
    it and exits, as argparse does) and storing what it printed. Returns the exit status."""
    key = help_key(argv) if enabled() else None
    folder = cache_dir("help")
    if key is not None:
        try:
            text = (folder / f"{key}.txt").read_text(encoding="utf-8")
        except OSError:
            text = None
        if text:
            sys.stdout.write(text)
            return 0
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
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
