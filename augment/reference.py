"""The reference pipelines: ``augment.ops`` composed sample by sample, in the paper's order. Slow; for tests/spec."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from augment import ops
from augment.params import ViewParams
from augment.presets import EvalPreset, ViewPreset

__all__ = ["reference_view", "reference_eval_train", "reference_eval_test", "COLOUR_OPS"]

COLOUR_OPS = (ops.adjust_brightness, ops.adjust_contrast, ops.adjust_saturation, ops.adjust_hue)
_PARAM_NAMES = ("brightness", "contrast", "saturation", "hue")


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def reference_view(images: torch.Tensor | Sequence[torch.Tensor], p: ViewParams, preset: ViewPreset
                   ) -> torch.Tensor:
    """One BYOL view built from the reference ops, one sample at a time, with explicit parameters ``p``."""
    x = _rgb(ops.random_resized_crop(images, p.boxes, preset.size, preset.resize_kernel))
    x = ops.hflip(x, p.flip)
    outs = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        if bool(p.jitter[i]):
            for op in p.order[i].tolist():  # this sample's own random order; each op clips
                xi = COLOUR_OPS[op](xi, getattr(p, _PARAM_NAMES[op])[i:i + 1])
        outs.append(xi)
    x = torch.cat(outs)
    x = ops.to_grayscale(x, p.gray)
    x = ops.gaussian_blur(x, p.sigma, preset.kernel_size, p.blur)
    x = ops.solarize(x, p.solarize, preset.solarize_threshold)
    return ops.normalize(x, preset.mean, preset.std)


def reference_eval_train(images, boxes: torch.Tensor, flip: torch.Tensor, preset: EvalPreset) -> torch.Tensor:
    """Linear-eval train transform from the reference ops."""
    x = ops.hflip(_rgb(ops.random_resized_crop(images, boxes, preset.size, preset.resize_kernel)), flip)
    return ops.normalize(x, preset.mean, preset.std)


def reference_eval_test(images, preset: EvalPreset) -> torch.Tensor:
    """Linear-eval test transform from the reference ops, normalised: the authors' central square resized to
    ``size`` (``eval_crop="official"``), or resize of the short side then centre crop (``"resize_then_crop"``)."""
    images = list(images)
    if preset.eval_crop == "official":
        hw = torch.tensor([[int(i.shape[-2]), int(i.shape[-1])] for i in images])
        boxes = ops.official_center_boxes(hw[:, 0], hw[:, 1], preset.size, preset.resize_to)
        x = _rgb(ops.random_resized_crop(images, boxes, preset.size, preset.resize_kernel))
        return ops.normalize(x, preset.mean, preset.std)
    x = ops.resize_short_side(images, preset.resize_to, preset.resize_kernel)
    x = _rgb(ops.center_crop(x, preset.size))
    return ops.normalize(x, preset.mean, preset.std)
