"""``compile="step"`` (``zoo.train.whole_step``): the whole training step compiled, checked against the eager step.

Fast: two BYOL steps (convnet_tiny, 32 px, batch 8, fp32, CPU) give the eager run's weights, optimizer state and logs
to 1e-5. Slow: five steps with changing view parameters, a non-finite step skipped and a resume from a checkpoint run
with zero graph breaks, zero recompiles after the first step and no host sync, and still match the eager run.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from byol import BYOL
from fault_callbacks import PoisonAt, SigtermAt
from zoo.data import ImageDataModule
from zoo.train.trainer import UsageError, build_trainer
from zoo.train.whole_step import WholeStep

TINY = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=32, projector_hidden=32,
            projection_dim=16, base_lr=0.5, tau_base=0.9, warmup_steps=1, num_classes=10)


def _fit(root, steps, model=None, callbacks=(), ckpt_path=None, **kw):
    torch.manual_seed(0)
    model = model or BYOL(**TINY, **kw)
    trainer = build_trainer(default_root_dir=str(root), max_steps=steps, logger=False, enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, ImageDataModule("digits", batch_size=8, num_workers=0, image_size=32), ckpt_path=ckpt_path)
    return model, trainer


def _assert_close(eager, compiled, atol, logged=("train/loss", "train/cls_loss", "train/online_top1", "train/tau"),
                  buffer_atol=None):
    (m1, t1), (m2, t2) = eager, compiled
    assert t1.global_step == t2.global_step
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.allclose(s1[k].float(), s2[k].float(), atol=atol, rtol=0), k
    o1, o2 = t1.optimizers[0].state_dict()["state"], t2.optimizers[0].state_dict()["state"]
    for i in o1:
        assert torch.allclose(o1[i]["momentum_buffer"], o2[i]["momentum_buffer"], atol=buffer_atol or atol, rtol=0), i
    assert t1.lr_scheduler_configs[0].scheduler.state_dict() == t2.lr_scheduler_configs[0].scheduler.state_dict()
    for k in logged:
        assert torch.allclose(t1.callback_metrics[k], t2.callback_metrics[k], atol=atol), k


def test_compiled_step_matches_eager_on_two_steps(tmp_path):
    eager = _fit(tmp_path / "eager", 2)
    compiled = _fit(tmp_path / "compiled", 2, compile="step")
    model = compiled[0]
    assert not model.automatic_optimization and model._whole_step is not None
    assert model._whole_step.shape == ((8, 3, 32, 32), torch.uint8) and model._whole_step.eager_steps == 0
    _assert_close(eager, compiled, atol=1e-5)
    # the EMA really ran (the target moved away from its initial copy of the online encoder) and matches eager
    assert not torch.equal(model.target_encoder.features[0].weight, model.online_encoder.features[0].weight)


SIMSIAM_TINY = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=32,
                    projector_hidden=32, projection_dim=16, predictor_hidden=8, base_lr=0.5, warmup_steps=1,
                    num_classes=10)


@pytest.mark.slow
def test_simsiam_compiled_step_matches_eager_on_two_steps(tmp_path):
    """SimSiam's whole step (its SGD with a fixed predictor lr as foreach ops, no EMA) trains to the eager numbers.

    Weights, batch-norm statistics and logs agree to 1e-5 (measured: 3e-7). The SGD momentum buffers hold the raw
    gradients, up to 1.2 in size on the first conv (BYOL's LARS buffers are lr-scaled, far smaller), and each is a sum
    over 8 x 32 x 32 positions that inductor's fused batch-norm/conv backward adds in another order: measured 1.1e-5
    apart, i.e. 1e-5 relative, fp32 rounding. They are held to 2e-5."""
    from simsiam import SimSiam

    def fit(root, **kw):
        torch.manual_seed(0)
        return _fit(root, 2, model=SimSiam(**SIMSIAM_TINY, **kw))

    eager, compiled = fit(tmp_path / "eager"), fit(tmp_path / "compiled", compile="step")
    assert compiled[0]._whole_step is not None and compiled[0]._whole_step.eager_steps == 0
    _assert_close(eager, compiled, atol=1e-5, logged=("train/loss", "train/cls_loss", "train/online_top1"),
                  buffer_atol=2e-5)
    lrs = [g["lr"] for g in compiled[1].optimizers[0].param_groups]
    assert lrs[1] > lrs[0]  # the predictor group kept its peak lr while the others decayed: the schedule really ran


@pytest.mark.slow
def test_ddp_two_gloo_processes_compiled_step_matches_eager(tmp_path):
    """compile: step under DDP (2 gloo processes, global batch norm over both ranks, gradients all-reduced by the
    strategy's backward between the two graphs) ends where the eager DDP run ends, on both ranks."""
    from test_ddp import B, _run

    _run(tmp_path / "eager", devices=2, batch=B, steps=2)
    _run(tmp_path / "compiled", devices=2, batch=B, steps=2, compile="step")
    for rank in (0, 1):
        want, got = (torch.load(tmp_path / d / f"rank{rank}.pt", weights_only=True) for d in ("eager", "compiled"))
        assert got["sync_bn"] and want["sync_bn"]
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-5)
        for name, ref in want["state"].items():
            torch.testing.assert_close(got["state"][name], ref, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")


def test_unknown_compile_value_is_refused_naming_it():
    with pytest.raises(UsageError, match=r"model.compile must be .*got 'full'"):
        BYOL(**TINY, compile="full")


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make a GPU wait for the host (item / bool / nonzero / equal) while a step runs."""

    SYNCING = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _outside_mode(fn):
    """``fn`` with the dispatch mode suspended: torch.compile refuses to run under a user dispatch mode, and a compiled
    ``fullgraph=True`` graph cannot hold a sync anyway (an ``.item()`` or a data-dependent shape there is a graph
    break, which fullgraph turns into an error), so the syncs of a step are the ones counted around the graphs."""
    def call(*args):
        with _disable_current_modes():
            return fn(*args)
    return call


class StepProbe(pl.Callback):
    """Per step: host syncs (inside the training step only) and dynamo's compiled-graph count after the step."""

    def __init__(self):
        self.syncs, self.graphs = [], []

    def on_train_batch_start(self, trainer, module, batch, idx):
        ws = module._whole_step
        if ws is None:
            ws = module._whole_step = WholeStep(module._step_forward, module._step_update)
        if not getattr(ws, "probed", False):
            ws.forward, ws.update, ws.restore = (_outside_mode(f) for f in (ws.forward, ws.update, ws.restore))
            ws.probed = True
        self.mode = SyncCounter()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        self.mode.__exit__(None, None, None)
        self.syncs.append(self.mode.count)
        from torch._dynamo.utils import counters
        self.graphs.append(counters["stats"]["unique_graphs"])


@pytest.mark.slow
def test_compiled_step_has_no_graph_break_no_recompile_no_sync_and_resumes(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    probe = StepProbe()
    poison = [PoisonAt(step=1, restore=True)]  # step 1's loss is NaN: skipped without a host sync
    torch.manual_seed(0)  # the same initial weights as the eager run's
    model = BYOL(**TINY, compile="step", nan_policy="skip")
    with pytest.raises(SystemExit):  # preempted after step 3 (same 5-step schedule as the eager run)
        _fit(tmp_path / "compiled", 5, model=model, callbacks=[probe, *poison, SigtermAt(step=3)])
    last = tmp_path / "compiled" / "checkpoints" / "last.ckpt"
    # resume the same module from the checkpoint (new trainer, new optimizer state tensors): no recompile either
    model, trainer = _fit(tmp_path / "compiled", 5, model=model, callbacks=[probe], ckpt_path=str(last))
    assert trainer.global_step == 5 and model._whole_step.eager_steps == 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert probe.graphs[0] >= 3  # forward (+ its backward), update, restore: compiled on the first step
    # steps 2-5 (new view draws each step, a skipped step, a resume): no recompile
    assert probe.graphs == probe.graphs[:1] * 5, probe.graphs
    assert probe.syncs == [0] * 5, probe.syncs  # skip policy: the finite flag never goes to the host
    assert float(model._nonfinite) == 1.0  # the poisoned step was counted
    # and the same five steps eagerly (poison, skip, no interruption) end at the same state
    eager = _fit(tmp_path / "eager", 5, callbacks=[PoisonAt(step=1, restore=True)], nan_policy="skip")
    _assert_close(eager, (model, trainer), atol=1e-4)
    # dynamo's own account of the forward graph: one graph, no break (last: it runs a training-mode forward, which
    # moves the batch-norm statistics)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    params = model.view_params(images, torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model._step_forward)(images, params, torch.zeros(8, dtype=torch.long))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
