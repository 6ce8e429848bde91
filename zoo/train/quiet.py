"""Lightning's chatter that says nothing about the user's run, silenced for ``zoo`` and for every Trainer zoo builds.

Here in the train layer (no torch, no Lightning import: only logging filters and warning filters) so the Trainer
setup (``zoo.train.trainer``) and the ``zoo`` front (``zoo.cli``, which re-exports ``quiet_lightning``) share it.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# Lightning's chatter that says nothing about the user's run: silenced in `zoo` unless ZOO_VERBOSE=1. Real warnings
# stay visible. (pytest filters the same warnings in pyproject.toml.)
QUIET_LOG_PREFIXES = ("\U0001f4a1 Tip:", "GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:",
                      "Loading `train_dataloader` to estimate number of stepping batches", "Seed set to",
                      "Trainer already configured with model summary callbacks",  # ours: zoo.train.announce.ModelTable
                      # said by RunSummary's last line ("run finished at step N (max_steps=N reached)"); Lightning's
                      # lands on a live progress bar, which is still drawn when it is logged
                      "`Trainer.fit` stopped:",
                      # the process-group banner of every DDP / FSDP start (the run summary names the devices' work)
                      "Initializing distributed:", "-" * 20,
                      "`Trainer(limit_")  # "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used."
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of a deprecated torch API
    # FSDP2 on a CPU mesh (gloo): our sharded init is tested equal to one process's (tests/test_fsdp.py)
    r"DTensor random operators may not have complete support on cpu device mesh",
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)


_RANK_PREFIX = re.compile(r"^\[rank: \d+\] ")  # Lightning's prefix on messages from ranks other than 0


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _RANK_PREFIX.sub("", str(record.getMessage())).startswith(QUIET_LOG_PREFIXES)


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
