"""The table of named pretrained weights, as data: one dict per entry, nothing else in this module.

Fields of an entry:
- ``arch``: registry name (``zoo.create``) the weights fit; ``urls``: mirrors tried in order (the first that answers);
- ``sha256``: hex digest of the file, or ``None`` while no digest has been verified: no checksum is published for the
  official BYOL release and this table is only filled with a digest measured on the real file. A download of an
  entry without one prints the digest it measured and is refused unless trusted (``trust=True``, ``--trust`` or
  ``ZOO_TRUST_UNVERIFIED=1``); paste the printed digest here to verify it from then on;
- ``size``: approximate size in bytes (the authors' README; shown before a download, never checked);
- ``format``: ``"byol-official"`` (the DeepMind dill pickle, read by the reader ``byol`` registers: ``zoo.weights.readers``);
- ``encoders``: which entries of the file hold which encoder (``load_backbone(name, which=...)``) and the classifier;
- ``mean``/``std``/``input_size``/``crop_pct``/``interpolation``: the evaluation transform the figures were measured
  with (timm's ``pretrained_cfg`` names); ``padding``: the convolution padding the weights were trained with;
- ``top1``: linear-evaluation ImageNet top-1 reported by the authors (their README / the paper), not measured here;
- ``license``, ``citation``, ``notes``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PRETRAINED", "OFFICIAL_BASE_URL"]

OFFICIAL_BASE_URL = "https://storage.googleapis.com/deepmind-byol/checkpoints/"
_CITATION = ("Grill et al., Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning, NeurIPS 2020, "
             "arXiv:2006.07733")
_LICENSE = "CC BY-NC 4.0 (DeepMind BYOL release)"
# The official files: a dill pickle of _ByolExperimentState (its fields: byol.official.EXPERIMENT_STATE_FIELDS);
# each encoder is a Haiku torso + BN EMA state.
_OFFICIAL_ENCODERS = {
    "online": "the online network's Haiku ResNet torso ('res_net*/~/...') + its batch-norm state (mean_ema/var_ema)",
    "target": "the target network's Haiku ResNet torso ('res_net*/~/...') + its batch-norm state",
    "classifier": "the online network's 'classifier' (ImageNet, 1000 classes, on the online encoder)",
}
# BYOL's linear-evaluation transform: bicubic resize of the short side to 256, centre crop 224, ImageNet statistics.
_IMAGENET_EVAL = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": [3, 224, 224],
                  "crop_pct": 0.875, "interpolation": "bicubic", "padding": "tf_same"}


def _official(name: str, path: str, arch: str, size: int, top1: float | None, notes: str) -> dict[str, Any]:
    return {"name": name, "arch": arch, "urls": [OFFICIAL_BASE_URL + path], "sha256": None, "size": size,
            "format": "byol-official", "encoders": dict(_OFFICIAL_ENCODERS), **_IMAGENET_EVAL,
            "top1": top1, "license": _LICENSE, "citation": _CITATION, "notes": notes}


_ABLATION_NOTE = "ablation of the paper: ResNet-50 1x, 300 epochs; "
_ABLATIONS = {
    "baseline": "the 300-epoch baseline the ablations compare to",
    "batchsize-2048": "batch 2048", "batchsize-1024": "batch 1024", "batchsize-512": "batch 512",
    "batchsize-256": "batch 256", "batchsize-128": "batch 128", "batchsize-64": "batch 64",
    "no-grayscale": "augmentations without grayscale", "no-color": "augmentations without colour jitter",
    "crop-and-blur-only": "random crop and blur only", "crop-only": "random crop only",
    "crop-and-color-only": "random crop and colour jitter only",
}

PRETRAINED: dict[str, dict[str, Any]] = {
    e["name"]: e for e in [
        _official("byol-r50-official", "pretrain_res50x1.pkl", "resnet50", 570_000_000, 74.4,
                  "BYOL ResNet-50 (1x), 1000 epochs on ImageNet; the authors' README: 'should evaluate to ~74.4% "
                  "top-1' (paper: 74.3)"),
        _official("byol-r200x2-official", "pretrain_res200x2.pkl", "resnet200x2", 4_600_000_000, 79.6,
                  "BYOL ResNet-200 (2x), 1000 epochs on ImageNet; ~79.6% top-1 (the authors' README)"),
        *[_official(f"byol-r50-ablation-{key}", f"ablations/res50x1_{key.replace('-', '_')}.pkl", "resnet50",
                    640_000_000, None, _ABLATION_NOTE + what + "; no top-1 published with the file")
          for key, what in _ABLATIONS.items()],
    ]
}
