"""Scaling sweeps: plan a grid of zoo Transformers on IsoFLOP lines, train each on the shared trainer, fit the laws.

``zoo scaling sweep --config configs/scaling/stdlib_isoflop.yaml`` trains every (shape, budget[, experts]) run
that is not already in ``<out_dir>/runs.csv`` (one row per finished run, so an interrupted sweep resumes where it
stopped) and stores each run's training curve in ``<out_dir>/curves/<run_id>.json`` (for Approach 1).
``zoo scaling fit <out_dir>/runs.csv --approach 1|2|3 [--out DIR]`` prints the fitted law and the compute-optimal
table and writes PNG plots.

Conventions: N is the non-embedding parameter count of the dense model (Kaplan et al. 2020; for routed runs the
dense base size, as in Clark et al. 2022), D = tokens trained, C = the nominal budget 6 N D of the IsoFLOP line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lm.parallel import flops as F
# the results table; COLUMNS and load_runs_csv are re-exported for the sweep's users
from lm.scaling.runs import COLUMNS, append_result, load_runs_csv, read_results  # noqa: F401


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class SweepConfig:
    """Everything a sweep needs, read from YAML (see configs/scaling/*.yaml for the documented fields)."""

    out_dir: str
    shapes: list[dict[str, Any]]
    budgets: list[float]
    model: str = "gopher-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    d_ff_ratio: float = 4.0
    experts: list[int] = field(default_factory=lambda: [1])
    router: str = "sbase"
    min_steps: int = 50
    max_steps: int = 10000
    data: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    val_batches: int = 16
    curve_points: int = 40
    seed: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        """Training window length in tokens."""
        return int(self.data.get("seq_len", 64))

    @property
    def batch_size(self) -> int:
        """Windows per step."""
        return int(self.data.get("batch_size", 16))


def load_config(path: str | os.PathLike) -> SweepConfig:
    """Read a sweep YAML; unknown or missing keys raise an error naming them."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep config {str(p)!r} does not exist; see configs/scaling/ for examples")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"sweep config {str(p)!r} must be a YAML mapping")
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"sweep config {str(p)!r}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    missing = [k for k in ("out_dir", "shapes", "budgets") if k not in raw]
    if missing:
        raise ValueError(f"sweep config {str(p)!r} is missing required key(s) {missing}")
    raw["budgets"] = [float(b) for b in raw["budgets"]]  # YAML reads 1e11 (no dot) as a string
    cfg = SweepConfig(**raw)
    if not cfg.shapes or not cfg.budgets:
        raise ValueError(f"sweep config {str(p)!r}: shapes and budgets must be non-empty lists")
    return cfg


# ------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class RunSpec:
    """One planned training run of the sweep."""

    run_id: str
    model: str
    overrides: dict[str, Any]
    E: int
    N: int
    N_total: int
    C: float
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    C_detailed: float
    plan_hash: str

    @property
    def D(self) -> int:
        """Tokens trained."""
        return self.steps * self.batch_size * self.seq_len


def shape_overrides(cfg: SweepConfig, shape: dict[str, Any]) -> dict[str, Any]:
    """Config overrides for one shape: d_ff, head_dim and kv heads derived when the shape leaves them out."""
    for key in ("d_model", "n_layers", "n_heads"):
        if key not in shape:
            raise ValueError(f"sweep shape {shape} is missing {key!r}; each shape needs d_model, n_layers, n_heads")
    s = dict(shape)
    s.setdefault("d_ff", int(round(cfg.d_ff_ratio * s["d_model"])))
    if s["d_model"] % s["n_heads"] and "head_dim" not in s:
        raise ValueError(f"sweep shape {shape}: d_model is not divisible by n_heads; give head_dim")
    s.setdefault("head_dim", s["d_model"] // s["n_heads"])
    s.setdefault("n_kv_heads", s["n_heads"])  # the base config's kv heads may not divide the new head count
    return {**cfg.model_overrides, "max_seq_len": max(cfg.seq_len, int(cfg.model_overrides.get("max_seq_len", 0))),
            **s}


def _config_of(model: str, overrides: dict[str, Any]) -> Any:
    from zoo.models.lm_configs import get_config

    try:
        return get_config(model, **overrides)
    except TypeError as exc:
        raise ValueError(f"bad override for model {model!r} in the sweep config: {exc}") from None


def plan_runs(cfg: SweepConfig) -> list[RunSpec]:
    """Every (shape, budget, experts) run whose step count lies within [min_steps, max_steps], in training order."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    lr = float(cfg.optim.get("lr", 3e-3))
    runs: list[RunSpec] = []
    for shape in cfg.shapes:
        dense = shape_overrides(cfg, shape)
        n_dense = F.param_count(_config_of(cfg.model, dense), embedding=False)
        for E in cfg.experts:
            if E < 1:
                raise ValueError(f"experts must be >= 1, got {E}")
            ov = dict(dense)
            if E > 1:
                ov.update(ffn="routed", n_experts=int(E), router=cfg.router)
            conf = _config_of(cfg.model, ov)
            n_total = F.param_count(conf, embedding=True)
            for C in cfg.budgets:
                steps = int(round(F.tokens_for_budget(C, n_dense) / tokens_per_step))
                if not cfg.min_steps <= steps <= cfg.max_steps:
                    continue
                tag = f"d{ov['d_model']}-l{ov['n_layers']}-h{ov['n_heads']}-f{ov['d_ff']}" + (f"-e{E}" if E > 1 else "")
                run_id = f"{tag}_C{C:.3g}"
                spec = {"model": cfg.model, "overrides": ov, "steps": steps, "data": cfg.data, "optim": cfg.optim,
                        "val_batches": cfg.val_batches, "seed": cfg.seed}
                h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
                runs.append(RunSpec(run_id=run_id, model=cfg.model, overrides=ov, E=int(E), N=n_dense,
                                    N_total=n_total, C=float(C), steps=steps, batch_size=cfg.batch_size,
                                    seq_len=cfg.seq_len, lr=lr,
                                    C_detailed=F.training_flops(conf, steps * tokens_per_step, cfg.seq_len),
                                    plan_hash=h))
    if not runs:
        raise ValueError(f"no run of the sweep has between min_steps={cfg.min_steps} and max_steps={cfg.max_steps} "
                         "steps; change the budgets or the shapes")
    return sorted(runs, key=lambda r: (r.C, r.N, r.E))


# ------------------------------------------------------------------------------------------------ running
@dataclass
class RunOutcome:
    """What one training run returns: final validation loss, last smoothed train loss, its training curve."""

    val_loss: float
    train_loss: float
    curve_tokens: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)


TrainFn = Callable[[RunSpec, SweepConfig], RunOutcome]


def data_key(cfg: SweepConfig) -> str:
    """Identity of the tokenised corpus (TextDataModule's cache key: files, tokenizer, options, cache version)."""
    dm = _datamodule(cfg)
    return dm.data_dir.name if dm.data_dir is not None else ""


def run_sweep(cfg: SweepConfig, train_fn: TrainFn | None = None, limit: int | None = None,
              log: Callable[[str], None] = print, data: str | None = None
              ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Train every planned run not yet in the CSV; returns (rows written now, [(run_id, error)] of failed runs).

    ``data`` names the corpus the runs train on (default: the data module's cache key when training for real).
    A finished row is reused only if both its settings (plan hash) and its data match: the settings alone miss a
    changed corpus, tokenizer or train/val split, which would silently mix two experiments in one fit.
    """
    if data is None:
        data = data_key(cfg) if train_fn is None else ""
    train_fn = train_fn or train_one
    out = Path(cfg.out_dir)
    csv_path = out / "runs.csv"
    done = {r["run_id"]: r for r in read_results(csv_path)}
    plan = plan_runs(cfg)
    for spec in plan:
        old = done.get(spec.run_id)
        if old is not None and old.get("plan_hash") != spec.plan_hash:
            raise ValueError(f"{csv_path} already holds run {spec.run_id} trained with different settings "
                             f"(plan hash {old.get('plan_hash')} != {spec.plan_hash}); use a new out_dir or "
                             "delete that CSV to start over")
        if old is not None and old.get("data_key", "") != data:
            raise ValueError(f"{csv_path} already holds run {spec.run_id} trained on different data (data key "
                             f"{old.get('data_key')!r} != {data!r}: the corpus, tokenizer or split changed); use a "
                             "new out_dir or delete that CSV to start over")
    todo = [s for s in plan if s.run_id not in done]
    log(f"sweep: {len(plan)} runs planned, {len(plan) - len(todo)} already in {csv_path}, {len(todo)} to train")
    if limit is not None:
        todo = todo[:limit]
    written, failed = [], []
    for k, spec in enumerate(todo):
        log(f"[{k + 1}/{len(todo)}] {spec.run_id}: N={spec.N:,} D={spec.D:,} steps={spec.steps} C={spec.C:.3g}")
        t0 = time.perf_counter()
        try:
            res = train_fn(spec, cfg)
            if not math.isfinite(res.val_loss):
                raise FloatingPointError(f"final validation loss is {res.val_loss}")
        except (FloatingPointError, RuntimeError, ValueError) as exc:
            # One diverged run must not cost the rest of the sweep; it is reported, and retried on the next call.
            failed.append((spec.run_id, f"{type(exc).__name__}: {exc}"))
            log(f"  FAILED {spec.run_id}: {exc}")
            continue
        wall = time.perf_counter() - t0
        if res.curve_tokens:
            from zoo.files import atomic_write_text

            (out / "curves").mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "curves" / f"{spec.run_id}.json", json.dumps(
                {"N": spec.N, "E": spec.E, "C": spec.C, "tokens": res.curve_tokens, "loss": res.curve_loss}))
        row = {"run_id": spec.run_id, "model": spec.model, "E": spec.E, "N": spec.N, "N_total": spec.N_total,
               "D": spec.D, "C": f"{spec.C:.6g}", "C_6nd": f"{6.0 * spec.N * spec.D:.6g}",
               "C_detailed": f"{spec.C_detailed:.6g}", "steps": spec.steps, "batch_size": spec.batch_size,
               "seq_len": spec.seq_len, "lr": spec.lr, "L": f"{res.val_loss:.6f}",
               "train_loss": f"{res.train_loss:.6f}", "wall_s": f"{wall:.2f}",
               "tokens_per_s": f"{spec.D / max(wall, 1e-9):.1f}", "plan_hash": spec.plan_hash, "data_key": data,
               **{k: spec.overrides[k] for k in ("d_model", "n_layers", "n_heads", "d_ff")}}
        append_result(csv_path, row)
        # A preempted earlier attempt may have left a last.ckpt there; the finished row supersedes it.
        shutil.rmtree(out / "lightning" / spec.run_id, ignore_errors=True)
        written.append(row)
        log(f"  val loss {res.val_loss:.4f}  ({wall:.1f}s)")
    return written, failed


_DATAMODULES: dict[str, Any] = {}


def _datamodule(cfg: SweepConfig) -> Any:
    """One TextDataModule per data config, shared by the runs of a sweep (tokenised once, same val windows)."""
    from zoo.data.text import TextDataModule

    key = json.dumps(cfg.data, sort_keys=True)
    if key not in _DATAMODULES:
        opts = {"seq_len": 64, "batch_size": 16, "progress": False, **cfg.data}
        dm = TextDataModule(**opts)
        dm.setup("fit")
        _DATAMODULES[key] = dm
    return _DATAMODULES[key]


def train_one(spec: RunSpec, cfg: SweepConfig) -> RunOutcome:
    """Train one run with lm.CausalLM on the shared trainer (zoo.train.trainer.build_trainer); return its outcome."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lm.modules.causal_lm import CausalLM
    from zoo.train.trainer import build_trainer

    class CurveRecorder(Callback):
        """Bias-corrected EMA of the training loss every few steps: the training curve for Approach 1."""

        def __init__(self, every: int, tokens_per_step: int) -> None:
            self.every, self.tps, self.ema, self.k = every, tokens_per_step, 0.0, 0
            self.tokens: list[float] = []
            self.loss: list[float] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            """Update the EMA; store a curve point every ``every`` steps and at the last step."""
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.k += 1
            self.ema = 0.9 * self.ema + 0.1 * float(loss.detach())
            step = trainer.global_step
            if step % self.every == 0 or step == spec.steps:
                self.tokens.append(float(step * self.tps))
                self.loss.append(self.ema / (1 - 0.9 ** self.k))

    # Per-run banners ("GPU available", tips) would drown the sweep's own one line per run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = _datamodule(cfg)
    opt = cfg.optim
    module = CausalLM(model=spec.model, model_overrides=spec.overrides, lr=spec.lr,
                      weight_decay=float(opt.get("weight_decay", 0.1)),
                      warmup_steps=max(1, int(round(float(opt.get("warmup_fraction", 0.05)) * spec.steps))),
                      total_steps=spec.steps, min_lr_ratio=float(opt.get("min_lr_ratio", 0.1)))
    recorder = CurveRecorder(max(1, spec.steps // max(1, cfg.curve_points)), spec.batch_size * spec.seq_len)
    trainer_kwargs = {"max_steps": spec.steps, "limit_val_batches": cfg.val_batches,
                      "val_check_interval": spec.steps, "check_val_every_n_epoch": None,
                      "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                      "logger": False, "gradient_clip_val": float(opt.get("gradient_clip_val", 1.0)),
                      "default_root_dir": str(Path(cfg.out_dir) / "lightning" / spec.run_id),
                      # A checkpoint that keeps nothing: the sweep's record is the CSV row, not weights.
                      "callbacks": [recorder, ModelCheckpoint(save_top_k=0, save_last=False)],
                      **cfg.trainer}
    trainer = build_trainer(**trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    val = trainer.callback_metrics.get("val/loss")
    if val is None:  # the step count did not line up with a validation point: evaluate explicitly
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    return RunOutcome(val_loss=float(val), train_loss=recorder.loss[-1] if recorder.loss else math.nan,
                      curve_tokens=recorder.tokens, curve_loss=recorder.loss)


def run_scaling(args: Any) -> int:
    """Run the ``zoo scaling sweep|fit`` that ``lm.cli.scaling`` parsed into ``args``; an exit code."""
    try:
        if args.cmd == "sweep":
            if args.limit is not None and args.limit < 1:
                raise ValueError(f"--limit {args.limit}: give the number of runs to train now (1 or more)")
            cfg = load_config(args.config)
            if args.out_dir:
                cfg.out_dir = args.out_dir
            if args.dry_run:
                plan = plan_runs(cfg)
                print(f"{'run_id':40s} {'N':>10s} {'D':>12s} {'steps':>6s} {'C(6ND)':>10s} {'C detailed':>11s}")
                for s in plan:
                    print(f"{s.run_id:40s} {s.N:10,d} {s.D:12,d} {s.steps:6d} {6.0 * s.N * s.D:10.3g} "
                          f"{s.C_detailed:11.3g}")
                print(f"{len(plan)} runs, total 6ND compute {sum(6.0 * s.N * s.D for s in plan):.3g} FLOPs")
                return 0
            _, failed = run_sweep(cfg, limit=args.limit)
            if failed:
                print(f"{len(failed)} run(s) failed (rerun the sweep to retry them):", file=sys.stderr)
                for rid, err in failed:
                    print(f"  {rid}: {err}", file=sys.stderr)
                return 1
            print(f"results: {Path(cfg.out_dir) / 'runs.csv'}; fit with "
                  f"`zoo scaling fit {Path(cfg.out_dir) / 'runs.csv'} --approach 2`")
            return 0
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap {args.bootstrap}: give 0 (no error bars) or more resamples")
        from lm.scaling.report import fit_and_report

        return fit_and_report(args.csv, int(args.approach), args.out, n_bootstrap=args.bootstrap, curves=args.curves)
    except (OSError, ValueError) as exc:
        print(f"zoo scaling {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
