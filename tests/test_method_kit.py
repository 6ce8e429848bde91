"""The method kit in zoo: the optimizer spec's groups and schedule, the MLP head builder, the reductions on one
process (their 2-process behaviour: tests/test_barlowtwins.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.models.heads import mlp_head
from zoo.train.distributed import all_gather_grad, all_reduce_sum, world_size
from zoo.errors import UsageError
from zoo.train.optim import LARS, OptimizerSpec, build_optimizer, fused_update, scaled_lr


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


@pytest.mark.parametrize("name, cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_exclusions_split_every_group_and_take_no_decay(name, cls):
    net = _net()
    spec = OptimizerSpec(optimizer=name, weight_decay=0.1, excluded_lr_scale=0.5)
    opt, factor = build_optimizer(spec, [{"params": list(net.parameters())}], peak_lr=2.0, total_steps=10,
                                  warmup_steps=0)
    assert isinstance(opt, cls)
    adapted, excluded = opt.param_groups
    assert [p.ndim for p in adapted["params"]] == [2, 2] and all(p.ndim == 1 for p in excluded["params"])
    assert (adapted["lr"], excluded["lr"]) == (2.0, 1.0)
    if name == "lars":
        assert excluded["exclude"] and not adapted["exclude"]
    else:
        assert (adapted["weight_decay"], excluded["weight_decay"]) == (0.1, 0.0)
    assert factor(0) == 1.0 and factor(10) == 0.0


def test_groups_keep_their_options_and_a_constant_group_holds_its_peak():
    a, b = _net(), _net()
    spec = OptimizerSpec(optimizer="sgd", exclude_bias_norm=False, warmup_steps=2)
    opt, factors = build_optimizer(spec, [{"params": list(a.parameters())},
                                          {"params": list(b.parameters()), "weight_decay": 0.0,
                                           "constant_after_warmup": True}], 1.0, 10, 2)
    assert [len(g["params"]) for g in opt.param_groups] == [6, 6] and opt.param_groups[1]["weight_decay"] == 0.0
    decayed, held = factors
    assert (decayed(1), held(1)) == (0.5, 0.5) and decayed(10) == 0.0 and held(10) == 1.0


def test_scaled_lr_and_spec_overrides():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    spec = OptimizerSpec().replace(base_lr=0.5, weight_decay=None)
    assert spec.base_lr == 0.5 and spec.weight_decay == OptimizerSpec().weight_decay
    with pytest.raises(UsageError, match="model.final_lr_ratio"):
        OptimizerSpec(final_lr_ratio=2.0)


def test_a_fused_step_is_refused_for_an_optimizer_without_one():
    with pytest.raises(UsageError, match="model.optimizer='adamw'.*compile: true"):
        fused_update("adamw", [], torch.zeros(0))


def test_mlp_head_builds_each_methods_layout():
    byol = mlp_head(16, 32, 8)
    assert [type(m).__name__ for m in byol] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert byol[0].bias is not None and byol[3].bias is None
    simsiam = mlp_head(16, 32, 8, layers=3, hidden_bias=False, last_bn=True, last_bn_affine=False)
    assert len(simsiam) == 8 and not simsiam[-1].affine
    with pytest.raises(ValueError, match="at least 1 layer"):
        mlp_head(4, 4, 4, layers=0)


def test_reductions_are_the_identity_on_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert world_size() == 1 and all_gather_grad(x) is x and all_reduce_sum(x) is x
