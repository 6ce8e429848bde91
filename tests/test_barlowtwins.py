"""Barlow Twins: the loss is the paper's (against its pseudocode), the cross-correlation is over the global batch
(2 gloo processes == 1 process, loss and gradients), and the recipe is the paper's LARS."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from barlowtwins import BarlowTwins, barlow_twins_loss, cross_correlation, off_diagonal
from zoo.train.optim import LARS, build_optimizer
from zoo.errors import UsageError

N, D_IN, D = 16, 12, 8  # global batch, projector input, projection width
EPS32 = torch.finfo(torch.float32).eps


def _paper_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Algorithm 1 of the paper with the authors' nn.BatchNorm1d(affine=False) (training mode) as the normalisation."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + lambd * off


def test_loss_is_the_papers_algorithm():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    # N*D-term sums in fp32 on both sides (different summation orders): a few eps times the terms, relative
    torch.testing.assert_close(barlow_twins_loss(z1, z2, 5e-3), _paper_loss(z1, z2, 5e-3), rtol=N * D * EPS32, atol=0)
    c = cross_correlation(z1, z1)
    var = z1.var(0, unbiased=False)
    # a view with itself: C_ii = var / (var + eps), 1 up to the batch norm's eps (N-term sums: N * eps rounding)
    torch.testing.assert_close(torch.diagonal(c), var / (var + 1e-5), rtol=N * EPS32, atol=0)
    m = torch.arange(16.0).view(4, 4)
    assert off_diagonal(m).tolist() == [v for i, v in enumerate(range(16)) if i % 5]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    proj = nn.Linear(D_IN, D)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(D, D_IN, generator=g))
        proj.bias.copy_(torch.randn(D, generator=g))
    return x1, x2, proj.state_dict()


def _loss_and_grads(x1, x2, state, world: int) -> tuple[float, dict[str, torch.Tensor], float]:
    """(loss, parameter gradients as DDP leaves them, the largest term |dL/dz| * max(1, |x|) those gradients sum)."""
    proj = nn.Linear(D_IN, D)
    proj.load_state_dict(state)
    z1, z2 = proj(x1), proj(x2)
    z1.retain_grad(), z2.retain_grad()
    loss = barlow_twins_loss(z1, z2, 5e-3)
    loss.backward()
    term = float(torch.cat([z1.grad, z2.grad]).abs().max()) * max(1.0, float(torch.cat([x1, x2]).abs().max()))
    grads = {n: p.grad.clone() for n, p in proj.named_parameters()}
    if world > 1:  # what DDP does with the gradients: the mean over ranks
        for g in grads.values():
            dist.all_reduce(g)
            g.div_(world)
    return float(loss.detach()), grads, term


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x1, x2, state = _inputs()
        rows = slice(rank * N // world, (rank + 1) * N // world)  # this rank's block of the global batch
        loss, grads, _ = _loss_and_grads(x1[rows], x2[rows], state, world)
        torch.save({"loss": loss, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_the_one_process_loss_and_gradients_at_the_same_global_batch(tmp_path):
    x1, x2, state = _inputs()
    loss1, grads1, term = _loss_and_grads(x1, x2, state, 1)
    mp.start_processes(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # The gathered batch is the one process's batch, row for row: the loss takes the very same fp32 operations.
        assert got["loss"] == pytest.approx(loss1, rel=N * D * EPS32, abs=0)
        for name, g in grads1.items():
            # Each gradient entry sums 2N terms (both views' rows), each bounded by ``term``, and every dL/dz itself
            # comes from D-term sums: 2 processes add them in another order, so they may differ by (2N * D) * eps
            # times the largest term (the bias gradient is 0 analytically: both sides are pure rounding there).
            tol = 2 * N * D * EPS32 * term
            torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=tol)


def test_recipe_is_the_papers_lars_with_the_bias_and_norm_lr():
    m = BarlowTwins(encoder="convnet_tiny", encoder_overrides={"widths": [8, 8, 8, 16]}, image_size=16,
                    num_classes=10, projector_hidden=32, projection_dim=16)
    spec = m.optim_spec
    assert (spec.optimizer, spec.base_lr, spec.weight_decay, spec.warmup_epochs) == ("lars", 0.2, 1.5e-6, 10.0)
    assert spec.excluded_lr_scale == pytest.approx(0.0048 / 0.2)
    opt, factor = build_optimizer(spec, m.optimizer_groups(), peak_lr=0.2 * 2048 / 256, total_steps=100,
                                  warmup_steps=10)
    assert isinstance(opt, LARS)
    weights, biases = opt.param_groups
    assert not weights["exclude"] and biases["exclude"]
    assert weights["lr"] == pytest.approx(0.2 * 8) and biases["lr"] == pytest.approx(0.0048 * 8)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert factor(0) == 0.0 and factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(1e-3)
    # the projector: 3 linear layers without biases, BN + ReLU after the hidden ones, nothing after the last
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(x.bias is None for x in m.projector if isinstance(x, nn.Linear))


@pytest.mark.parametrize("kw, key", [({"lambd": -1.0}, "model.lambd"), ({"projection_dim": 0}, "model.projection_dim"),
                                     ({"base_lr": 0.0}, "model.base_lr"), ({"optimizer": "adam"}, "model.optimizer")])
def test_bad_values_are_one_line_naming_the_key(kw, key):
    with pytest.raises(UsageError, match=key):
        BarlowTwins(**{"encoder": "convnet_tiny", "image_size": 16, "num_classes": 10, "projector_hidden": 8,
                       "projection_dim": 8, **kw})
