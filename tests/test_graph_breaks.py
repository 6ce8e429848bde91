"""The host-sync counter (zoo.train.host_sync) and the compile report of bench/graph_breaks.py (issue 18)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from zoo.train.host_sync import count_host_syncs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import graph_breaks  # noqa: E402

HERE = Path(__file__).name


def _count(fn) -> tuple[int, dict]:
    with count_host_syncs() as s:
        fn()
    return s.total, dict(s.by_op)


def test_scalar_reads_count_one_each():
    x = torch.randn(6)
    assert _count(lambda: x.sum().item()) == (1, {"item": 1})
    assert _count(lambda: int(x.argmax())) == (1, {"item": 1})
    assert _count(lambda: float(x.max())) == (1, {"item": 1})

    def branch():
        if x.sum() > 0:  # `if tensor:` asks the device for the value
            return 1
        return 0
    assert _count(branch) == (1, {"item": 1})
    assert _count(lambda: torch.allclose(x, x)) == (1, {"item": 1})


def test_data_dependent_shapes_and_host_copies_count():
    x = torch.randn(6)
    assert _count(lambda: torch.nonzero(x > 0)) == (1, {"nonzero": 1})
    assert _count(lambda: x[x > 0]) == (1, {"mask_index": 1})
    assert _count(lambda: x.masked_select(x > 0)) == (1, {"masked_select": 1})
    assert _count(lambda: torch.unique(x)) == (1, {"unique": 1})
    assert _count(lambda: torch.equal(x, x)) == (1, {"equal": 1})
    assert _count(lambda: x.tolist()) == (1, {"tolist": 1})
    assert _count(lambda: x.cpu()) == (1, {"cpu": 1})
    assert _count(lambda: torch.bincount(torch.tensor([0, 2]), minlength=3)) == (1, {"bincount": 1})


def test_pure_arithmetic_forward_backward_and_optimizer_make_no_sync():
    w = torch.randn(4, 3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)

    def step():
        x = torch.randn(5, 4)
        loss = torch.where(torch.isfinite(x), x, 0.0).matmul(w).relu().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert _count(step) == (0, {})


def test_call_site_names_the_line_outside_torch_and_methods_are_restored():
    x = torch.randn(3)
    original = torch.Tensor.tolist
    with count_host_syncs() as s:
        x.sum().item()
        line = sys._getframe().f_lineno - 1
        torch.nonzero(x)
    assert s.by_site == {f"tests/{HERE}:{line}": 1, f"tests/{HERE}:{line + 2}": 1}
    assert s.events == [("item", f"tests/{HERE}:{line}"), ("nonzero", f"tests/{HERE}:{line + 2}")]
    assert "item x1" in s.report() and f"{HERE}:{line}" in s.report()
    assert torch.Tensor.tolist is original
    with count_host_syncs() as none:
        pass
    assert none.total == 0 and none.report() == "no host syncs"


def test_bench_json_line_has_the_keys_and_zero_breaks_on_the_tiniest_case(tmp_path, capsys):
    """The compiled LM step (CausalLM's compiled train loss, fused AdamW), traced by dynamo: no break, no recompile
    over two steps and a checkpoint resume into a rebuilt module, no host sync; the eager step's syncs are listed."""
    out = tmp_path / "line.json"
    line = graph_breaks.main(["--cases", "lm_gemma2_dense", "--backend", "eager", "--steps", "2", "--seq", "8",
                              "--lm-batch", "1", "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.read_text().strip() == printed
    for suffix in ("graph_breaks", "recompiles", "host_syncs_per_step", "eager_ms", "compiled_ms", "speedup"):
        key = f"lm_gemma2_dense_{suffix}"
        assert key in line and line[key] >= 0, key
    assert line["lm_gemma2_dense_graph_breaks"] == line["lm_gemma2_dense_recompiles"] == 0
    assert line["lm_gemma2_dense_host_syncs_per_step"] == 0
    details = line["details"]["lm_gemma2_dense"]
    assert details["compile_error"] is None and details["warmup_graphs"] == 1
    assert details["graphs_per_step"] == [1] * 4  # 2 steps, then 2 after the resume: the one graph, never again
    assert details["break_reasons"] == [] and details["recompile_reasons"] == []


def test_break_log_groups_breaks_and_keeps_recompile_reasons():
    """What the report lists when a step does break or recompile: the line, the reason, a count per loop pass."""
    def noisy(x):
        print("host side effect")  # a graph break, once per call
        return x + 1

    def step(x, n):
        return noisy(noisy(x)) * n

    torch._dynamo.reset()
    counter = graph_breaks.CountingBackend("eager")
    fn = torch.compile(step, backend=counter)
    with graph_breaks.dynamo_log() as log:
        fn(torch.zeros(2), 1)
        fn(torch.zeros(3), 1)  # a new shape: recompiles (dynamic shapes are only tried on the second one)
    assert len(log.breaks) >= 2 and all(b["where"].startswith(f"tests/{HERE}:") for b in log.breaks)
    grouped = log.grouped_breaks()
    assert sum(g["count"] for g in grouped) == len(log.breaks) and any(g["count"] >= 2 for g in grouped)
    assert log.recompiles and counter.graphs > 3


@pytest.mark.slow
def test_every_compiled_step_runs_without_breaks_recompiles_or_host_syncs():
    """All five cases (BYOL convnet_tiny and resnet18, SimSiam, Gemma 2 dense and routed): 5 steps with new view
    parameters / tokens each, a checkpoint resume into a rebuilt module, 2 more steps. Traced by dynamo only (the
    eager backend): breaks and recompiles are dynamo's whatever compiles the graphs."""
    line = graph_breaks.main(["--backend", "eager"])
    counts = {k: v for k, v in line.items() if k.endswith(("_graph_breaks", "_recompiles", "_host_syncs_per_step"))}
    assert len(counts) == 15 and all(v == 0 for v in counts.values()), counts
    for name, details in line["details"].items():
        assert details["compile_error"] is None, (name, details["compile_error"])
        # forward (+ its AOT backward), update, restore for the images; the one train-loss graph for the LM
        assert details["warmup_graphs"] == (1 if name.startswith("lm_") else 3), name
        assert len(set(details["graphs_per_step"])) == 1 and len(details["graphs_per_step"]) == 7, name
    # the eager steps do sync (augmentation's data-dependent masks, the NaN guard, the router's counts): the counter
    # sees them, so the compiled steps' zeros are not a blind counter
    assert line["details"]["byol_convnet_tiny"]["eager_host_syncs_per_step"] > 0
    assert line["details"]["lm_gemma2_routed"]["eager_host_syncs_per_step"] > 0
