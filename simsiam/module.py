"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning") on the shared image-pretraining base:
its projector and predictor (the kit's ``mlp_head``), its loss, and its recipe: SGD with a cosine lr and a constant
predictor lr."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.heads import mlp_head
from zoo.train.optim import OptimizerSpec
from zoo.train.ssl import ImagePretraining, check_sizes

__all__ = ["SimSiam", "negative_cosine", "prediction_mlp", "projection_mlp", "simsiam_loss"]

# Section 4 / Appendix A: MoCo v2's augmentations, the same for both views (BYOL's differ in blur and solarisation).
SIMSIAM_VIEWS = dict(crop_scale=(0.2, 1.0), saturation=0.4, blur_p=0.5, solarize_p=0.0)


def projection_mlp(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> nn.Sequential:
    """Three fc layers, BN on each (the output's without affine), ReLU on the hidden ones (Sec. 4.1, "projection MLP").

    The fc layers have no bias: the BN right after each one would cancel it.
    """
    return mlp_head(in_dim, hidden_dim, out_dim, layers=3, hidden_bias=False, last_bn=True, last_bn_affine=False)


def prediction_mlp(dim: int = 2048, hidden_dim: int = 512) -> nn.Sequential:
    """The bottleneck predictor: fc-BN-ReLU to ``hidden_dim``, then a plain fc back to ``dim`` (Sec. 4.1)."""
    return mlp_head(dim, hidden_dim, dim, hidden_bias=False, last_bias=True)


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
    weight decay 1e-4 on every parameter of encoder, projector and predictor (none on the online classifier), lr
    ``base_lr * global_batch / 256`` with ``base_lr`` 0.05, no warmup, cosine decay, predictor lr fixed
    (``optimizer_defaults``; each a ``model.*`` key of ``ImagePretraining``). The paper decays per epoch; here per
    step (the same curve, without the staircase).

    Args:
        projector_hidden: hidden width of the projector (2048).
        projection_dim: output width of projector and predictor (2048).
        predictor_hidden: bottleneck width of the predictor (512).
        fix_predictor_lr: keep the predictor's lr at the peak instead of decaying it (the paper's setting).
        **kwargs: the base's arguments (``zoo.train.ssl.ImagePretraining``: encoder, image_size, views, optimizer,
            compile, ...).
    """

    # The names this method's checkpoints and logs have used since its first release (state-dict prefixes, ``--which``,
    # ``val/online_top1``): the base's are neutral, these keep old checkpoints and metric monitors working.
    encoder_attrs = {"online": "online_encoder"}
    classifier_attr = "online_classifier"
    metric_prefix = "online"
    default_view_overrides = SIMSIAM_VIEWS
    optimizer_defaults = OptimizerSpec(optimizer="sgd", base_lr=0.05, weight_decay=1e-4, momentum=0.9,
                                       exclude_bias_norm=False, warmup_epochs=0.0)

    def __init__(self, projector_hidden: int = 2048, projection_dim: int = 2048, predictor_hidden: int = 512,
                 fix_predictor_lr: bool = True, **kwargs: Any) -> None:
        check_sizes(projector_hidden=projector_hidden, projection_dim=projection_dim,
                    predictor_hidden=predictor_hidden)
        super().__init__(**kwargs)

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

    def optimizer_groups(self) -> list[dict]:
        """Encoder + projector on the cosine schedule, the predictor at a constant lr after the warmup
        (``fix_predictor_lr``), the online classifier on the cosine schedule without weight decay."""
        return [
            {"params": list(self.online_encoder.parameters()) + list(self.projector.parameters())},
            {"params": list(self.predictor.parameters()), "constant_after_warmup": self.hparams.fix_predictor_lr},
            {"params": list(self.online_classifier.parameters()), "weight_decay": 0.0},
        ]
