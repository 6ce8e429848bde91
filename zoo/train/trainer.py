"""The one Trainer setup every `zoo fit` uses: precision, DDP, checkpoints, loggers, progress bar.

``trainer_defaults()`` feeds LightningCLI; ``build_trainer(**overrides)`` gives the same Trainer to code that runs
outside the CLI (the probe, the scaling sweep, tests).
"""
from __future__ import annotations

import functools
import inspect
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import (Callback, LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar,
                                         RichProgressBar)
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from zoo.files import atomic_path
from zoo.train.announce import ModelTable, RunSummary, StepProgressBar, step_based  # noqa: F401 - re-exported
from zoo.train.errors import RunError, UsageError  # noqa: F401 - re-exported
from zoo.train.preflight import available_memory, check_datamodule, preflight_check  # noqa: F401 - re-exported
from zoo.train.resume import ResumeGuard  # noqa: F401 - re-exported
from zoo.train.sync_batchnorm import GlobalBatchNorm, ZooSyncBatchNorm  # noqa: F401 - re-exported




def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, or torch's zip writer failing to write (``[enforce fail at inline_container.cc] ... file write
    failed``), which is what a full disk looks like through ``torch.save``."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text
                                              or "No space left" in text)


def cleanup_stale_temp_files(trainer: pl.Trainer) -> None:
    """Remove ``.<name>.ckpt.*.tmp`` files that a writer killed mid-write left in the checkpoint folders (only
    called while this run holds the folder's ``RunLock``, so no live writer owns them)."""
    folders = {c.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
               for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)}
    for folder in folders:
        for tmp in Path(folder).glob(".*.ckpt.*.tmp") if os.path.isdir(folder) else ():
            try:
                tmp.unlink()
            except OSError:
                pass


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor in ``state_dict`` holding a NaN or Inf, else None."""
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a kill mid-write never truncates last.ckpt.

    Checkpoints whose weights hold NaN/Inf are refused, so a numerical fault never replaces the last good file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            # A NaN/Inf weight would make this file useless; refusing keeps the previous good one in place.
            raise FloatingPointError(f"refusing to write checkpoint {os.fspath(path)!r}: weight {bad!r} is NaN/Inf "
                                     f"(step {checkpoint.get('global_step')}); the previous checkpoint is kept. "
                                     "Lower the learning rate or resume from the kept checkpoint.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except BaseException as e:
            if _is_disk_full(e):
                raise RunError(f"no space left on device writing {os.fspath(path)}; the previous checkpoint is kept. "
                               "Free some space and resume with --ckpt_path last") from None
            raise

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` whatever the caller asks: a pickle that would run code raises
        ``UnsafeFileError`` naming what it tried to import, and nothing is executed."""
        from zoo.weights.safe_load import safe_torch_load

        return safe_torch_load(path, map_location=map_location or "cpu")


class RootCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose default folder is ``<default_root_dir>/checkpoints`` (not a per-version log folder),
    so ``--ckpt_path last`` and ``<root>/checkpoints/last.ckpt`` always name the same file."""

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        # No last-v1.ckpt: a resumed run (whose last.ckpt was written by the preemption save) keeps writing last.ckpt.
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def use_root(self, trainer: pl.Trainer) -> None:
        """Point an unset ``dirpath`` at ``<trainer.default_root_dir>/checkpoints``.

        ``ZooTrainer`` calls this when it is built: ``ckpt_path="last"`` is resolved before any callback's ``setup``,
        and with no folder yet it would look in a new log-version folder and silently start from scratch."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.use_root(trainer)  # a plain Lightning Trainer reaches here without ZooTrainer's __init__
        super().setup(trainer, pl_module, stage)


class DeferredSignalConnector(_SignalConnector):
    """Lightning's signal connector, except that SIGTERM only records that it came (``sigterm_pending``).

    This is the one Lightning internal zoo still relies on (Lightning has no public hook to defer SIGTERM or to set
    ``received_sigterm``); pyproject.toml bounds lightning's version and tests/test_lightning_internals.py fails,
    naming it, when a new release changes it.

    Lightning's own handler sets ``trainer.received_sigterm`` at whatever instant the signal lands, and its loops
    then stop at the next check (a batch end, the middle of validation, the start of a step), each in another loop
    state; a checkpoint saved then does not resume exactly. Here ``PreemptionCheckpoint`` writes the checkpoint at
    one well-defined point -- its training batch end, or the end of training -- and only then hands the signal on to
    Lightning, which stops at that batch's end. The signal is still forwarded to DDP workers the launcher started.
    """

    sigterm_pending = False

    def register_signal_handlers(self) -> None:
        self.sigterm_pending = False
        super().register_signal_handlers()

    def _sigterm_notifier_fn(self, signum: Any, _: Any) -> None:
        if not self.sigterm_pending:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self.sigterm_pending = True


def sigterm_pending(trainer: pl.Trainer) -> bool:
    """Has a SIGTERM come that no checkpoint answered yet (on any rank: a collective decision under DDP)?"""
    connector = getattr(trainer, "_signal_connector", None)  # Lightning internal: see DeferredSignalConnector
    flag = bool(getattr(connector, "sigterm_pending", False) or trainer.received_sigterm)
    if trainer.world_size > 1:
        flag = bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
    return flag


class PreemptionCheckpoint(Callback):
    """On SIGTERM (preemption) or Ctrl-C, write a resumable ``last.ckpt`` before exiting.

    With ``ZooTrainer`` the SIGTERM handler only sets a flag (``DeferredSignalConnector``). The checkpoint is written
    in this callback's ``on_train_batch_end`` of the first training batch that ends after the signal (before,
    inside or between steps, in validation, in another callback's hook: wherever the signal landed), in the loop
    state of a periodic checkpoint, the state Lightning's mid-epoch restore is built for; if no training batch
    ends any more, at the end of training. Then Lightning is told, and it raises ``SIGTERMException`` (exit status
    143). Ctrl-C is saved from ``on_exception``. A run that stops on a numerical fault writes nothing here: it must
    not replace the last good checkpoint.
    """

    def __init__(self) -> None:
        self._saved_step: int | None = None

    @staticmethod
    def _path(trainer: pl.Trainer) -> str:
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        folder = ckpt.dirpath if ckpt else os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, "last.ckpt")

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self._path(trainer))
            self._saved_step = trainer.global_step
        trainer._signal_connector.received_sigterm = True  # now Lightning stops, at the end of this batch
        trainer._zoo_preempted = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if sigterm_pending(trainer):
            self._save_and_stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if sigterm_pending(trainer):  # the signal came after the last training batch: training is over, save it
            self._save_and_stop(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if isinstance(exception, SIGTERMException) and exception.code in (None, 0):
            # Lightning exits 0 on SIGTERM: a scheduler would take the preempted run for a finished one.
            exception.code = 128 + signal.SIGTERM
        if isinstance(exception, SIGTERMException) and self._saved_step == trainer.global_step:
            return  # already saved at this step's batch end; the loop state now would restore less cleanly
        trainer.save_checkpoint(self._path(trainer))


def default_callbacks(every_n_train_steps: int | None = None) -> list[Callback]:
    """Checkpointing (last.ckpt), preemption save, lr monitor, the rich progress bar and the model table."""
    return [
        RootCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps),
        PreemptionCheckpoint(),
        LearningRateMonitor(logging_interval="step"),
        RichProgressBar(leave=True),
        ModelTable(),  # Lightning's summary without its column of zero FLOPs
    ]


def trainer_defaults() -> dict[str, Any]:
    """Plain-value Trainer defaults: bf16-mixed on GPU, 32-bit on CPU; SyncBatchNorm whenever DDP is on."""
    on_gpu = torch.cuda.is_available()
    return {
        "accelerator": "auto",
        "devices": "auto" if on_gpu else 1,
        "strategy": "auto",  # DDP when devices > 1; "fsdp" for models that do not fit one device
        "precision": "bf16-mixed" if on_gpu else "32-true",
        "sync_batchnorm": True,  # a no-op on one device; BYOL's BN statistics are global across devices
        "default_root_dir": "runs/default",
        "log_every_n_steps": 10,
    }


def _console_is_interactive() -> bool:
    """Whether the console rich draws its bar on is a terminal or a notebook (stdout, as rich sees it)."""
    from rich import get_console

    console = get_console()
    return bool(console.is_terminal or console.is_jupyter)


def complete_trainer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add what every run needs and a user's config may leave out: our callbacks (unless the user gave one of the
    same type), the atomic checkpoint writer, and CSV + TensorBoard loggers under ``default_root_dir``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    kwargs = dict(kwargs)
    root = kwargs.get("default_root_dir") or "runs/default"
    user = list(kwargs.get("callbacks") or [])
    user_types = {type(c) for c in user}
    has_ckpt = any(isinstance(c, ModelCheckpoint) for c in user)
    has_bar = any(isinstance(c, ProgressBar) for c in user)
    has_summary = any(isinstance(c, ModelSummary) for c in user)
    extra = [c for c in default_callbacks()
             if type(c) not in user_types and not (isinstance(c, ModelCheckpoint) and has_ckpt)
             and not (isinstance(c, ProgressBar) and has_bar) and not (isinstance(c, ModelSummary) and has_summary)]
    # Lightning's bars count batches per epoch and read "Epoch 0/-2" on max_steps runs; off a terminal (a log file,
    # a pipe, a scheduler's output) the rich bar leaves a many-line copy of itself per epoch: one line per tenth
    if step_based(kwargs) or not _console_is_interactive():
        extra = [StepProgressBar() if isinstance(c, RichProgressBar) else c for c in extra]
    if kwargs.get("enable_checkpointing") is False:  # Lightning refuses a ModelCheckpoint then
        extra = [c for c in extra if not isinstance(c, (ModelCheckpoint, PreemptionCheckpoint))]
    if kwargs.get("enable_progress_bar") is False:
        extra = [c for c in extra if not isinstance(c, ProgressBar)]
    if kwargs.get("enable_model_summary") is False:  # Lightning refuses a ModelSummary then
        extra = [c for c in extra if not isinstance(c, ModelSummary)]
    if kwargs.get("logger") is False:
        extra = [c for c in extra if not isinstance(c, LearningRateMonitor)]
    callbacks = user + extra
    if not any(isinstance(c, ResumeGuard) for c in callbacks):
        callbacks.append(ResumeGuard())
    # the run summary prints last (in its teardown: after the progress bar and the other callbacks' reports)
    kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, RunSummary)] + \
        [c for c in callbacks if isinstance(c, RunSummary)]
    plugins = list(kwargs.get("plugins") or [])
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if kwargs.get("sync_batchnorm") and not any(isinstance(p, TorchSyncBatchNorm) for p in plugins):
        plugins.append(ZooSyncBatchNorm())  # torch's SyncBatchNorm refuses CPU tensors (gloo DDP)
    kwargs["plugins"] = plugins
    if kwargs.get("logger") in (None, True):
        kwargs["logger"] = [CSVLogger(root, name="logs"), TensorBoardLogger(root, name="tb")]
    return kwargs


LOCK_NAME = ".zoo-run.lock"


class RunLock:
    """An exclusive lock on an output folder for a live run: ``<folder>/.zoo-run.lock`` holds the pid and an
    ``flock``. The kernel drops the flock when its process dies, so the lock of a killed run is simply taken over."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = os.path.join(os.fspath(folder), LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                folder = os.path.dirname(self.path)
                raise UsageError(f"another run (pid {pid}) is writing to {folder}; wait for it to end or give this "
                                 "run another --trainer.default_root_dir") from None
            try:  # the file may have been removed by the previous holder between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _is_launching_process() -> bool:
    """True in the process a user started (not in a DDP worker that Lightning or torchrun started for rank > 0)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def existing_checkpoints(trainer: pl.Trainer) -> list[str]:
    """``last.ckpt`` files of the checkpoint callbacks (a finished or interrupted run in this folder)."""
    folders = {c.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
               for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)}
    # exists, not isfile: the last.ckpt of a sharded (fsdp2) run is a folder
    return sorted(p for p in (os.path.join(f, "last.ckpt") for f in folders) if os.path.exists(p))


def _titled(method: Any, title: str) -> Any:
    """Lightning's ``method`` (validate / test / predict), first checking the data as ``fit`` does (a bad dataset
    path is one line, not a traceback), under a first docstring line that ``zoo <subcommand> --help`` prints whole as
    its section title (Lightning's own first lines stop mid-sentence there); signature and argument docs stay
    Lightning's."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(self, *args, **kwargs).arguments
        check_datamodule(bound.get("datamodule") or bound.get("dataloaders"))
        return method(self, *args, **kwargs)

    call.__doc__ = f"{title}.\n\n{inspect.cleandoc(method.__doc__ or '')}"
    return call


class ZooTrainer(pl.Trainer):
    """Trainer: Lightning's Trainer with byol-zoo's checks, callbacks and loggers.

    ``fit`` first runs ``preflight_check`` (in the launching process, before DDP starts), then takes the output
    folder's ``RunLock`` and refuses to start a fresh run over a folder that holds one. SIGTERM is deferred to
    ``PreemptionCheckpoint`` (``DeferredSignalConnector``). (The first line is the title of ``zoo fit --help``'s
    trainer section.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from zoo.cli import quiet_lightning

        # every tool that trains (zoo fit, zoo probe --mode protocol, zoo scaling sweep, ...) builds this Trainer:
        # Lightning's availability lines, tips and warnings about its own internals go (ZOO_VERBOSE=1 keeps them)
        quiet_lightning()
        # Our callbacks, checkpoint writer and loggers are added here (``complete_trainer_kwargs`` is idempotent), so
        # LightningCLI needs no override of its private ``_instantiate_trainer`` to get them.
        kwargs.update(complete_trainer_kwargs(kwargs))  # in place: jsonargparse still sees Trainer's parameters
        super().__init__(*args, **kwargs)
        for callback in self.checkpoint_callbacks:
            if isinstance(callback, RootCheckpoint):
                # before ``fit`` resolves ``ckpt_path="last"`` (which happens before any callback's ``setup``)
                callback.use_root(self)
        self._signal_connector = DeferredSignalConnector(self)
        self._zoo_preempted = False

    validate = _titled(pl.Trainer.validate, "Run one evaluation epoch over the validation set")
    test = _titled(pl.Trainer.test, "Run one evaluation epoch over the test set (kept apart from fit)")
    predict = _titled(pl.Trainer.predict, "Run inference on the predict set and return the predictions")

    def fit(self, model: pl.LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: Any = None, ckpt_path: Any = None, overwrite: bool = False, **kwargs: Any) -> None:
        """Train: preflight checks, the output folder's run lock, then Lightning's fit.

        Args:
            model: the LightningModule to train.
            train_dataloaders: training data (a DataLoader or a LightningDataModule), if no ``datamodule``.
            val_dataloaders: validation data, if no ``datamodule``.
            datamodule: the LightningDataModule that provides the data.
            ckpt_path: checkpoint to resume from; ``last`` resumes the output folder's ``checkpoints/last.ckpt``.
            overwrite: start a fresh run in a folder that holds a finished or interrupted one, deleting its
                checkpoints (without it such a run is refused: resume with ``--ckpt_path last`` or use a new folder).
        """
        dm = datamodule if datamodule is not None else (
            train_dataloaders if isinstance(train_dataloaders, pl.LightningDataModule) else None)
        if dm is None and train_dataloaders is None and not is_overridden("train_dataloader", model):
            # e.g. a config without a data section: refused here, before a seed warning and a setup traceback
            raise UsageError(f"no training data: {type(model).__name__} needs a data module; pass a config with a "
                             "data section or --data CLASS_PATH (a LightningDataModule, e.g. zoo.data.ImageDataModule)")
        preflight_check(self, model, dm)
        lock = RunLock(self.default_root_dir).acquire() if _is_launching_process() else None
        try:
            if lock is not None:
                cleanup_stale_temp_files(self)
                old = existing_checkpoints(self)
                if old and ckpt_path is None and not overwrite:
                    raise UsageError(f"{self.default_root_dir} already holds a run ({old[0]}); resume it with "
                                     "--ckpt_path last, or start a new run with another --trainer.default_root_dir "
                                     "or over this one with --overwrite")
                if ckpt_path == "last" and not old:
                    folder = os.path.join(self.default_root_dir, "checkpoints")
                    raise UsageError(f"--ckpt_path last: there is no checkpoint in {folder} to resume; to start a "
                                     "fresh run leave out --ckpt_path (or check --trainer.default_root_dir)")
                if old and ckpt_path is None and overwrite:
                    for path in old:
                        os.unlink(path)
            self._zoo_preempted = False
            out = super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)
            if self._zoo_preempted:  # signalled after the last training batch: saved at the end, still exit 143
                raise SIGTERMException(128 + signal.SIGTERM)
            return out
        finally:
            if lock is not None:
                lock.release()


def build_trainer(**overrides: Any) -> pl.Trainer:
    """A Trainer with the shared defaults, any keyword overridden."""
    return ZooTrainer(**{**trainer_defaults(), **overrides})


def all_ranks(module: pl.LightningModule, flag: bool) -> bool:
    """``flag`` and-reduced over every rank (the flag itself on one process or outside a trainer)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size <= 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=True))


def check_finite_loss(module: pl.LightningModule, loss: torch.Tensor, policy: str) -> bool:
    """The NaN/Inf guard every training step calls: True when ``loss`` is finite.

    ``policy="stop"`` raises ``FloatingPointError`` naming the step (no checkpoint is written on that exception, so
    the last good one survives); ``policy="skip"`` counts the step (logged as ``train/nonfinite_steps``) and the
    caller makes the step a no-op (``byol.BYOL``: undo the batch-norm statistics, zero-gradient loss, no update).
    Under DDP the decision is taken by all ranks together (a fault on one rank stops or skips every rank), since a
    rank that skips backward alone would leave the others waiting in the gradient all-reduce forever.
    """
    if all_ranks(module, bool(torch.isfinite(loss.detach()).all())):
        return True
    step = module.global_step
    if policy == "stop":
        raise FloatingPointError(
            f"non-finite loss ({loss.detach().float().item()}) at step {step}; training stopped before the weights were "
            f"updated, the last checkpoint is still good. Lower the learning rate or set nan_policy: skip to skip such steps.")
    module.nonfinite_steps = getattr(module, "nonfinite_steps", 0) + 1
    module.log("train/nonfinite_steps", float(module.nonfinite_steps))
    return False


NAN_POLICIES = ("stop", "skip")
