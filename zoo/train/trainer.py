"""The one Trainer setup every `zoo fit` uses: precision, DDP, checkpoints, loggers, progress bar.

``trainer_defaults()`` feeds LightningCLI; ``build_trainer(**overrides)`` gives the same Trainer to code that runs
outside the CLI (the probe, the scaling sweep, tests).
"""
from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import (Callback, LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar,
                                         RichProgressBar)
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from zoo.data.workers import name_worker_death_in
from zoo.errors import RunError, UsageError  # noqa: F401 - re-exported
from zoo.files import LOCK_NAME, LockRefused, RunLock  # noqa: F401 - re-exported
from zoo.train.announce import ModelTable, RunSummary, StepProgressBar, step_based  # noqa: F401 - re-exported
from zoo.train.checkpointing import (CHECKPOINT_EVERY_MINUTES, AtomicCheckpointIO, RootCheckpoint,  # noqa: F401
                                     cleanup_stale_temp_files, existing_checkpoints, first_nonfinite,
                                     remove_checkpoint)
from zoo.train.cluster import REQUEUE_SIGNALS_DEFAULT, die_with_launcher, parse_signals, process_rank, requeue_job
from zoo.train.run_folder import (claim_folder, mismatched_checkpoint, new_log_folders,  # noqa: F401
                                  remove_unused_log_folders, resolve_auto_ckpt_path)
from zoo.train.preflight import (available_memory, check_datamodule, lightning_usage_error,  # noqa: F401
                                 preflight_check)
from zoo.train.quiet import quiet_lightning
from zoo.train.resume import ResumeGuard  # noqa: F401 - re-exported
from zoo.train.sync_batchnorm import GlobalBatchNorm, ZooSyncBatchNorm  # noqa: F401 - re-exported


class DeferredSignalConnector(_SignalConnector):
    """Lightning's signal connector, except that SIGTERM and the requeue signals (``trainer.requeue_signals``,
    SIGUSR1 by default: what ``sbatch --signal=USR1@90`` sends before the time limit) only record that they came
    (``sigterm_pending``; ``pending_signal`` says which).

    This is the one Lightning internal zoo still relies on (Lightning has no public hook to defer SIGTERM or to set
    ``received_sigterm``); pyproject.toml bounds lightning's version and tests/test_lightning_internals.py fails,
    naming it, when a new release changes it.

    Lightning's own handler sets ``trainer.received_sigterm`` at whatever instant the signal lands, and its loops
    then stop at the next check (a batch end, the middle of validation, the start of a step), each in another loop
    state; a checkpoint saved then does not resume exactly. Here ``PreemptionCheckpoint`` writes the checkpoint at
    one well-defined point -- its training batch end, or the end of training -- and only then hands the signal on to
    Lightning, which stops at that batch's end. The signal is still forwarded to DDP workers the launcher started.

    Lightning's SLURM handler (on SIGUSR1: write ``hpc_ckpt_N.ckpt`` at once, mid-step, and requeue) is never
    installed: a requeue signal takes the deferred path above, and the job is requeued (``scontrol requeue``) by
    ``ZooTrainer.fit`` once the checkpoint is written. No ``hpc_ckpt_*.ckpt`` is ever written.
    """

    sigterm_pending = False
    pending_signal: int | None = None

    def __init__(self, trainer: pl.Trainer, requeue_signals: tuple[signal.Signals, ...] = ()) -> None:
        super().__init__(trainer)
        self.requeue_signals = tuple(requeue_signals)

    def register_signal_handlers(self) -> None:
        """SIGTERM and every requeue signal go to the deferring notifier (a SIGTERM handler already there is kept)."""
        self.received_sigterm = False
        self.sigterm_pending = False
        self.pending_signal = None
        self._original_handlers = self._get_current_signal_handlers()
        handlers: list[Any] = [self._sigterm_notifier_fn]
        if self._has_already_handler(signal.SIGTERM):
            handlers.append(signal.getsignal(signal.SIGTERM))
        self._register_signal(signal.SIGTERM, _HandlersCompose(handlers))
        for signum in self.requeue_signals:
            self._register_signal(signum, self._sigterm_notifier_fn)

    def _sigterm_notifier_fn(self, signum: Any, _: Any) -> None:
        if not self.sigterm_pending:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        if self.pending_signal is None or signum in self.requeue_signals:
            self.pending_signal = int(signum)  # a requeue signal wins: the job is to come back
        self.sigterm_pending = True

    @property
    def requeue_pending(self) -> bool:
        """Whether the signal that stopped this process asks for the job to be requeued."""
        return self.pending_signal in self.requeue_signals

    def exit_code(self, requeue: bool | None = None) -> int:
        """128 + the signal that stopped the run (143 for SIGTERM, 138 for SIGUSR1), as a shell reports a process
        that signal ended; ``requeue`` (decided over all ranks) picks a requeue signal even on a rank that got none."""
        requeue = self.requeue_pending if requeue is None else requeue
        if not requeue:
            return 128 + signal.SIGTERM
        return 128 + int(self.pending_signal if self.requeue_pending else self.requeue_signals[0])


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
            for callback in trainer.checkpoint_callbacks:  # the periodic save at this batch end would repeat it
                if isinstance(callback, RootCheckpoint) and callback.save_last and callback.dirpath and \
                        os.path.join(callback.dirpath, "last.ckpt") == self._path(trainer):
                    callback._last_global_step_saved = trainer.global_step  # Lightning's attribute, our subclass
        connector = trainer._signal_connector  # Lightning internal: see DeferredSignalConnector
        requeue = bool(getattr(connector, "requeue_pending", False))
        if trainer.world_size > 1:  # a requeue signal on any rank requeues the job (rank 0 asks the scheduler)
            requeue = bool(trainer.strategy.reduce_boolean_decision(requeue, all=False))
        trainer._zoo_requeue = requeue
        connector.received_sigterm = True  # now Lightning stops, at the end of this batch
        trainer._zoo_preempted = True

    @staticmethod
    def exit_code(trainer: pl.Trainer) -> int:
        """The exit status of a run stopped by a signal (128 + its number; 143 without a deferred connector)."""
        connector = trainer._signal_connector  # Lightning internal: see DeferredSignalConnector
        if not isinstance(connector, DeferredSignalConnector):
            return 128 + signal.SIGTERM
        return connector.exit_code(getattr(trainer, "_zoo_requeue", None))

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
            exception.code = self.exit_code(trainer)
        if isinstance(exception, SIGTERMException) and self._saved_step == trainer.global_step:
            return  # already saved at this step's batch end; the loop state now would restore less cleanly
        trainer.save_checkpoint(self._path(trainer))


def default_callbacks(every_n_train_steps: int | None = None,
                      every_minutes: float | None = CHECKPOINT_EVERY_MINUTES) -> list[Callback]:
    """Checkpointing (last.ckpt at every epoch end and every ``every_minutes``), preemption save, lr monitor, the rich
    progress bar and the model table."""
    return [
        RootCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                       every_minutes=every_minutes),
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


def complete_trainer_kwargs(kwargs: dict[str, Any],
                            every_minutes: float | None = CHECKPOINT_EVERY_MINUTES) -> dict[str, Any]:
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
    extra = [c for c in default_callbacks(every_minutes=every_minutes)
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

    def __init__(self, *args: Any, checkpoint_every_minutes: float | None = CHECKPOINT_EVERY_MINUTES,
                 requeue_signals: list[str] | None = list(REQUEUE_SIGNALS_DEFAULT), **kwargs: Any) -> None:
        """Lightning's Trainer arguments, and:

        Args:
            checkpoint_every_minutes: minutes of training between two periodic saves of
                ``<default_root_dir>/checkpoints/last.ckpt`` (it is also saved at every epoch end); 0 saves only at
                epoch ends.
            requeue_signals: signals that save at the next batch end like SIGTERM, then requeue the SLURM job
                (``scontrol requeue $SLURM_JOB_ID``, when both exist) and exit with 128 + the signal number; the
                default SIGUSR1 is what ``sbatch --signal=USR1@90`` sends 90 s before the time limit.
        """
        if checkpoint_every_minutes is not None and not checkpoint_every_minutes >= 0:
            raise UsageError(f"trainer.checkpoint_every_minutes must be >= 0 (0: only at epoch ends), got "
                             f"{checkpoint_every_minutes}")
        die_with_launcher()  # a rank Lightning started must not outlive rank 0
        signals = parse_signals(requeue_signals)

        # every tool that trains (zoo fit, zoo probe --mode protocol, zoo scaling sweep, ...) builds this Trainer:
        # Lightning's availability lines, tips and warnings about its own internals go (ZOO_VERBOSE=1 keeps them)
        quiet_lightning()
        # Our callbacks, checkpoint writer and loggers are added here (``complete_trainer_kwargs`` is idempotent), so
        # LightningCLI needs no override of its private ``_instantiate_trainer`` to get them.
        kwargs.update(complete_trainer_kwargs(kwargs, checkpoint_every_minutes))  # in place: jsonargparse still
        try:  # sees Trainer's parameters
            super().__init__(*args, **kwargs)
        except (ValueError, ImportError, Exception) as e:
            refusal = lightning_usage_error(e)  # a bad accelerator, devices, strategy...: one line naming the key
            if refusal is None:
                raise
            raise refusal from None
        for callback in self.checkpoint_callbacks:
            if isinstance(callback, RootCheckpoint):
                # before ``fit`` resolves ``ckpt_path="last"`` (which happens before any callback's ``setup``)
                callback.use_root(self)
        self._signal_connector = DeferredSignalConnector(self, signals)
        self._zoo_preempted = self._zoo_requeue = False

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
            ckpt_path: checkpoint to resume from; ``last`` resumes the output folder's ``checkpoints/last.ckpt``;
                ``auto`` resumes it when it exists and starts fresh otherwise (one command for a first launch and
                every requeue).
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
        ckpt_path = resolve_auto_ckpt_path(self, ckpt_path)
        lock = claim_folder(self, ckpt_path, overwrite)
        requeue = False
        fresh = new_log_folders(self) if lock is not None else []
        try:
            self._zoo_preempted = self._zoo_requeue = False
            out = super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)
            if self._zoo_preempted:  # signalled after the last training batch: saved at the end, still exit 128+sig
                raise SIGTERMException(PreemptionCheckpoint.exit_code(self))
            return out
        except SystemExit:
            requeue = self._zoo_preempted and bool(getattr(self, "_zoo_requeue", False))
            raise
        except Exception as e:
            # max_epochs below the resumed epoch, or a checkpoint of another model, found while restoring
            refusal = lightning_usage_error(e) or mismatched_checkpoint(self, e, ckpt_path)
            if refusal is not None or isinstance(e, UsageError):
                remove_unused_log_folders(fresh)  # a refused start leaves no empty logs/version_N, tb/version_N
            if refusal is None:
                named = name_worker_death_in(e, _run_datasets(self, dm))  # a loader worker killed by a signal
                if named is not None:
                    raise named from e
                raise
            raise refusal from None
        finally:
            if lock is not None:
                lock.release()
            if requeue and process_rank(self) == 0:  # after the save and the lock's release: the job may go now
                print(f"zoo fit: {requeue_job()}", file=sys.stderr, flush=True)


def _run_datasets(trainer: pl.Trainer, dm: Any) -> list[Any]:
    """The datasets a fit reads: its data module's sets and its loaders' (whichever exist)."""
    found = [getattr(dm, name, None) for name in ("train_set", "val_set")]
    combined = getattr(trainer.fit_loop, "_combined_loader", None)  # Lightning internal: this fit's loaders
    found += [getattr(loader, "dataset", None) for loader in (getattr(combined, "flattened", None) or [])]
    return [d for d in found if d is not None]


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
