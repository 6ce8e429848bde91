"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction") on the shared
image-pretraining base: its projector (the kit's ``mlp_head``), its loss and its recipe (the kit's LARS).

The loss (Eq. 1-2): ``C = BN(z1)^T BN(z2) / N``, ``L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`` with the
batch normalisation (no affine) and ``C`` over the *global* batch. Every rank gathers the projections of all ranks
(``zoo.train.distributed.all_gather_grad``) and computes the same loss; with DDP's gradient mean this is exactly the
gradient of one process at the global batch. Why a gather rather than all-reducing the ``D x D`` sums of ``C``: it
moves ``2 x N x D`` floats instead of ``D^2`` (at the paper's N = 2048, D = 8192: 33.5M instead of 67.1M), needs no
separate statistics pass, and the gradient flows through one differentiable collective; the price is that every
rank multiplies the full ``D x N`` by ``N x D`` (W times the per-rank FLOPs of the all-reduce variant, cheap next to
the encoder at these sizes).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.models.heads import mlp_head
from zoo.train.distributed import all_gather_grad
from zoo.train.optim import OptimizerSpec
from zoo.train.ssl import ImagePretraining, check_sizes
from zoo.errors import UsageError

__all__ = ["BarlowTwins", "barlow_twins_loss", "cross_correlation", "off_diagonal"]

BN_EPS = 1e-5  # the paper code's nn.BatchNorm1d(affine=False) default


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (no copy of the diagonal)."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _standardize(z: torch.Tensor) -> torch.Tensor:
    """Batch norm without affine, in training mode: ``(z - mean) / sqrt(biased var + eps)`` over dim 0."""
    centred = z - z.mean(0)
    return centred * torch.rsqrt(centred.pow(2).mean(0) + BN_EPS)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``C = BN(z1)^T BN(z2) / N`` [D, D] over the global batch (all ranks' rows; this rank's alone on one process),
    in float32 so bf16 autocast does not round the correlations."""
    z1, z2 = all_gather_grad(z1.float()), all_gather_grad(z2.float())
    return _standardize(z1).T @ _standardize(z2) / z1.shape[0]


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` of the global cross-correlation (Eq. 1)."""
    c = cross_correlation(z1, z2)
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()


class BarlowTwins(ImagePretraining):
    """Barlow Twins: encoder + projector on both views, the cross-correlation loss; no predictor, no target.

    Paper defaults (ImageNet, ResNet-50): projector 8192-8192-8192 (BN + ReLU after the hidden layers, none after
    the last, no biases), lambda 5e-3, the BYOL views, LARS with lr 0.2 for weights and 0.0048 for biases and
    batch-norm parameters (per 256 images; batch 2048), weight decay 1.5e-6, 10 warmup epochs, cosine decay to
    1/1000 of the peak (``optimizer_defaults``; each a ``model.*`` key of ``ImagePretraining``).

    Args:
        projector_hidden: width of the projector's hidden layers (8192).
        projection_dim: output width of the projector, the side of the cross-correlation matrix (8192).
        projector_layers: linear layers of the projector (3).
        lambd: weight of the off-diagonal (redundancy reduction) term (5e-3).
        **kwargs: the base's arguments (``zoo.train.ssl.ImagePretraining``: encoder, image_size, views, optimizer,
            compile, ...).
    """

    # The same module and metric names as BYOL and SimSiam, so ``--which online``, the probe's and the export's
    # defaults and ``val/online_top1`` monitors read every image method alike.
    encoder_attrs = {"online": "online_encoder"}
    classifier_attr = "online_classifier"
    metric_prefix = "online"
    optimizer_defaults = OptimizerSpec(optimizer="lars", base_lr=0.2, weight_decay=1.5e-6, momentum=0.9,
                                       lars_eta=1e-3, exclude_bias_norm=True, excluded_lr_scale=0.0048 / 0.2,
                                       warmup_epochs=10.0, final_lr_ratio=1e-3)

    def __init__(self, projector_hidden: int = 8192, projection_dim: int = 8192, projector_layers: int = 3,
                 lambd: float = 5e-3, **kwargs: Any) -> None:
        check_sizes(projector_hidden=projector_hidden, projection_dim=projection_dim,
                    projector_layers=projector_layers)
        if not lambd >= 0.0 or lambd == float("inf"):
            raise UsageError(f"model.lambd must be a finite number >= 0, got {lambd}")
        super().__init__(**kwargs)

    def build_networks(self, num_features: int) -> None:
        """The projector; the loss's batch normalisation has no parameters (``cross_correlation``)."""
        hp = self.hparams
        self.projector: nn.Sequential = mlp_head(num_features, hp.projector_hidden, hp.projection_dim,
                                                 layers=hp.projector_layers, hidden_bias=False)

    def forward_views(self, views: list[torch.Tensor]):
        """Per view (batch-norm statistics per view): h = encoder, z = projector(h)."""
        v1, v2 = views
        h1, h2 = self.online_encoder(v1), self.online_encoder(v2)
        return h1, self.projector(h1), self.projector(h2)

    def compute_loss(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The Barlow Twins loss over the global batch and the first view's encoder features."""
        h1, z1, z2 = outputs
        return barlow_twins_loss(z1, z2, self.hparams.lambd), h1
