"""The output folder a run claims at its start: the run lock (taken by global rank 0 only, as Lightning's cluster
environment names it), the rerun rules (``--ckpt_path last|auto``, ``--overwrite``) and the log folders a refused
start must not leave behind."""
from __future__ import annotations

import os
import shutil
import time
from typing import Any

import lightning.pytorch as pl

from zoo.files import LockRefused, RunLock
from zoo.train.checkpointing import cleanup_stale_temp_files, existing_checkpoints, remove_checkpoint
from zoo.train.cluster import launched_externally, process_rank
from zoo.errors import UsageError


def claim_folder(trainer: pl.Trainer, ckpt_path: Any, overwrite: bool) -> RunLock | None:
    """In the process that will be global rank 0: take the output folder's lock, remove killed writers' leftovers,
    and apply the rerun rules (refuse a fresh run over an old one, ``last`` without a checkpoint, ``--overwrite``).
    In every other process: refuse when rank 0 will be refused (the same rules, read-only), else None."""
    old = existing_checkpoints(trainer)
    rank0 = process_rank(trainer) == 0
    lock = None
    if rank0:
        try:
            lock = RunLock(trainer.default_root_dir).acquire()
        except LockRefused as e:
            raise UsageError(str(e)) from None
    elif launched_externally(trainer):
        _refuse_if_rank0_will(trainer)
    try:
        if old and ckpt_path is None and not overwrite:
            raise UsageError(f"{trainer.default_root_dir} already holds a run ({old[0]}); resume it with "
                             "--ckpt_path last, or start a new run with another --trainer.default_root_dir "
                             "or over this one with --overwrite (--ckpt_path auto resumes when there is a checkpoint "
                             "and starts fresh otherwise)")
        if ckpt_path == "last" and not old:
            folder = os.path.join(trainer.default_root_dir, "checkpoints")
            raise UsageError(f"--ckpt_path last: there is no checkpoint in {folder} to resume; to start a "
                             "fresh run leave out --ckpt_path (or check --trainer.default_root_dir)")
        if lock is not None:
            cleanup_stale_temp_files(trainer)
            if old and ckpt_path is None and overwrite:
                for path in old:
                    remove_checkpoint(path)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _refuse_if_rank0_will(trainer: pl.Trainer) -> None:
    """A rank > 0 of a job its scheduler started: refuse with rank 0's reason when another live run holds the
    folder, rather than wait forever for a rank 0 that has exited. Asked three times over a second, so rank 0's
    own lock, taken a moment before it records this job in the file, is never mistaken for another run."""
    lock = RunLock(trainer.default_root_dir)
    for attempt in range(3):
        reason = lock.held_by_another()
        if reason is None:
            return
        if attempt < 2:
            time.sleep(0.5)
    raise UsageError(reason)


def new_log_folders(trainer: pl.Trainer) -> list[str]:
    """The log folders (``logs/version_N``, ``tb/version_N``) this start will create, where they do not exist yet."""
    folders = []
    for logger in trainer.loggers:
        try:
            folder = logger.log_dir
        except Exception:  # a logger without a local folder
            continue
        if folder and not os.path.exists(folder):
            folders.append(os.fspath(folder))
    return folders


def remove_unused_log_folders(folders: list[str]) -> None:
    """Remove the log folders a refused start created, when nothing was logged into them (no metrics.csv), and
    their ``logs`` / ``tb`` parents when that leaves them empty."""
    if any(os.path.exists(os.path.join(f, "metrics.csv")) for f in folders):
        return
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        parent = os.path.dirname(folder)
        try:
            os.rmdir(parent)  # only when empty
        except OSError:
            pass


def resolve_auto_ckpt_path(trainer: pl.Trainer, ckpt_path: Any) -> Any:
    """``--ckpt_path auto``: ``last`` when the run folder holds a checkpoint, else None (a fresh start), so one
    command line serves the first launch and every requeue."""
    if ckpt_path != "auto":
        return ckpt_path
    return "last" if existing_checkpoints(trainer) else None


def mismatched_checkpoint(trainer: pl.Trainer, exc: BaseException, ckpt_path: Any) -> UsageError | None:
    """A resume whose checkpoint holds another model than the config builds (``load_state_dict``'s missing,
    unexpected or mis-shaped tensors) as one line naming the checkpoint and the hyper-parameters that differ."""
    if ckpt_path is None or not isinstance(exc, RuntimeError) or "Error(s) in loading state_dict" not in str(exc):
        return None
    loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None) or {}
    saved = loaded.get("hyper_parameters") or {}
    now = dict(getattr(trainer.lightning_module, "hparams", {}) or {})
    differ = [f"{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in sorted(set(saved) | set(now))
              if k in saved and k in now and saved[k] != now[k]]
    what = "; ".join(differ[:4]) if differ else "its tensors do not match this model's"
    path = getattr(getattr(trainer, "_checkpoint_connector", None), "_ckpt_path", None) or ckpt_path
    return UsageError(f"the checkpoint {path} holds another model than this config builds: {what}. Resume with the "
                      "config the run was started with, or start a new run in another --trainer.default_root_dir")
