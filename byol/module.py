"""The BYOL LightningModule: what is BYOL only (heads, target networks, loss, LARS); the plumbing every image method
shares lives in ``zoo.train.ssl.ImagePretraining``, the EMA target in ``zoo.train.momentum.MomentumMixin``."""
from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import nn

from byol.functional import byol_loss, lr_schedule, scaled_lr
from byol.heads import mlp_head
from byol.lars import LARS, lars_param_groups, lars_update
from zoo.train.momentum import MomentumMixin
from zoo.train.ssl import ImagePretraining, check_optimizer_args
from zoo.train.trainer import UsageError


class BYOL(MomentumMixin, ImagePretraining):
    """Bootstrap Your Own Latent (Grill et al. 2020), faithful to the paper and the authors' code.

    Args:
        encoder: registry name of the backbone (``zoo.available()``), e.g. ``resnet50``, ``resnet18_cifar``.
        encoder_overrides: keyword overrides for the backbone constructor.
        image_size: side of the augmented views.
        num_classes: classes of the online classifier; None reads it from the datamodule.
        projector_hidden: hidden width of projector and predictor (4096).
        projection_dim: output width of projector and predictor (256).
        base_lr: lr per 256 images; the peak lr is ``base_lr * global_batch / 256``.
        weight_decay: LARS weight decay (biases and norm parameters excluded).
        momentum: LARS momentum.
        lars_eta: LARS trust coefficient.
        tau_base: initial target decay; cosine-scheduled to 1.
        warmup_epochs: linear lr warmup length in epochs (``warmup_steps`` overrides it).
        warmup_steps: linear lr warmup length in steps, if set.
        augment_overrides: preset overrides for ``augment.byol_views`` (``blur_p``: both views, ``view2_solarize_p``: one;
            ``crop_sampler``: ``official`` | ``torchvision``, ``resize_kernel``: ``tf_bicubic`` | ``torch_bicubic``).
        eval_overrides: preset overrides for the online classifier's validation view ``augment.LinearEvalTest``
            (``eval_crop``: ``official`` | ``resize_then_crop``, ``resize_kernel``: ``tf_bicubic`` | ``torch_bicubic``).
        aug_seed: seed of the augmentation randomness (combined with the rank and the step).
        compile: ``True``: ``torch.compile`` the per-view forward (GPU; works on CPU but compiles slowly); ``"step"``:
            the whole step (views, forwards, loss, classifier, LARS, EMA), see ``zoo.train.whole_step``.
        channels_last: use channels-last memory format (default: on GPU only).
        nan_policy: ``stop`` or ``skip`` on a non-finite loss.
    """

    encoder_attrs = {"online": "online_encoder", "target": "target_encoder"}

    def __init__(self, encoder: str = "resnet50", encoder_overrides: dict[str, Any] | None = None, image_size: int = 224,
                 num_classes: int | None = None, projector_hidden: int = 4096, projection_dim: int = 256,
                 base_lr: float = 0.2, weight_decay: float = 1.5e-6, momentum: float = 0.9, lars_eta: float = 1e-3,
                 tau_base: float = 0.996, warmup_epochs: float = 10.0, warmup_steps: int | None = None,
                 augment_overrides: dict[str, Any] | None = None, eval_overrides: dict[str, Any] | None = None,
                 aug_seed: int = 0, compile: bool | Literal["step"] = False,
                 channels_last: bool | None = None, nan_policy: str = "stop") -> None:
        check_optimizer_args(base_lr, weight_decay, momentum, warmup_epochs, warmup_steps,
                             {"projector_hidden": projector_hidden, "projection_dim": projection_dim})
        if not (math.isfinite(lars_eta) and lars_eta > 0):
            raise UsageError(f"model.lars_eta (LARS trust coefficient) must be positive, got {lars_eta}")
        if not 0.0 <= tau_base <= 1.0:
            raise UsageError(f"model.tau_base must be in [0, 1], got {tau_base}")
        super().__init__(encoder=encoder, encoder_overrides=encoder_overrides, image_size=image_size,
                         num_classes=num_classes, augment_overrides=augment_overrides, eval_overrides=eval_overrides,
                         aug_seed=aug_seed, compile=compile, channels_last=channels_last, nan_policy=nan_policy)

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

    def configure_optimizers(self):
        """LARS on the online networks and the classifier, with the per-step warmup + cosine schedule."""
        total, warmup = self.schedule_lengths(self.hparams.warmup_epochs, self.hparams.warmup_steps)
        peak = scaled_lr(self.hparams.base_lr, self.global_batch())
        online = [(n, p) for n, p in self.named_parameters() if not n.startswith("target_")]
        opt = LARS(lars_param_groups(online), lr=peak, momentum=self.hparams.momentum,
                   weight_decay=self.hparams.weight_decay, eta=self.hparams.lars_eta)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_schedule(step, total, warmup, 1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def fused_optimizer_update(self, groups: list[tuple[list, list, list, dict]], lrs: torch.Tensor) -> None:
        """``compile="step"``: LARS on each param group, the lr as a device scalar."""
        for i, (params, grads, bufs, group) in enumerate(groups):
            if params:
                lars_update(params, grads, bufs, group, lrs[i])

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
