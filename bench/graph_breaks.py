"""Graph breaks, recompiles, host syncs and compiled/eager step time of the BYOL and LM training steps, on CPU.

Each case builds its module through the public constructor and drives one whole training step (augmentation,
forwards, loss, NaN guard, backward, optimizer, EMA) through a small step function below. That step is
  1. traced once by ``torch._dynamo.explain``: graphs, graph breaks and each break's reason and source line;
  2. run eagerly under ``zoo.train.host_sync.count_host_syncs``: host syncs per step and where they come from;
  3. run under ``torch.compile`` for ``--steps`` steps (new per-sample augmentation parameters every step), then the
     state is saved, the module and optimizer rebuilt from their constructors, the state loaded, and two more steps
     run through the same compiled function. Every graph compiled after the first step counts as a recompile.
Prints a table and ONE JSON line with ``<case>_graph_breaks`` and ``<case>_recompiles`` per case (the issue-18 target:
all zero) plus host syncs per step, eager and compiled ms per step and their ratio.

    python bench/graph_breaks.py                                  # all four cases, inductor (minutes on 2 cores)
    python bench/graph_breaks.py --cases byol_convnet_tiny --backend eager --steps 2 --size 16 --batch 4

When a module exposes a whole-step function, point ``byol_step`` / ``lm_step`` at it (marked ``SWITCH``).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, not bench/, for `import augment`

from zoo.train.host_sync import count_host_syncs  # noqa: E402

RESUME_STEPS = 2  # steps run after the rebuild + load


@dataclass
class Built:
    """One freshly built case: the module, its optimizer and scheduler, and a batch maker ``batch(step)``."""

    module: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    batch: Callable[[int], Any]


# ------------------------------------------------------------------------------------------------------------ BYOL
def build_byol(encoder: str, size: int, batch: int, total_steps: int) -> Built:
    """A BYOL module (public constructor), its LARS optimizer and warmup-cosine schedule, random uint8 images."""
    from byol import BYOL
    from byol.functional import lr_schedule
    from byol.lars import LARS, lars_param_groups

    torch.manual_seed(0)
    module = BYOL(encoder=encoder, image_size=size, num_classes=10, projector_hidden=256, projection_dim=64,
                  warmup_steps=1)
    module.total_steps = total_steps  # what configure_optimizers sets under a Trainer (the tau schedule's length)
    online = [(n, p) for n, p in module.named_parameters() if not n.startswith("target_")]
    opt = LARS(lars_param_groups(online), lr=0.2 * batch / 256, momentum=0.9, weight_decay=1.5e-6, eta=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, total_steps, 1, 1.0))
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, size + size // 4, size + size // 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(batch) % 10
    return Built(module, opt, sched, lambda step: {"image": images, "label": labels})


def byol_step(module, opt, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """One BYOL step as ``BYOL.training_step`` + ``optimizer_step`` take it today (SWITCH: the module's own
    whole-step function once it has one)."""
    from byol.functional import byol_loss, tau_schedule
    from zoo.train.trainer import check_finite_loss

    gen = torch.Generator().manual_seed(1_000_003 * step)  # new per-sample parameters every step, as in training
    v1, v2 = module.view1(batch["image"], gen), module.view2(batch["image"], gen)
    h1, h2 = module.online_encoder(v1), module.online_encoder(v2)
    q1, q2 = module.online_predictor(module.online_projector(h1)), module.online_predictor(module.online_projector(h2))
    with torch.no_grad():
        z1, z2 = module.target_projector(module.target_encoder(v1)), module.target_projector(module.target_encoder(v2))
    loss = byol_loss(q1, q2, z1, z2)
    logits = module.online_classifier(h1.detach())
    total = loss + F.cross_entropy(logits.float(), batch["label"])
    check_finite_loss(module, total, "stop")
    total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    module.update_target(tau_schedule(step + 1, module.total_steps, module.hparams.tau_base))
    return total.detach()


# -------------------------------------------------------------------------------------------------------------- LM
def build_lm(routed: bool, seq: int, batch: int, total_steps: int) -> Built:
    """A tiny Gemma 2 ``lm.CausalLM`` (dense or S-BASE routed FFN), its AdamW + schedule, random byte tokens."""
    from lm import CausalLM

    torch.manual_seed(0)
    overrides: dict[str, Any] = dict(n_layers=2, d_model=64, d_ff=128, n_heads=2, n_kv_heads=1, head_dim=32,
                                     window=seq // 2)
    if routed:
        overrides.update(ffn="routed", n_experts=4)
    module = CausalLM(model="gemma2-tiny", model_overrides=overrides, warmup_steps=1, total_steps=total_steps)
    conf = module.configure_optimizers()  # needs no Trainer when total_steps is given
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (total_steps + RESUME_STEPS + 1, batch, seq + 1), generator=g)
    return Built(module, conf["optimizer"], conf["lr_scheduler"]["scheduler"], lambda step: tokens[step])


def lm_step(module, opt, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """One LM step: ``CausalLM.training_step`` (forward, loss, routing losses), backward, AdamW (SWITCH: the
    module's own whole-step function once it has one)."""
    loss = module.training_step(tokens, step)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def cases(args) -> dict[str, tuple[Callable[[], Built], Callable]]:
    """Case name -> (builder, step function)."""
    n = args.steps
    return {
        "byol_convnet_tiny": (lambda: build_byol("convnet_tiny", args.size, args.batch, n), byol_step),
        "byol_resnet18": (lambda: build_byol("resnet18", args.size, args.batch, n), byol_step),
        "lm_gemma2_dense": (lambda: build_lm(False, args.seq, args.lm_batch, n), lm_step),
        "lm_gemma2_routed": (lambda: build_lm(True, args.seq, args.lm_batch, n), lm_step),
    }


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


class _BreakLog(logging.Handler):
    """Collects dynamo's graph-break log records: each break's innermost frame, the innermost frame in this repo (the
    line to change) and the reason (its first explanatory line)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.breaks: list[dict[str, str]] = []
        self._ours: dict[str, str] = {}  # innermost frame -> repo frame, for breaks logged without their stack

    def emit(self, record: logging.LogRecord) -> None:
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


@contextmanager
def graph_break_log() -> Iterator[_BreakLog]:
    """Record dynamo's graph breaks (``torch._logging`` artifact ``graph_breaks``) made inside the block."""
    handler = _BreakLog()
    torch._logging.set_logs(graph_breaks=True)  # (re)installs torch's handlers: ours goes on after it
    dynamo = logging.getLogger("torch._dynamo")  # does not propagate to "torch"
    saved = dynamo.handlers[:]
    dynamo.handlers = [handler]  # the breaks go to the table, not as pages of stderr
    try:
        yield handler
    finally:
        dynamo.handlers = saved
        torch._logging.set_logs()


def explain(step: Callable, built: Built) -> dict[str, Any]:
    """Graphs, graph breaks and (reason, source line) of each break in one traced step."""
    torch._dynamo.reset()
    with graph_break_log() as log:
        out = torch._dynamo.explain(step)(built.module, built.opt, built.batch(0), 0)
    grouped: dict[tuple[str, str, str], int] = {}
    for b in log.breaks:  # a break inside a loop (one per layer) is one line with a count
        key = (b["where"], b["at"], b["reason"])
        grouped[key] = grouped.get(key, 0) + 1
    reasons = [{"where": w, "at": a, "reason": r, "count": n} for (w, a, r), n in grouped.items()]
    # Every break dynamo logged, nested frames included (explain's own count leaves some of those out).
    return {"graphs": out.graph_count, "graph_breaks": len(log.breaks), "explain_graph_breaks": out.graph_break_count,
            "break_reasons": reasons}


def eager_run(build: Callable[[], Built], step: Callable, steps: int) -> dict[str, Any]:
    """Eager ms per step (steps after the first) and host syncs per step with their sources."""
    built = build()
    times, syncs = [], []
    for i in range(steps):
        with count_host_syncs() as s:
            t0 = time.perf_counter()
            step(built.module, built.opt, built.batch(i), i)
            times.append(time.perf_counter() - t0)
        built.sched.step()
        syncs.append(s)
    last = syncs[-1]
    return {"ms": 1e3 * statistics.median(times[1:] or times), "host_syncs": last.total,
            "host_sync_sites": {site: dict(ops) for site, ops in last.per_site_ops().items()}}


def compiled_run(build: Callable[[], Built], step: Callable, steps: int, backend: str) -> dict[str, Any]:
    """Compiled ms per step, graphs compiled at warm-up and recompiles over ``steps`` steps plus a resume."""
    torch._dynamo.reset()
    counter = CountingBackend(backend)
    fn = torch.compile(step, backend=counter)
    built = build()
    times, graphs = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(built.module, built.opt, built.batch(i), i)
        times.append(time.perf_counter() - t0)
        built.sched.step()
        graphs.append(counter.graphs)
    # Resume: the state goes through torch.save/torch.load into a module and optimizer rebuilt from scratch.
    buf = io.BytesIO()
    torch.save({"module": built.module.state_dict(), "opt": built.opt.state_dict(),
                "sched": built.sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    built = build()
    built.module.load_state_dict(state["module"])
    built.opt.load_state_dict(state["opt"])
    built.sched.load_state_dict(state["sched"])
    for i in range(steps, steps + RESUME_STEPS):
        fn(built.module, built.opt, built.batch(i), i)
        built.sched.step()
    warm = graphs[0]
    recompile_reasons = sorted({" ".join(str(k).split())[:200] for k in torch._dynamo.utils.counters["recompiles"]}) \
        if "recompiles" in torch._dynamo.utils.counters else []
    return {"ms": 1e3 * statistics.median(times[1:] or times), "warmup_graphs": warm,
            "recompiles": counter.graphs - warm, "recompile_reasons": recompile_reasons}


def run_case(name: str, build: Callable[[], Built], step: Callable, args) -> dict[str, Any]:
    """All measurements of one case."""
    res: dict[str, Any] = {"explain": explain(step, build())}
    res["eager"] = eager_run(build, step, args.steps)
    try:
        res["compiled"] = compiled_run(build, step, args.steps, args.backend)
    except Exception as err:  # a compiler failure is a finding to report, not a reason to lose the other cases
        msg = " ".join(str(err).split())
        res["compiled"] = {"ms": float("nan"), "recompiles": None, "recompile_reasons": [],
                           "error": f"{type(err).__name__}: {msg[:200]} ... {msg[-300:]}"}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cases; print a table, the break and sync sources, and one JSON line; return the JSON dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["byol_convnet_tiny", "byol_resnet18", "lm_gemma2_dense", "lm_gemma2_routed"]
    p.add_argument("--cases", nargs="+", default=names, choices=names)
    p.add_argument("--steps", type=int, default=5, help="compiled steps before the resume (new augmentation each)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: tracing only, fast)")
    p.add_argument("--size", type=int, default=32, help="BYOL view size")
    p.add_argument("--batch", type=int, default=8, help="BYOL images per step")
    p.add_argument("--seq", type=int, default=64, help="LM tokens per sequence")
    p.add_argument("--lm-batch", type=int, default=4)
    p.add_argument("--out", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the first is warm-up), got {args.steps}")
    table = cases(args)
    results = {name: run_case(name, *table[name], args) for name in args.cases}

    print(f"\ngraph breaks / recompiles / host syncs per step (CPU, {torch.get_num_threads()} threads, "
          f"backend {args.backend}, {args.steps} steps + resume)")
    print(f"  {'case':<20}{'graphs':>7}{'breaks':>7}{'recomp':>7}{'syncs':>6}{'eager ms':>10}{'compiled ms':>12}"
          f"{'ratio':>7}")
    line: dict[str, Any] = {"bench": "graph_breaks", "date": date.today().isoformat(),
                            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                            "torch": torch.__version__, "backend": args.backend, "steps": args.steps}
    for name, r in results.items():
        e, c, x = r["eager"], r["compiled"], r["explain"]
        ratio = e["ms"] / c["ms"]  # nan when the compiled run failed
        print(f"  {name:<20}{x['graphs']:>7}{x['graph_breaks']:>7}{str(c['recompiles']):>7}{e['host_syncs']:>6}"
              f"{e['ms']:>10.1f}{c['ms']:>12.1f}{ratio:>7.2f}")
        line.update({f"{name}_graph_breaks": x["graph_breaks"], f"{name}_recompiles": c["recompiles"],
                     f"{name}_host_syncs_per_step": e["host_syncs"], f"{name}_eager_ms": round(e["ms"], 2),
                     f"{name}_compiled_ms": None if c.get("error") else round(c["ms"], 2),
                     f"{name}_speedup": None if c.get("error") else round(ratio, 3)})
    for name, r in results.items():
        print(f"\n{name}: graph breaks")
        for b in r["explain"]["break_reasons"]:
            at = "" if b["at"] == b["where"] else f"  (at {b['at']})"
            print(f"  {b['count']:>3} x {b['where']:<28} {b['reason'][:150]}{at}")
        if r["compiled"].get("error"):
            print(f"  compiled run failed: {r['compiled']['error']}")
        for reason in r["compiled"]["recompile_reasons"]:
            print(f"  recompile: {reason}")
        print(f"{name}: host syncs in one step")
        for site, ops in r["eager"]["host_sync_sites"].items():
            print(f"  {site:<40} {ops}")
    line["details"] = {name: {"graphs": r["explain"]["graphs"],
                              "explain_graph_breaks": r["explain"]["explain_graph_breaks"],
                              "break_reasons": r["explain"]["break_reasons"],
                              "recompile_reasons": r["compiled"]["recompile_reasons"],
                              "compile_error": r["compiled"].get("error"),
                              "host_sync_sites": r["eager"]["host_sync_sites"]} for name, r in results.items()}
    text = json.dumps(line)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return line


if __name__ == "__main__":
    main()
