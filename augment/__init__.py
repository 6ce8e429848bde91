"""Batched per-sample image augmentations on any device; two-view presets as data (BYOL's numbers by default);
GPU JPEG decode.

* ``augment.ops``: reference ops (pure functions, the specification), ``augment.fused``: the fast path that runs;
* ``augment.presets``: the two training views (BYOL's numbers by default) and the linear-eval pipelines as data, by default with the authors' crop
  sampler, TF2 bicubic resize and eval window (``crop_sampler`` / ``resize_kernel`` / ``eval_crop`` switch back);
* ``augment.train_views(size)``, ``augment.LinearEvalTrain(size)``, ``augment.LinearEvalTest(size)``: modules called
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
from augment.presets import (EvalPreset, ViewPreset, byol_presets, linear_eval_test_preset, linear_eval_train_preset,
                             train_view_presets)
from augment.views import ByolView, LinearEvalTest, LinearEvalTrain, TrainView, byol_views, train_views

__all__ = [
    "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "center_crop", "gaussian_blur",
    "hflip", "normalize", "random_resized_crop", "resize", "resize_short_side", "sample_crop_boxes", "solarize",
    "to_grayscale", "ViewParams", "sample_view_params", "EvalPreset", "ViewPreset", "train_view_presets",
    "linear_eval_test_preset", "linear_eval_train_preset", "TrainView", "LinearEvalTest", "LinearEvalTrain",
    "train_views", "official_crop_boxes", "official_center_boxes", "tf_bicubic_taps",
    "byol_presets", "byol_views", "ByolView",  # older names of train_view_presets, train_views, TrainView
]
