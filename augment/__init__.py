"""Batched per-sample image augmentations on any device; BYOL view presets as data; GPU JPEG decode.

* ``augment.ops``: reference ops (pure functions, the specification), ``augment.fused``: the fast path that runs;
* ``augment.presets``: BYOL's two views and the linear-eval pipelines as data, by default with the authors' crop
  sampler, TF2 bicubic resize and eval window (``crop_sampler`` / ``resize_kernel`` / ``eval_crop`` switch back);
* ``augment.byol_views(size)``, ``augment.LinearEvalTrain(size)``, ``augment.LinearEvalTest(size)``: modules called
  as ``module(images, generator=None) -> float32 [B, 3, size, size]``;
* ``augment.decode.decode_batch``: JPEG bytes -> uint8 images (nvjpeg on GPU, CPU fallback, bad files reported);
  ``augment.device_decode.DeviceDecoder``: the same from pinned host memory in a side CUDA stream, handed over by an
  event (``zoo.data.prefetch`` runs it one step ahead of training).
"""
from augment.ops import (
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, center_crop, gaussian_blur, hflip, normalize,
    random_resized_crop, resize, resize_short_side, sample_crop_boxes, solarize, to_grayscale, official_crop_boxes,
    official_center_boxes, tf_bicubic_taps,
)
from augment.params import ViewParams, sample_view_params
from augment.presets import EvalPreset, ViewPreset, byol_presets, linear_eval_test_preset, linear_eval_train_preset
from augment.views import ByolView, LinearEvalTest, LinearEvalTrain, byol_views

__all__ = [
    "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "center_crop", "gaussian_blur",
    "hflip", "normalize", "random_resized_crop", "resize", "resize_short_side", "sample_crop_boxes", "solarize",
    "to_grayscale", "ViewParams", "sample_view_params", "EvalPreset", "ViewPreset", "byol_presets",
    "linear_eval_test_preset", "linear_eval_train_preset", "ByolView", "LinearEvalTest", "LinearEvalTrain",
    "byol_views", "official_crop_boxes", "official_center_boxes", "tf_bicubic_taps",
]
