"""Graph breaks, recompiles, host syncs and compiled/eager step time of the compiled training steps, on CPU (issue 18).

The steps measured are the ones training runs, built through the public constructors:
  - images (BYOL convnet_tiny and resnet18, SimSiam convnet_tiny; ``compile="step"``, ``nan_policy="skip"``): the
    module's ``compiled_step`` (``zoo.train.whole_step``: views + forwards + loss, LARS/SGD + EMA, the masked restore)
    driven by a real Lightning ``Trainer`` on the digits images, so the optimizer, schedule, logging and checkpoint
    are the ones a run uses;
  - LM (tiny Gemma 2, dense and S-BASE routed; ``compile=True``): ``CausalLM.training_step`` through
    ``LMModule.compiled_train_loss`` (forward, chunked loss, routing losses), backward and AdamW (fused, as on CUDA).
Each compiled case runs ``--steps`` steps (new per-sample augmentation parameters or new tokens every step), then the
state goes through a checkpoint into a module rebuilt from its constructor and two more steps run. The compiled
functions get a graph-counting backend and no ``fullgraph`` (so a break is counted and located instead of raised); a
graph compiled after the first step is a recompile. Host syncs per step are counted by ``zoo.train.host_sync`` around
the whole step (the compiled graphs themselves run outside the dispatch mode, which they refuse; a graph cannot hold a
sync without a break). The eager reference is the same module with compile off.

Prints a table and ONE JSON line with ``<case>_graph_breaks`` and ``<case>_recompiles`` (the issue-18 target: all
zero) plus host syncs per step, eager and compiled ms per step (wall, and the process's CPU time, which a shared
machine's other jobs do not inflate) and their ratios.

Timing on a shared machine: give it no more OpenMP threads than free cores (``OMP_NUM_THREADS=1`` on a busy 2-core
box). An OpenMP thread that loses its core stalls every parallel region at the barrier, and a compiled step is
hundreds of small parallel regions (inductor's kernels) where eager has a few large ones: with 2 threads under load
8-12, BYOL resnet18 took 9.1 s eager and 10.3 s compiled per step, against 0.54 s and 0.75 s with one thread.

    OMP_NUM_THREADS=1 python bench/graph_breaks.py                 # all five cases, inductor (~15 min on 2 cores)
    python bench/graph_breaks.py --cases lm_gemma2_dense --backend eager --steps 2 --seq 8 --lm-batch 1
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, not bench/, for `import augment`

from zoo.train.host_sync import HostSyncs, count_host_syncs  # noqa: E402

RESUME_STEPS = 2  # steps run after the checkpoint + rebuild
IMAGE_CASES = {"byol_convnet_tiny": ("byol", "convnet_tiny"), "byol_resnet18": ("byol", "resnet18"),
               "simsiam_convnet_tiny": ("simsiam", "convnet_tiny")}
LM_CASES = {"lm_gemma2_dense": False, "lm_gemma2_routed": True}


def outside_modes(fn: Callable) -> Callable:
    """``fn`` run with the host-sync dispatch mode suspended: compiled code refuses to run under a dispatch mode."""
    def call(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return call


# --------------------------------------------------------------------------------------------------------- measure
class CountingBackend:
    """A dynamo backend that counts the graphs it is handed, then compiles them with ``inner``."""

    def __init__(self, inner: str) -> None:
        self.inner, self.graphs = inner, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


REPO = str(Path(__file__).resolve().parents[1]) + "/"
_AT = re.compile(r"in user code at (\S+):(\d+)")
_FILE = re.compile(r'File "([^"]+)", line (\d+)')


def _short(path: str) -> str:
    """A path relative to the repo, or to site-packages for libraries."""
    return path.replace(REPO, "").split("site-packages/")[-1]


class _DynamoLog(logging.Handler):
    """Collects dynamo's graph-break records (each break's innermost frame, the innermost frame in this repo: the line
    to change, and the reason's first explanatory line) and its recompile records (the failed guard)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.breaks: list[dict[str, str]] = []
        self.recompiles: list[str] = []
        self._ours: dict[str, str] = {}  # innermost frame -> repo frame, for breaks logged without their stack

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith("__recompiles"):
            self.recompiles.append(" ".join(record.getMessage().split())[:300])
            return
        if not record.name.endswith("__graph_breaks"):
            return
        msg = record.getMessage()
        at = _AT.search(msg)
        if at is None:
            return
        at_s = f"{_short(at.group(1))}:{at.group(2)}"
        frames = [(f, ln) for f, ln in _FILE.findall(msg)]
        repo = [f"{_short(f)}:{ln}" for f, ln in frames if f.startswith(REPO) and "/bench/" not in f]
        if repo:
            self._ours[at_s] = repo[-1]
        lines = [ln.strip() for ln in msg.split("Graph Break Reason:", 1)[-1].splitlines() if ln.strip()]
        why = [ln for ln in lines[1:] if not ln.startswith(("Hint:", "Developer", "For more", "File", "^"))]
        reason = " / ".join(why[:2]) if why else (lines[0] if lines else "?")
        self.breaks.append({"where": self._ours.get(at_s, at_s), "at": at_s, "reason": reason[:240]})

    def grouped_breaks(self) -> list[dict[str, Any]]:
        """The breaks, one entry per (repo line, frame, reason) with a count (a break in a loop is logged per pass)."""
        grouped: dict[tuple[str, str, str], int] = {}
        for b in self.breaks:
            key = (b["where"], b["at"], b["reason"])
            grouped[key] = grouped.get(key, 0) + 1
        return [{"where": w, "at": a, "reason": r, "count": n} for (w, a, r), n in grouped.items()]


@contextmanager
def dynamo_log() -> Iterator[_DynamoLog]:
    """Record dynamo's graph breaks and recompiles (``torch._logging`` artifacts) made inside the block."""
    handler = _DynamoLog()
    torch._logging.set_logs(graph_breaks=True, recompiles=True)  # (re)installs torch's handlers: ours goes after
    dynamo = logging.getLogger("torch._dynamo")  # does not propagate to "torch"
    saved = dynamo.handlers[:]
    dynamo.handlers = [handler]  # the breaks go to the table, not as pages of stderr
    try:
        yield handler
    finally:
        dynamo.handlers = saved
        torch._logging.set_logs()


class Steps:
    """Per-step wall time, host syncs and (compiled runs) the backend's graph count after the step."""

    def __init__(self, counter: CountingBackend | None = None) -> None:
        self.counter = counter
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU time: on a shared machine, the time the step itself computed
        self.syncs: list[HostSyncs] = []
        self.graphs: list[int] = []
        self._stack: ExitStack | None = None

    def start(self) -> None:
        """Open the step: the sync counter goes on, the clock starts."""
        self._stack = ExitStack()
        self.syncs.append(self._stack.enter_context(count_host_syncs()))
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def end(self) -> None:
        """Close the step."""
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)
        self.close()
        self.graphs.append(self.counter.graphs if self.counter else 0)

    def close(self) -> None:
        """Switch the sync counter off (also after a failed step)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def summary(self) -> dict[str, Any]:
        """Median ms of the steps after the first, worst host-sync count of those steps (and where they come from)."""
        later = self.syncs[1:] or self.syncs
        worst = max(later, key=lambda s: s.total)
        out = {"ms": 1e3 * statistics.median(self.times[1:] or self.times), "first_step_s": self.times[0],
               "cpu_ms": 1e3 * statistics.median(self.cpu[1:] or self.cpu),
               "host_syncs": worst.total,
               "host_sync_sites": {site: dict(ops) for site, ops in worst.per_site_ops().items()}}
        if self.counter is not None:
            out.update(warmup_graphs=self.graphs[0], recompiles=self.graphs[-1] - self.graphs[0],
                       graphs_per_step=self.graphs)
        return out


# ---------------------------------------------------------------------------------------------------- image steps
def image_module(method: str, encoder: str, size: int, compile: bool | str) -> Any:
    """BYOL or SimSiam through its public constructor (small heads, ``nan_policy="skip"``: no host sync by design)."""
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(encoder=encoder, image_size=size, num_classes=10, projector_hidden=256,
                              projection_dim=64, warmup_steps=1, compile=compile, nan_policy="skip")
    if method == "byol":
        from byol import BYOL
        return BYOL(**kw)
    from simsiam import SimSiam
    return SimSiam(**kw, predictor_hidden=32)


def compile_whole_step(module: Any, counter: CountingBackend) -> None:
    """Give ``module`` the whole-step functions ``compiled_step`` would build, compiled with the counting backend."""
    from zoo.train.whole_step import WholeStep

    ws = WholeStep(module._step_forward, module._step_update, backend=counter, fullgraph=False)
    ws.forward, ws.update, ws.restore = (outside_modes(f) for f in (ws.forward, ws.update, ws.restore))
    module._whole_step = ws


def _image_fit(module: Any, steps: int, probe: Steps, args, root: str, ckpt: str | None = None) -> Any:
    """``trainer.fit`` for ``steps`` optimizer steps on the digits images, ``probe`` around each step."""
    import lightning.pytorch as pl

    from zoo.data import ImageDataModule
    from zoo.train.trainer import build_trainer

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            probe.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            probe.end()

        def on_exception(self, trainer, pl_module, exception) -> None:
            probe.close()

    trainer = build_trainer(default_root_dir=root, accelerator="cpu", devices=1, precision="32-true", max_steps=steps,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(module, ImageDataModule("digits", batch_size=args.batch, num_workers=0, image_size=args.size),
                ckpt_path=ckpt)
    return trainer


def image_case(name: str, args) -> dict[str, Any]:
    """Eager reference and compiled whole step (with a checkpoint resume into a rebuilt module) of one image case."""
    method, encoder = IMAGE_CASES[name]
    with tempfile.TemporaryDirectory() as root:
        eager = Steps()
        _image_fit(image_module(method, encoder, args.size, False), args.steps, eager, args, root)
        torch._dynamo.reset()
        counter = CountingBackend(args.backend)
        steps = Steps(counter)
        try:
            with dynamo_log() as log:
                module = image_module(method, encoder, args.size, "step")
                compile_whole_step(module, counter)
                trainer = _image_fit(module, args.steps, steps, args, root)
                ckpt = f"{root}/step{args.steps}.ckpt"
                trainer.save_checkpoint(ckpt)
                module = image_module(method, encoder, args.size, "step")  # rebuilt: new parameters, new optimizer
                compile_whole_step(module, counter)
                _image_fit(module, args.steps + RESUME_STEPS, steps, args, root, ckpt=ckpt)
            compiled = {**steps.summary(), "graph_breaks": len(log.breaks), "break_reasons": log.grouped_breaks(),
                        "recompile_reasons": log.recompiles, "eager_steps": module._whole_step.eager_steps}
        except Exception as err:  # a compiler failure is a finding to report, not a reason to lose the other cases
            steps.close()
            compiled = _failed(err)
    return {"eager": eager.summary(), "compiled": compiled}


# ------------------------------------------------------------------------------------------------------- LM steps
def lm_module(routed: bool, args, compile: bool) -> tuple[Any, torch.optim.Optimizer, Any]:
    """A tiny Gemma 2 ``lm.CausalLM`` (dense or S-BASE routed FFN, chunked loss) and fused AdamW + its schedule."""
    from lm import CausalLM

    torch.manual_seed(0)
    overrides: dict[str, Any] = dict(n_layers=2, d_model=64, d_ff=128, n_heads=2, n_kv_heads=1, head_dim=32,
                                     window=args.seq // 2)
    if routed:
        overrides.update(ffn="routed", n_experts=4)
    total = args.steps + RESUME_STEPS
    module = CausalLM(model="gemma2-tiny", model_overrides=overrides, warmup_steps=1, total_steps=total,
                      loss_chunk_size=args.seq, compile=compile)
    conf = module.configure_optimizers()  # needs no Trainer when total_steps is given
    # The optimizer make_adamw builds on CUDA (fused): the CPU reference loop reads every step counter with .item(),
    # host-resident counters that cost a GPU nothing but that a CPU-side count cannot tell apart.
    hp = module.hparams
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in conf["optimizer"].param_groups]
    opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, conf["lr_scheduler"]["scheduler"].lr_lambdas)
    return module, opt, sched


def lm_tokens(args) -> torch.Tensor:
    """New random byte tokens for every step: [steps, batch, seq + 1]."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (args.steps + RESUME_STEPS, args.lm_batch, args.seq + 1), generator=g)


def _lm_steps(module: Any, opt: torch.optim.Optimizer, sched: Any, tokens: torch.Tensor, steps: range,
              probe: Steps) -> None:
    """``CausalLM.training_step`` (compiled loss when ``compile``), backward and AdamW for each step in ``steps``."""
    for i in steps:
        probe.start()
        loss = module.training_step(tokens[i], i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.end()
        sched.step()


def compile_train_loss(module: Any, counter: CountingBackend) -> None:
    """Give ``module`` the compiled training loss ``compiled_train_loss`` would build, with the counting backend."""
    module._compiled_train_loss = outside_modes(torch.compile(module.train_loss, backend=counter))


def lm_case(name: str, args) -> dict[str, Any]:
    """Eager reference and compiled LM step (with a checkpoint resume into a rebuilt module) of one LM case."""
    routed, tokens = LM_CASES[name], lm_tokens(args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: nothing to log to
        eager = Steps()
        module, opt, sched = lm_module(routed, args, compile=False)
        _lm_steps(module, opt, sched, tokens, range(args.steps), eager)
        torch._dynamo.reset()
        counter = CountingBackend(args.backend)
        steps = Steps(counter)
        try:
            with dynamo_log() as log:
                module, opt, sched = lm_module(routed, args, compile=True)
                compile_train_loss(module, counter)
                _lm_steps(module, opt, sched, tokens, range(args.steps), steps)
                saved = _roundtrip({"module": module.state_dict(), "opt": opt.state_dict(),
                                    "sched": sched.state_dict()})
                module, opt, sched = lm_module(routed, args, compile=True)  # rebuilt, then the checkpoint loaded
                module.configure_model()
                module.load_state_dict(saved["module"])
                opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
                compile_train_loss(module, counter)
                _lm_steps(module, opt, sched, tokens, range(args.steps, args.steps + RESUME_STEPS), steps)
            compiled = {**steps.summary(), "graph_breaks": len(log.breaks), "break_reasons": log.grouped_breaks(),
                        "recompile_reasons": log.recompiles}
        except Exception as err:
            steps.close()
            compiled = _failed(err)
    return {"eager": eager.summary(), "compiled": compiled}


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint file would take it."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _failed(err: Exception) -> dict[str, Any]:
    """The compiled result of a case whose compilation failed: the error, no figures."""
    msg = " ".join(str(err).split())
    return {"ms": float("nan"), "cpu_ms": float("nan"), "first_step_s": float("nan"), "graph_breaks": None,
            "recompiles": None, "host_syncs": None, "break_reasons": [], "recompile_reasons": [], "host_sync_sites": {},
            "warmup_graphs": None, "error": f"{type(err).__name__}: {msg[:200]} ... {msg[-300:]}"}


# ----------------------------------------------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cases; print a table, the break, recompile and sync sources, and one JSON line; return the JSON dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*IMAGE_CASES, *LM_CASES]
    p.add_argument("--cases", nargs="+", default=names, choices=names)
    p.add_argument("--steps", type=int, default=5, help="compiled steps before the resume (new augmentation each)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: tracing only, fast)")
    p.add_argument("--size", type=int, default=32, help="image view size")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--seq", type=int, default=64, help="LM tokens per sequence")
    p.add_argument("--lm-batch", type=int, default=4)
    p.add_argument("--out", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the first is warm-up), got {args.steps}")
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = {name: (image_case if name in IMAGE_CASES else lm_case)(name, args) for name in args.cases}

    print(f"\ngraph breaks / recompiles / host syncs per step of the compiled steps (CPU, {torch.get_num_threads()} "
          f"threads, backend {args.backend}, {args.steps} steps + checkpoint resume + {RESUME_STEPS})")
    print(f"  {'case':<22}{'graphs':>7}{'breaks':>7}{'recomp':>7}{'syncs':>6}{'eager ms':>10}{'compiled ms':>12}"
          f"{'ratio':>7}{'eager cpu':>10}{'comp. cpu':>10}{'ratio':>7}{'1st step s':>11}")
    line: dict[str, Any] = {"bench": "graph_breaks", "date": date.today().isoformat(),
                            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                            "torch": torch.__version__, "backend": args.backend, "steps": args.steps}
    for name, r in results.items():
        e, c = r["eager"], r["compiled"]
        ratio = e["ms"] / c["ms"]  # eager / compiled: > 1 means the compiled step is faster; nan when it failed
        cpu_ratio = e["cpu_ms"] / c["cpu_ms"]
        print(f"  {name:<22}{str(c['warmup_graphs']):>7}{str(c['graph_breaks']):>7}{str(c['recompiles']):>7}"
              f"{str(c['host_syncs']):>6}{e['ms']:>10.1f}{c['ms']:>12.1f}{ratio:>7.2f}"
              f"{e['cpu_ms']:>10.1f}{c['cpu_ms']:>10.1f}{cpu_ratio:>7.2f}{c['first_step_s']:>11.1f}")
        failed = bool(c.get("error"))
        line.update({f"{name}_graph_breaks": c["graph_breaks"], f"{name}_recompiles": c["recompiles"],
                     f"{name}_host_syncs_per_step": c["host_syncs"], f"{name}_eager_ms": round(e["ms"], 2),
                     f"{name}_compiled_ms": None if failed else round(c["ms"], 2),
                     f"{name}_speedup": None if failed else round(ratio, 3),
                     f"{name}_eager_cpu_ms": round(e["cpu_ms"], 2),
                     f"{name}_compiled_cpu_ms": None if failed else round(c["cpu_ms"], 2),
                     f"{name}_cpu_speedup": None if failed else round(cpu_ratio, 3)})
    for name, r in results.items():
        c = r["compiled"]
        print(f"\n{name}:")
        for b in c["break_reasons"]:
            at = "" if b["at"] == b["where"] else f"  (at {b['at']})"
            print(f"  break {b['count']:>3} x {b['where']:<28} {b['reason'][:150]}{at}")
        if failed := c.get("error"):
            print(f"  compiled run failed: {failed}")
        for reason in c["recompile_reasons"]:
            print(f"  recompile: {reason}")
        for label, run in (("compiled", c), ("eager", r["eager"])):
            for site, ops in run["host_sync_sites"].items():
                print(f"  {label} host sync: {site:<40} {ops}")
    line["details"] = {name: {"warmup_graphs": r["compiled"]["warmup_graphs"],
                              "graphs_per_step": r["compiled"].get("graphs_per_step"),
                              "first_compiled_step_s": round(r["compiled"]["first_step_s"], 1),
                              "break_reasons": r["compiled"]["break_reasons"],
                              "recompile_reasons": r["compiled"]["recompile_reasons"],
                              "compile_error": r["compiled"].get("error"),
                              "host_sync_sites": r["compiled"]["host_sync_sites"],
                              "eager_host_syncs_per_step": r["eager"]["host_syncs"],
                              "eager_host_sync_sites": r["eager"]["host_sync_sites"]} for name, r in results.items()}
    text = json.dumps(line)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return line


if __name__ == "__main__":
    main()
