"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning") on the shared image-pretraining base:
its projector and predictor, its loss, and SGD with a cosine lr and a constant predictor lr."""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.train.schedules import warmup_cosine
from zoo.train.ssl import ImagePretraining, check_optimizer_args
from zoo.train.trainer import UsageError

__all__ = ["SimSiam", "negative_cosine", "prediction_mlp", "projection_mlp", "simsiam_loss"]

# Section 4 / Appendix A: MoCo v2's augmentations, the same for both views (BYOL's differ in blur and solarisation).
SIMSIAM_VIEWS = dict(crop_scale=(0.2, 1.0), saturation=0.4, blur_p=0.5, solarize_p=0.0)


def projection_mlp(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> nn.Sequential:
    """Three fc layers, BN on each (the output's without affine), ReLU on the hidden ones (Sec. 4.1, "projection MLP").

    The fc layers have no bias: the BN right after each one would cancel it.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
    )


def prediction_mlp(dim: int = 2048, hidden_dim: int = 512) -> nn.Sequential:
    """The bottleneck predictor: fc-BN-ReLU to ``hidden_dim``, then a plain fc back to ``dim`` (Sec. 4.1)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``D(p, z) = -cos(p, stopgrad(z))`` in [-1, 1] (Eq. 1 with the stop-gradient of Eq. 3), float32."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)  # stop-gradient: the one thing that prevents collapse (Sec. 4.1)
    return -(p * z).sum(dim=-1)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetrised loss ``D(p1, z2) / 2 + D(p2, z1) / 2``, mean over the batch (Eq. 4); minimum -1."""
    return 0.5 * negative_cosine(p1, z2).mean() + 0.5 * negative_cosine(p2, z1).mean()


class SimSiam(ImagePretraining):
    """SimSiam: encoder + projector on two views, a predictor on one branch, stop-gradient on the other.

    Paper defaults (ImageNet, ResNet-50): projector 2048-2048-2048, predictor bottleneck 512, SGD momentum 0.9,
    weight decay 1e-4, lr ``base_lr * global_batch / 256`` with ``base_lr`` 0.05, cosine decay, predictor lr fixed.
    The paper decays per epoch; here per step (the same curve, without the staircase).

    Args:
        encoder: registry name of the backbone (``zoo.available()``).
        encoder_overrides: keyword overrides for the backbone constructor.
        image_size: side of the augmented views.
        num_classes: classes of the online classifier; None reads it from the datamodule.
        projector_hidden: hidden width of the projector (2048).
        projection_dim: output width of projector and predictor (2048).
        predictor_hidden: bottleneck width of the predictor (512).
        base_lr: lr per 256 images (0.05).
        weight_decay: SGD weight decay on encoder, projector and predictor (1e-4); none on the online classifier.
        momentum: SGD momentum (0.9).
        fix_predictor_lr: keep the predictor's lr at the peak instead of decaying it (the paper's setting).
        warmup_epochs: linear lr warmup in epochs (0, as in the paper at batch 512; ``warmup_steps`` overrides it).
        warmup_steps: linear lr warmup in steps, if set.
        augment_overrides: overrides of the view presets (default: MoCo v2's views for both, ``SIMSIAM_VIEWS``).
        eval_overrides: overrides of the online classifier's validation view.
        aug_seed: seed of the augmentation randomness.
        compile: ``True``: ``torch.compile`` the per-view forward; ``"step"``: the whole step
            (``zoo.train.whole_step``).
        channels_last: use channels-last memory format (default: on GPU only).
        nan_policy: ``stop`` or ``skip`` on a non-finite loss.
    """

    default_view_overrides = SIMSIAM_VIEWS

    def __init__(self, encoder: str = "resnet50", encoder_overrides: dict[str, Any] | None = None, image_size: int = 224,
                 num_classes: int | None = None, projector_hidden: int = 2048, projection_dim: int = 2048,
                 predictor_hidden: int = 512, base_lr: float = 0.05, weight_decay: float = 1e-4,
                 momentum: float = 0.9, fix_predictor_lr: bool = True, warmup_epochs: float = 0.0,
                 warmup_steps: int | None = None, augment_overrides: dict[str, Any] | None = None,
                 eval_overrides: dict[str, Any] | None = None, aug_seed: int = 0,
                 compile: bool | Literal["step"] = False,
                 channels_last: bool | None = None, nan_policy: str = "stop") -> None:
        check_optimizer_args(base_lr, weight_decay, momentum, warmup_epochs, warmup_steps,
                             {"projector_hidden": projector_hidden, "projection_dim": projection_dim,
                              "predictor_hidden": predictor_hidden})
        super().__init__(encoder=encoder, encoder_overrides=encoder_overrides, image_size=image_size,
                         num_classes=num_classes, augment_overrides=augment_overrides, eval_overrides=eval_overrides,
                         aug_seed=aug_seed, compile=compile, channels_last=channels_last, nan_policy=nan_policy)

    def build_networks(self, num_features: int) -> None:
        """Projector after the encoder, predictor after the projector; no target network."""
        hp = self.hparams
        self.projector = projection_mlp(num_features, hp.projector_hidden, hp.projection_dim)
        self.predictor = prediction_mlp(hp.projection_dim, hp.predictor_hidden)

    def forward_views(self, views: list[torch.Tensor]):
        """Per view (batch-norm statistics per view): h = encoder, z = projector(h), p = predictor(z)."""
        v1, v2 = views
        h1, h2 = self.online_encoder(v1), self.online_encoder(v2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return h1, p1, p2, z1, z2

    def compute_loss(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetrised negative-cosine loss and the first view's encoder features."""
        h1, p1, p2, z1, z2 = outputs
        return simsiam_loss(p1, p2, z1, z2), h1

    def fused_optimizer_update(self, groups: list[tuple[list, list, list, dict]], lrs: torch.Tensor) -> None:
        """``compile="step"``: torch's SGD (momentum, no dampening, no Nesterov) per group, the lr as a device scalar.

        A zero momentum buffer makes the first step ``m = d`` exactly as SGD's ``m = clone(d)``."""
        for i, (params, grads, bufs, group) in enumerate(groups):
            if not params:
                continue
            if group["dampening"] or group["nesterov"] or group["maximize"]:
                raise UsageError("model.compile: step implements plain momentum SGD only (no dampening, Nesterov "
                                 "or maximize)")
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"] else grads
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_sub_(params, torch._foreach_mul(bufs, lrs[i]))

    def configure_optimizers(self):
        """SGD: encoder + projector on the cosine schedule, predictor at a constant lr (``fix_predictor_lr``),
        the online classifier on the cosine schedule without weight decay."""
        hp = self.hparams
        total, warmup = self.schedule_lengths(hp.warmup_epochs, hp.warmup_steps)
        peak = hp.base_lr * self.global_batch() / 256.0
        groups = [
            {"params": list(self.online_encoder.parameters()) + list(self.projector.parameters())},
            {"params": list(self.predictor.parameters())},
            {"params": list(self.online_classifier.parameters()), "weight_decay": 0.0},
        ]
        opt = torch.optim.SGD(groups, lr=peak, momentum=hp.momentum, weight_decay=hp.weight_decay)

        def decayed(step: int) -> float:
            return warmup_cosine(step, total, warmup, 1.0, final=0.0)

        def predictor(step: int) -> float:  # warmup, then the peak for good: final == peak
            return warmup_cosine(step, total, warmup, 1.0, final=1.0) if hp.fix_predictor_lr else decayed(step)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [decayed, predictor, decayed])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
