"""End-of-run announcements: where every output of a run went, the module's headline metrics, and, when a run is
interrupted, the exact command that resumes it. Also a step-based progress bar for runs bounded by ``max_steps``
(and for every run whose output is not a terminal) and the model summary printed at the start of fit.
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zoo.files import display_path
from zoo.progress import LINE_SECONDS, LINES, LinePacer, RateClock, clock


def _rank_zero(trainer: pl.Trainer) -> bool:
    return trainer.is_global_zero


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def resume_command(command: list[str] | None) -> str:
    """``command`` with any ``--ckpt_path`` dropped and ``--ckpt_path last`` added, quoted for a shell."""
    if not command:
        return "the same zoo fit command with --ckpt_path last"
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        out.append(arg)
    return shlex.join([*out, "--ckpt_path", "last"])


def command_line() -> list[str] | None:
    """The user's ``zoo ...`` command line when this process was started as ``zoo`` / ``python -m zoo.cli``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog == "zoo":
        return ["zoo", *sys.argv[1:]]
    if prog == "__main__.py" and sys.argv[0].endswith(os.path.join("zoo", "cli", "__main__.py")):
        return ["zoo", *sys.argv[1:]]
    return None


def stop_reason(trainer: pl.Trainer) -> str | None:
    """Why ``fit`` ended, in Lightning's words (``max_steps=200 reached``), or None when no limit explains it."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps} reached"
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch >= trainer.max_epochs:
        return f"max_epochs={trainer.max_epochs} reached"
    if trainer.should_stop:
        return "stopped early: a callback asked"
    return None


class RunSummary(Callback):
    """At the end of ``fit`` print where everything went (checkpoint, probe report, metrics CSV, TensorBoard folder
    and the command to view it) and the module's ``summary_metrics`` (a tuple of logged metric names, read from
    ``trainer.callback_metrics``); on SIGTERM / Ctrl-C print the exact command that resumes the run.

    ``command`` is the command line that started the run (``zoo.cli`` sets it); without it the resume line says to
    add ``--ckpt_path last`` to the same command. ``complete_trainer_kwargs`` puts it last among the callbacks, so
    its ``teardown`` prints after the progress bar stopped and after other callbacks' reports.
    """

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command if command is not None else command_line()
        self._announced = False

    def outputs(self, trainer: pl.Trainer) -> list[tuple[str, str]]:
        """(what, where) for every output of the run that exists."""
        rows: list[tuple[str, str]] = []
        last = next((os.path.join(c.dirpath, "last.ckpt") for c in trainer.checkpoint_callbacks
                     if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if last and (os.path.isfile(last) or os.path.isdir(last)):  # a sharded (FSDP2) checkpoint is a folder
            rows.append(("checkpoint", last))
        report = os.path.join(trainer.default_root_dir, "probe_report.json")
        if os.path.isfile(report):
            rows.append(("probe report", report))
        for logger in trainer.loggers:
            csv = os.path.join(logger.log_dir, "metrics.csv") if isinstance(logger, CSVLogger) else ""
            # rows still buffered are written when the logger is finalised, just after this
            if csv and (os.path.isfile(csv) or getattr(logger.experiment, "metrics", None)):
                rows.append(("metrics (CSV)", os.path.join(logger.log_dir, "metrics.csv")))
            elif isinstance(logger, TensorBoardLogger) and os.path.isdir(logger.log_dir):
                rows.append(("TensorBoard", logger.log_dir))
                rows.append(("  view it with", f"tensorboard --logdir {shlex.quote(logger.root_dir)}"))
        return rows

    def metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple[str, str]]:
        """(name, value) of the module's ``summary_metrics`` that were logged."""
        names = getattr(pl_module, "summary_metrics", ()) or ()
        notes = getattr(pl_module, "summary_missing", {}) or {}  # what to say for a metric the run could not log
        got = trainer.callback_metrics
        return [(name, _fmt(got[name]) if name in got else notes[name]) for name in names
                if name in got or name in notes]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finished = True  # announced in teardown, after the progress bar's last redraw

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not getattr(self, "_finished", False) or not _rank_zero(trainer) or self._announced:
            return
        self._announced = True
        why = stop_reason(trainer)
        lines = [f"run finished at step {trainer.global_step}{f' ({why})' if why else ''}; outputs in "
                 f"{trainer.default_root_dir}:"]
        metrics = self.metrics(trainer, pl_module)
        width = max([16, *(len(name) + 2 for name, _ in metrics)])
        # paths in the form the user named the folder: relative to the working folder for a relative one
        shown = os.path.abspath if os.path.isabs(str(trainer.default_root_dir)) else display_path
        lines += [f"  {what:<{width}}{shown(where) if what.strip() != 'view it with' else where}"
                  for what, where in self.outputs(trainer)]
        if metrics:
            lines.append("summary:")
            lines += [f"  {name:<{width}}{value}" for name, value in metrics]
        print("\n".join(lines), flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not _rank_zero(trainer) or not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        what = "preempted (SIGTERM)" if isinstance(exception, SIGTERMException) else "interrupted (Ctrl-C)"
        print(f"run {what} at step {trainer.global_step}; checkpoint kept in "
              f"{os.path.join(trainer.default_root_dir, 'checkpoints')}. Resume with:\n  "
              f"{resume_command(self.command)}", file=sys.stderr, flush=True)


class StepProgressBar(ProgressBar):
    """A one-line progress bar counted in optimizer steps: ``step 120/200  60%  3.1 it/s  ETA 00:00:26  train/loss
    2.5``, with ``epoch 3/60`` in front on runs bounded by epochs.

    Used for runs bounded by ``max_steps`` (Lightning's bars count batches per epoch and read ``Epoch 0/-2`` there)
    and for every run whose output is not a terminal (a log file, a pipe, a scheduler's output file), where Lightning's
    bar leaves a many-line copy of itself per epoch. On a terminal it redraws in place on stderr at most every
    ``refresh_seconds``; elsewhere it writes whole lines: after the first step, then every ``line_seconds`` or every
    ``1/lines`` of the run, whichever comes first (``zoo.progress.LinePacer``). A final line stays. The rate
    and ETA leave out the first step (workers starting, kernels compiling), so the first line shows no ETA yet.
    """

    def __init__(self, refresh_seconds: float = 0.5, interactive: bool | None = None, lines: int = LINES,
                 line_seconds: float = LINE_SECONDS) -> None:
        """
        Args:
            refresh_seconds: least time between two redraws on a terminal.
            interactive: redraw in place (True) or write whole lines (False); None: whether stderr is a terminal.
            lines: off a terminal, at least one line per ``1/lines`` of the run's steps, plus the first and the last.
            line_seconds: off a terminal, at most this many seconds between two lines.
        """
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self.interactive = interactive
        self.lines = max(1, int(lines))
        self.line_seconds = float(line_seconds)
        self._enabled = True
        self._clock = RateClock()
        self._pacer = LinePacer(0)
        self._first_step = 0
        self._last_draw = 0.0
        self._finished = False
        self._last_drawn = (-1, {})  # (step, metrics) of the line on screen

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @staticmethod
    def line(step: int, total: int, rate: float, metrics: dict[str, Any], epoch: tuple[int, int] | None = None) -> str:
        """The bar's text for ``step`` of ``total`` (0: unknown) at ``rate`` steps/s (0: not known yet); ``epoch``
        is (current, total) on runs bounded by epochs."""
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in list(metrics.items())[:3])
        head = f"epoch {epoch[0]}/{epoch[1]}  " if epoch else ""
        if total > 0:
            eta = (total - step) / rate if rate > 0 else None
            head += f"step {step}/{total}  {100.0 * step / total:3.0f}%  {rate:.2f} it/s  ETA {clock(eta)}"
        else:
            head += f"step {step}  {rate:.2f} it/s"
        return head + (f"  {shown}" if shown else "")

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int:
        """The run's optimizer steps: ``max_steps``, else Lightning's estimate from the epochs (0 when unknown)."""
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - a loader without a length: no total, the bar still counts
            return 0
        return int(total) if math.isfinite(total) else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finished = False
        self._first_step = trainer.global_step
        self._total = self.total_steps(trainer)
        self._epochs = int(trainer.max_epochs) if trainer.max_epochs and trainer.max_epochs > 0 and not (
            trainer.max_steps and trainer.max_steps > 0) else 0
        if self.interactive is None:
            self.interactive = sys.stderr.isatty()
        self._clock = RateClock(trainer.global_step)
        self._pacer = LinePacer(self._total, trainer.global_step, self.lines, self.line_seconds)

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> None:
        if not (self._enabled and _rank_zero(trainer)):
            return
        now, step = time.perf_counter(), trainer.global_step
        self._clock.tick(step, now)
        if not final:
            if self.interactive:
                if now - self._last_draw < self.refresh_seconds:
                    return
            elif 0 < self._total <= step or not self._pacer.due(step, now):
                return  # (off a terminal the last step's line is the final one, written after its validation)
        self._last_draw = now
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        epoch = (min(trainer.current_epoch + 1, self._epochs), self._epochs) if self._epochs else None
        text = self.line(step, self._total, self._clock.rate(step, now), metrics, epoch)
        # a final line showing the same step and metrics as the last one only ends it: redrawing it (with a rate a
        # few microseconds newer) would repeat it in a log file
        same = (step, metrics) == self._last_drawn
        if self.interactive:
            sys.stderr.write(("" if final and same else "\r" + text[:119].ljust(80)) + ("\n" if final else ""))
        elif not (final and same):
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._last_drawn = (step, metrics)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._draw(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the last step's line, with the last validation's metrics, ends here: before Lightning logs
        # "`Trainer.fit` stopped: ..." (which would otherwise land on the bar's unfinished line)
        last_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        last_epoch = self._epochs and trainer.current_epoch + 1 >= self._epochs
        if last_step or last_epoch:
            self._draw(trainer, pl_module, final=True)
            self._finished = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._finished:
            self._draw(trainer, pl_module, final=True)


def step_based(kwargs: dict[str, Any]) -> bool:
    """Whether Trainer arguments bound the run by ``max_steps`` alone (no ``max_epochs``)."""
    steps = kwargs.get("max_steps")
    return steps is not None and steps > 0 and kwargs.get("max_epochs") in (None, -1)


class ModelTable(ModelSummary):
    """Lightning's model summary (name, type, parameters, mode per top-level module), without the FLOPs column when
    Lightning measured none.

    Lightning counts FLOPs only by running ``example_input_array`` through the model, which our modules do not set
    (the LM's FLOPs per token are ``lm.parallel.flops``' and are logged as ``perf/mfu``): its table would show a column of
    zeros and "Total FLOPs: 0". Only the public ``summarize`` hook is overridden.
    """

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        """Print the table and the totals on the console (rich), the FLOPs only when some were counted."""
        from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops > 0]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        table.add_column(" ", style="dim")
        for name, _ in columns[1:]:
            table.add_column(name, justify="left" if name in ("Name", "Type", "Mode") else "right")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        lines = [("Trainable params", get_human_readable_count(int(trainable_parameters))),
                 ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                 ("Total params", get_human_readable_count(int(total_parameters))),
                 ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                 ("Modules in train mode", str(total_training_modes["train"])),
                 ("Modules in eval mode", str(total_training_modes["eval"]))]
        if total_flops > 0:
            lines.append(("Total FLOPs", get_human_readable_count(int(total_flops))))
        for label, value in lines:
            console.print(f"[bold]{label}[/]: {value.strip()}", highlight=False)
