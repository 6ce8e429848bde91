"""The BYOL LightningModule: what is BYOL only (heads, target networks, loss, its optimisation recipe); the plumbing
every image method shares lives in ``zoo.train.ssl.ImagePretraining``, the EMA target in
``zoo.train.momentum.MomentumMixin``, LARS and the optimizer spec in ``zoo.train.optim``."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from byol.functional import byol_loss
from zoo.models.heads import mlp_head
from zoo.train.momentum import MomentumMixin
from zoo.train.optim import OptimizerSpec
from zoo.train.ssl import ImagePretraining, check_sizes
from zoo.errors import UsageError


class BYOL(MomentumMixin, ImagePretraining):
    """Bootstrap Your Own Latent (Grill et al. 2020), faithful to the paper and the authors' code.

    Optimisation (``optimizer_defaults``, each a ``model.*`` key of ``ImagePretraining``): LARS, ``base_lr`` 0.2 per
    256 images, weight decay 1.5e-6, momentum 0.9, trust coefficient 1e-3, biases and norm parameters excluded from
    decay and adaptation, 10 warmup epochs from 0, cosine to 0, per step.

    Args:
        projector_hidden: hidden width of projector and predictor (4096).
        projection_dim: output width of projector and predictor (256).
        tau_base: initial target decay; cosine-scheduled to 1.
        **kwargs: the base's arguments (``zoo.train.ssl.ImagePretraining``: encoder, image_size, views, optimizer,
            compile, ...).
    """

    # The names this method's checkpoints and logs have used since its first release (state-dict prefixes, ``--which``,
    # ``val/online_top1``): the base's are neutral, these keep old checkpoints and metric monitors working.
    encoder_attrs = {"online": "online_encoder", "target": "target_encoder"}
    classifier_attr = "online_classifier"
    metric_prefix = "online"
    optimizer_defaults = OptimizerSpec(optimizer="lars", base_lr=0.2, weight_decay=1.5e-6, momentum=0.9,
                                       lars_eta=1e-3, exclude_bias_norm=True, warmup_epochs=10.0)

    def __init__(self, projector_hidden: int = 4096, projection_dim: int = 256, tau_base: float = 0.996,
                 **kwargs: Any) -> None:
        check_sizes(projector_hidden=projector_hidden, projection_dim=projection_dim)
        if not 0.0 <= tau_base <= 1.0:
            raise UsageError(f"model.tau_base must be in [0, 1], got {tau_base}")
        super().__init__(**kwargs)

    def build_networks(self, num_features: int) -> None:
        """Online projector and predictor; target encoder and projector as exact copies."""
        hp = self.hparams
        self.online_projector = mlp_head(num_features, hp.projector_hidden, hp.projection_dim)
        self.online_predictor = mlp_head(hp.projection_dim, hp.projector_hidden, hp.projection_dim)
        # The target starts as an exact copy and is only ever moved by the EMA, never by gradients.
        self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.online_projector).requires_grad_(False)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Online encoder and projector, each followed by its target."""
        return [(self.online_encoder, self.target_encoder), (self.online_projector, self.target_projector)]

    def _views_forward(self, v1: torch.Tensor, v2: torch.Tensor):
        # Each view goes through the networks separately: batch-norm statistics are per view (the paper's setting).
        h1, h2 = self.online_encoder(v1), self.online_encoder(v2)
        q1 = self.online_predictor(self.online_projector(h1))
        q2 = self.online_predictor(self.online_projector(h2))
        with torch.no_grad():  # target forward in training mode (batch statistics), no gradient
            z1 = self.target_projector(self.target_encoder(v1))
            z2 = self.target_projector(self.target_encoder(v2))
        return h1, q1, q2, z1, z2

    def forward_views(self, views: list[torch.Tensor]):
        """Online and target forward of both views: (h1, q1, q2, z1, z2)."""
        return self._views_forward(*views)

    def compute_loss(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetric BYOL loss (q1 predicts z2, q2 predicts z1) and the first view's encoder features."""
        h1, q1, q2, z1, z2 = outputs
        return byol_loss(q1, q2, z1, z2), h1
