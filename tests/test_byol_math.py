"""BYOL's pure pieces against hand-computed values: loss, tau schedule, lr schedule, one LARS step."""
import math

import pytest
import torch

from byol import LARS, byol_loss, lars_param_groups, lr_schedule, regression_loss, scaled_lr, tau_schedule


def test_regression_loss_is_two_minus_two_cos_and_stops_target_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    loss = regression_loss(p, z)
    assert torch.allclose(loss, torch.tensor([2.0, 0.0]), atol=1e-6)  # orthogonal -> 2, parallel -> 0
    loss.sum().backward()
    assert z.grad is None and p.grad is not None


def test_byol_loss_sums_both_directions_and_averages_batch():
    q1 = torch.tensor([[1.0, 0.0]]); z2 = torch.tensor([[-1.0, 0.0]])  # opposite: 4
    q2 = torch.tensor([[0.0, 1.0]]); z1 = torch.tensor([[1.0, 0.0]])   # orthogonal: 2
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(6.0)
    big = byol_loss(torch.randn(64, 8), torch.randn(64, 8), torch.randn(64, 8), torch.randn(64, 8)).item()
    assert 0.0 <= big <= 8.0


def test_tau_schedule_hand_values():
    assert tau_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert tau_schedule(100, 100, 0.996) == pytest.approx(1.0)
    assert tau_schedule(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)  # cos(pi/2) = 0
    assert tau_schedule(25, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    with pytest.raises(ValueError, match="total_steps"):
        tau_schedule(0, 0, 0.99)


def test_lr_schedule_warmup_then_cosine_to_zero():
    peak = scaled_lr(0.2, 4096)
    assert peak == pytest.approx(3.2)
    assert lr_schedule(0, 1000, 100, peak) == 0.0
    assert lr_schedule(50, 1000, 100, peak) == pytest.approx(1.6)
    assert lr_schedule(100, 1000, 100, peak) == pytest.approx(3.2)
    assert lr_schedule(550, 1000, 100, peak) == pytest.approx(1.6)  # half-way through the cosine
    assert lr_schedule(1000, 1000, 100, peak) == pytest.approx(0.0, abs=1e-12)
    # the paper's 1000-epoch ImageNet run: 312,784 steps at batch 4096, 10 warmup epochs
    steps_per_epoch = 1_281_167 // 4096
    assert 1000 * 1_281_167 // 4096 == 312_784
    assert lr_schedule(10 * steps_per_epoch, 312_784, 10 * steps_per_epoch, peak) == pytest.approx(peak)


def test_lars_one_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    w.grad = torch.tensor([[0.3, -0.4]])
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([{"params": [w], "exclude": False}, {"params": [b], "exclude": True}], lr=0.1, momentum=0.9,
               weight_decay=0.1, eta=1e-3)
    opt.step()
    u = torch.tensor([[0.3 + 0.3, -0.4 + 0.4]])  # g + wd * w = [0.6, 0.0], ||u|| = 0.6
    trust = 1e-3 * 5.0 / 0.6
    assert torch.allclose(w.data, torch.tensor([[3.0, 4.0]]) - 0.1 * trust * u, atol=1e-7)
    assert torch.allclose(b.data, torch.tensor([1.0 - 0.05, -1.0 - 0.05]))  # excluded: plain momentum SGD
    # second step: momentum buffer m = 0.9 m + u'
    w.grad = torch.zeros_like(w); b.grad = torch.zeros_like(b)
    before = b.data.clone()
    opt.step()
    assert torch.allclose(b.data, before - 0.1 * 0.9 * torch.tensor([0.5, 0.5]))


def test_lars_trust_ratio_is_one_when_a_norm_is_zero():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0).step()
    assert torch.allclose(w.data, -torch.ones(2, 2))


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_multi_tensor_step_equals_the_per_tensor_formula(foreach):
    """Three steps over many tensors (one with zero weights, one without a gradient) against the formula, per tensor,
    in both schedules (per-tensor loop: the CPU default; multi-tensor: the CUDA default)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 5), torch.nn.Linear(5, 2, bias=False))
    with torch.no_grad():
        net[3].weight.zero_()
    frozen_grad = net[4].weight
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in ref.items()}
    opt = LARS(lars_param_groups(net.named_parameters()), lr=0.3, momentum=0.9, weight_decay=1e-2, eta=1e-2,
               foreach=foreach)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        net(torch.randn(8, 3, 6, 6)).square().mean().backward()
        frozen_grad.grad = None
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
        for n, w in ref.items():
            g = grads[n]
            if g is None:
                continue
            u = g
            if w.ndim > 1:
                u = g + 1e-2 * w
                wn, un = w.norm(), u.norm()
                u = u * (1e-2 * wn / un if wn > 0 and un > 0 else 1.0)
            mom[n] = 0.9 * mom[n] + u
            ref[n] = w - 0.3 * mom[n]
        for n, p in net.named_parameters():
            assert torch.allclose(p, ref[n], atol=1e-6), n  # the tensor without a gradient stays at its start


def test_lars_groups_exclude_biases_and_norms():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    adapted, excluded = lars_param_groups(net.named_parameters())
    assert len(adapted["params"]) == 2 and len(excluded["params"]) == 4
    assert excluded["exclude"] and not adapted["exclude"]
    with pytest.raises(ValueError, match="lr"):
        LARS(net.parameters(), lr=-1.0)
