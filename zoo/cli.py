"""`zoo`: LightningCLI (fit / validate / test / predict) plus the probe, export, export-hf, eval and scaling tools.

Methods are reached only through class paths in configs (``class_path: byol.BYOL``) and tools through import
strings below, so ``zoo`` never imports ``byol`` or ``lm`` itself.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from zoo.train.trainer import ZooTrainer, complete_trainer_kwargs, trainer_defaults

# subcommand -> "module:function" taking argv and returning an exit code.
TOOLS = {
    "probe": ("zoo.eval.probe:main", "linear probe / kNN evaluation of any backbone"),
    "export": ("zoo.weights.export:main", "export the encoder of a checkpoint or an official BYOL .pkl to safetensors"),
    "export-hf": ("zoo.weights.hf:main", "export a zoo language model to a Hugging Face folder"),
    "eval": ("lm.evals:main", "language-model evaluations: needle in a haystack, perplexity"),
    "scaling": ("lm.sweep:main", "scaling-law sweeps and fits"),
}


# Lightning's chatter that says nothing about the user's run: silenced in `zoo` unless ZOO_VERBOSE=1. Real warnings
# stay visible. (pytest filters the same warnings in pyproject.toml.)
QUIET_LOG_PREFIXES = ("\U0001f4a1 Tip:", "GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:",
                      "Loading `train_dataloader` to estimate number of stepping batches")
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a deprecated torch API
    # `zoo` hands LightningCLI its own command line as ``args`` (after rewriting flags); sys.argv must stay intact
    # because Lightning's DDP launcher re-executes it for the other ranks, so the warning is filtered, not avoided.
    r"LightningCLI's args parameter is intended",
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(QUIET_LOG_PREFIXES)


def quiet_lightning() -> None:
    """Silence Lightning's tips, availability lines and the two warnings about its own internals (idempotent)."""
    if os.environ.get("ZOO_VERBOSE") == "1":
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        log = logging.getLogger(name)
        for target in [log, *log.handlers]:
            if not any(isinstance(f, _DropChatter) for f in target.filters):
                target.addFilter(_DropChatter())


class ZooCLI(LightningCLI):
    """LightningCLI whose Trainer always gets the shared defaults from ``zoo.train.trainer``."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        config = dict(config)
        config["callbacks"] = list(config.get("callbacks") or []) + list(callbacks)
        if self.save_config_callback and not config.get("fast_dev_run", False):
            config["callbacks"].append(self.save_config_callback(
                self._parser(self.subcommand), self.config.get(str(self.subcommand), self.config), **self.save_config_kwargs))
        return self.trainer_class(**complete_trainer_kwargs(config))


def run_cli(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    """Build (and by default run) the Lightning part of ``zoo`` on ``args``."""
    if args is not None:  # ``--overwrite`` alone means ``--overwrite true`` (ZooTrainer.fit's flag)
        args = [a if a != "--overwrite" or (i + 1 < len(args) and args[i + 1].lower() in ("true", "false"))
                else "--overwrite=true" for i, a in enumerate(args)]
    quiet_lightning()
    return ZooCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=ZooTrainer,  # checks batch / devices / model before DDP spawns anything
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": "byol-zoo. Also: " + "; ".join(f"zoo {k}: {v[1]}" for k, v in TOOLS.items())},
        args=args,
        run=run,
    )


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


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        problem = check_weight_file(argv[0], argv[1:])
        if problem:
            print(f"zoo {argv[0]}: error: {problem}", file=sys.stderr)
            return 2
        module, func = TOOLS[argv[0]][0].split(":")
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    from zoo.train.trainer import RunError, UsageError

    try:
        run_cli(argv)
    except (ValueError, RunError) as e:
        # refused before or at the start of training (exit 2), or stopped by an outside condition such as a full
        # disk (exit 1): one line, no traceback. jsonargparse wraps a constructor's error: look down the chain.
        seen, cause = set(), e
        while cause is not None and not isinstance(cause, (UsageError, RunError)) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if cause is None or id(cause) in seen:
            raise
        print(f"zoo {argv[0] if argv and not argv[0].startswith('-') else 'fit'}: error: {cause}", file=sys.stderr)
        return 2 if isinstance(cause, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
