"""ProbeReport: at the end of pretraining, linear-probe the trained encoder beside the same encoder at initialisation.

Works for any ``zoo.train.ssl.ImagePretraining`` method (it reads ``backbone()`` and the image hyper-parameters).
"""
from __future__ import annotations

import contextlib
import copy
import io
import inspect
import json
import os
import re
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from zoo.eval.probe import ProbeConfig, evaluate

__all__ = ["ProbeReport", "REPORT_WIDTH"]

BAND_KEYS = ("trained_knn_top1", "trained_linear_top1", "random_init_knn_top1", "random_init_linear_top1",
             "gain_knn_points", "gain_linear_points")
REPORT_WIDTH = 80  # the table fits a standard terminal and a log file viewed without wrapping


class ProbeReport(pl.Callback):
    """kNN and linear probes (``zoo.eval.probe``, frozen features) of the method's encoder at fit end vs at
    initialisation.

    The initial encoder is copied in ``setup`` -- before any checkpoint is restored -- so a resumed run compares
    against the same random initialisation (same seed). The probes run at fit end and write
    ``<default_root_dir>/probe_report.json``; the table is printed in ``teardown``, once the progress bar has drawn
    its last frame, so the bar cannot redraw over it or below it.

    Args:
        epochs: epochs of the linear classifier on cached features.
        lr_grid: base learning rates tried (selected on a held-out part of train).
        grid_extensions: times the grid is extended past an edge where the best lr sits (x2 / x0.5); 0: only say so.
        expected: the band a config's README figures span, by report key (e.g. ``gain_knn_points: [3.5, 8.5]``):
            printed under the table with whether this run falls inside, so a user can tell another CPU model or
            thread count (inside) from a broken install (outside).
        expected_source: where the band comes from (seeds, CPU models, thread counts), printed with it.
    """

    def __init__(self, epochs: int = 100, lr_grid: tuple[float, ...] = (0.1, 0.4, 1.6), grid_extensions: int = 0,
                 expected: dict[str, tuple[float, float]] | None = None, expected_source: str = "") -> None:
        self.epochs, self.lr_grid, self.grid_extensions = epochs, tuple(lr_grid), int(grid_extensions)
        self.expected = {str(k): (float(v[0]), float(v[1])) for k, v in (expected or {}).items()}
        for key, (lo, hi) in self.expected.items():
            if key not in BAND_KEYS or not lo <= hi:
                raise ValueError(f"ProbeReport expected.{key}={[lo, hi]}: give [low, high] for one of "
                                 f"{', '.join(BAND_KEYS)}")
        self.expected_source = expected_source
        self.initial = None
        self.result: dict[str, Any] | None = None
        self._pending = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Copy the encoder at initialisation."""
        if stage == "fit" and self.initial is None:
            self.initial = copy.deepcopy(pl_module.backbone()).cpu()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the trained and the initial encoder; save the report (printed in ``teardown``)."""
        dm = trainer.datamodule
        size = pl_module.hparams.image_size
        # Two scale-free probes: the kNN monitor peers use (k=20, cosine, exp(sim/0.07) votes) and a linear probe on
        # batch-normalised features (a random encoder's features have another scale than a trained one's, and one lr
        # grid must serve both). The kNN result is the headline: on digits a linear probe saturates for both.
        common = dict(image_size=size, resize=round(size * 256 / 224), cache_dir=None, progress=False, num_workers=0,
                      extract_batch_size=256, device=str(pl_module.device))
        knn = ProbeConfig(knn_k=(20,), **common)
        linear = ProbeConfig(epochs=self.epochs, batch_size=256, lr_grid=self.lr_grid, heldout=0.1,
                             grid_extensions=self.grid_extensions, feature_norm="batchnorm", **common)
        scores = {}
        notices: list[str] = []
        for tag, enc in (("trained", pl_module.backbone()), ("random_init", self.initial.to(pl_module.device))):
            was_training = enc.training
            # the evaluator's one-line notices (a capped value, a grid edge) are kept for after the table: printed
            # now they would land under the live progress bar
            with contextlib.redirect_stderr(io.StringIO()):
                knn_res = evaluate(enc, dm.train_set, dm.val_set, mode="knn", cfg=knn)
                lin_res = evaluate(enc, dm.train_set, dm.val_set, mode="fast", cfg=linear)
            scores[f"{tag}_knn_top1"], scores[f"{tag}_linear_top1"] = knn_res["top1"], lin_res["top1"]
            notices += [f"{tag}: {callback_terms(n)}" for n in knn_res.get("notices", []) + lin_res.get("notices", [])]
            enc.train(was_training)
        self.result = {"dataset": dm.dataset, "method": type(pl_module).__name__,
                       "encoder": pl_module.hparams.encoder, "steps": trainer.global_step,
                       "recipe": recipe(knn, linear), **scores, "gain_knn_points": scores["trained_knn_top1"] - scores["random_init_knn_top1"],
                       "gain_linear_points": scores["trained_linear_top1"] - scores["random_init_linear_top1"],
                       "notices": notices}
        if self.expected:
            self.result["expected"] = {"source": self.expected_source, **{
                k: {"band": [lo, hi], "inside": lo <= self.result[k] <= hi} for k, (lo, hi) in self.expected.items()}}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, "probe_report.json"), "w") as f:
            json.dump(self.result, f, indent=2)
        self._pending = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Print the table after the progress bar is finished."""
        if not self._pending:
            return
        self._pending = False
        bar = trainer.progress_bar_callback
        if bar is not None and bar is not self:
            # Callbacks tear down in list order and the bar comes after us: let it stop its live display first
            # (its teardown only stops the display, so running it twice is harmless).
            bar.teardown(trainer, pl_module, stage)
        print_report(self.result)


def callback_terms(notice: str) -> str:
    """An evaluator notice in the terms of a ``zoo fit`` config: ``zoo probe``'s ``--lr_grid`` is this callback's
    ``init_args.lr_grid`` there; a flag the callback does not take is named as the probe's fixed setting."""
    own = set(inspect.signature(ProbeReport.__init__).parameters) - {"self"}

    def term(m: re.Match) -> str:
        key = m.group(1)
        return f"ProbeReport's init_args.{key}" if key in own else f"the end-of-fit probe's {key} (fixed)"

    notice = re.sub(r"pass --([a-z_]+) (\S+)", lambda m: f"set {term(m)} to {m.group(2)}", notice)
    return re.sub(r"--([a-z_]+)", term, notice)


def recipe(knn: ProbeConfig, linear: ProbeConfig) -> str:
    """One line naming the probes' settings, so the report's figures can be told apart from `zoo probe`'s."""
    return (f"kNN k={knn.knn_k[0]}; linear {linear.epochs} epochs on {linear.feature_norm}-normalised features, "
            f"centre {linear.image_size}/{linear.resize} px, lr grid {'/'.join(f'{x:g}' for x in linear.lr_grid)} "
            f"chosen on {linear.heldout:.0%} held out")


def report_table(r: dict[str, Any]):
    """The report as a rich Table (at most ``REPORT_WIDTH`` columns wide)."""
    from rich.table import Table

    method = r.get("method", "BYOL")
    table = Table(title=f"Probes on {r['dataset']} val ({r['encoder']}, {r['steps']} {method} steps)",
                  caption=r.get("recipe"), width=REPORT_WIDTH)
    for col in ("encoder weights", "kNN top-1 %", "linear top-1 %"):
        table.add_column(col, justify="right" if col != "encoder weights" else "left")
    table.add_row("random initialisation", f"{r['random_init_knn_top1']:.2f}", f"{r['random_init_linear_top1']:.2f}")
    table.add_row(f"{method}-trained", f"{r['trained_knn_top1']:.2f}", f"{r['trained_linear_top1']:.2f}")
    table.add_row("gain (points)", f"{r['gain_knn_points']:+.2f}", f"{r['gain_linear_points']:+.2f}")
    return table


def print_report(r: dict[str, Any]) -> None:
    """Print the report table to the terminal."""
    from rich.console import Console

    console = Console(width=REPORT_WIDTH)
    console.print(report_table(r))
    for line in band_lines(r):
        console.print(line, highlight=False, markup=False)
    for line in r.get("notices") or []:
        print(f"probe: {line}", flush=True)  # whole lines (a log viewer wraps them), never cut at the table's width


def band_lines(r: dict[str, Any]) -> list[str]:
    """Lines comparing the run with the band its config quotes (none when the config quotes none)."""
    expected = dict(r.get("expected") or {})
    source = expected.pop("source", "")
    if not expected:
        return []
    lines = [f"expected for this config{f' ({source})' if source else ''}:"]
    for key, e in expected.items():
        lo, hi = e["band"]
        lines.append(f"  {key} {lo:g}..{hi:g}: this run {r[key]:.2f}, {'inside' if e['inside'] else 'OUTSIDE'}")
    if all(e["inside"] for e in expected.values()):
        lines.append("  inside the band: another CPU model or thread count moves the figures within it")
    else:
        lines.append("  outside the band: check the install (pytest) and that the config is unchanged; the band "
                     "covers seeds, CPU models and thread counts, not other settings")
    return lines
