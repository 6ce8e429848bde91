"""Augmentation modules: the two training views (BYOL's presets by default) and the linear-evaluation transforms,
on whatever device the batch is on.

Call signature of every module: ``module(images, generator=None, rows=None) -> float32 [B, 3, size, size]``
(normalised; ``rows``: the batch's place in one split between ranks, ``augment.params.sample_view_params``), where
``images`` is a uint8 or float ``[B, C, H, W]`` batch (C = 1 is expanded to RGB; float must be in [0, 1]) or a list of
``[C, H_i, W_i]`` tensors of different sizes (e.g. decoded JPEGs).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from augment import fused
from augment.params import ViewParams, sample_view_params
from augment.presets import EvalPreset, ViewPreset, train_view_presets, linear_eval_test_preset, \
    linear_eval_train_preset

__all__ = ["TrainView", "LinearEvalTrain", "LinearEvalTest", "train_views", "image_sizes", "ByolView", "byol_views"]

Images = torch.Tensor | Sequence[torch.Tensor]


def image_sizes(images: Images) -> tuple[torch.Tensor | int, torch.Tensor | int, int, torch.device]:
    """(heights, widths, batch size, device) of a batch or a list; validates shapes with a readable error."""
    if torch.is_tensor(images):
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty [B, C, H, W] tensor with C = 1 or 3; got shape "
                             f"{tuple(images.shape)} (use a list for images of different sizes)")
        _check_dtype(images)
        return int(images.shape[-2]), int(images.shape[-1]), int(images.shape[0]), images.device
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images must be a [B, C, H, W] tensor or a non-empty list of [C, H, W] tensors; got "
                         f"{type(images).__name__}")
    for i, img in enumerate(images):
        if not torch.is_tensor(img) or img.ndim != 3 or img.shape[0] not in (1, 3) or min(img.shape[1:]) < 1:
            raise ValueError(f"image {i} must be a [C, H, W] tensor with C = 1 or 3; got "
                             f"{tuple(getattr(img, 'shape', ()))}")
        _check_dtype(img)
        if img.dtype != images[0].dtype or img.device != images[0].device:
            raise ValueError(f"image {i} has dtype/device {img.dtype}/{img.device}, image 0 has "
                             f"{images[0].dtype}/{images[0].device}: a batch must share both")
    hs = torch.tensor([int(i.shape[-2]) for i in images])
    ws = torch.tensor([int(i.shape[-1]) for i in images])
    return hs, ws, len(images), images[0].device


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"images must be uint8 (0-255) or float (0-1); got dtype {t.dtype}")


class TrainView(nn.Module):
    """One training view (a ``ViewPreset``): per-sample crop/flip/colour/grayscale/blur/solarize drawn from ``generator``, then normalise.

    ``per_sample``: schedule of the fused path (see ``augment.fused.apply_view``); None picks by device and size.
    ``dtype``: dtype of the resampling/blur matmuls (``torch.bfloat16`` for tensor cores); the output is float32.
    ``compile``: run the batched schedule through ``torch.compile`` for fixed-size batch tensors (lists of
    variable-size images stay eager: every new padded shape would recompile).
    """

    def __init__(self, preset: ViewPreset, per_sample: bool | None = None,
                 dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
        super().__init__()
        self.preset = preset
        self.per_sample = per_sample
        self.dtype = dtype
        self.use_compile = compile  # not ``self.compile``: that would shadow nn.Module.compile()
        self._compiled = None
        self.last_params: ViewParams | None = None  # parameters of the latest call (for inspection / tests)

    def sample_params(self, images: Images, generator: torch.Generator | None = None,
                      rows: tuple[int, int] | None = None) -> ViewParams:
        """Draw this view's per-sample parameters for ``images`` (on the batch's device); ``rows``: see
        ``augment.params.sample_view_params``."""
        hs, ws, n, device = image_sizes(images)
        return sample_view_params(self.preset, hs, ws, n, generator, device, rows)

    def apply(self, images: Images, params: ViewParams) -> torch.Tensor:
        """Apply the view with explicit parameters (the fused implementation)."""
        image_sizes(images)
        if self.use_compile and torch.is_tensor(images):
            if self._compiled is None:
                preset, dtype = self.preset, self.dtype
                self._compiled = torch.compile(lambda x, p: fused.apply_view(x, p, preset, False, dtype))
            return self._compiled(images, params)
        return fused.apply_view(images, params, self.preset, self.per_sample, self.dtype)

    @torch.no_grad()
    def forward(self, images: Images, generator: torch.Generator | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Augment a batch: ``float32 [B, 3, size, size]``, normalised (``rows``: this batch's place in a batch split
        between ranks, see ``augment.params.sample_view_params``)."""
        self.last_params = self.sample_params(images, generator, rows)
        return self.apply(images, self.last_params)

    def extra_repr(self) -> str:
        return repr(self.preset)


def train_views(size: int = 224, per_sample: bool | None = None, dtype: torch.dtype = torch.float32,
               compile: bool = False, **preset_overrides) -> tuple[TrainView, TrainView]:
    """The two training view modules at ``size`` (presets and overrides as in
    ``augment.presets.train_view_presets``; the defaults are BYOL's paper numbers)."""
    p1, p2 = train_view_presets(size, **preset_overrides)
    return TrainView(p1, per_sample, dtype, compile), TrainView(p2, per_sample, dtype, compile)


# The names of the time when BYOL was the only method; kept for code that uses them.
ByolView = TrainView
byol_views = train_views


class LinearEvalTrain(nn.Module):
    """Linear-probe training transform: random resized crop (0.08-1) + flip, normalised."""

    def __init__(self, size: int = 224, **overrides) -> None:
        super().__init__()
        self.preset: EvalPreset = linear_eval_train_preset(size, **overrides)
        # reuse the view sampler with every colour/blur/solarize probability at zero
        self._view = ViewPreset(size=size, crop_scale=self.preset.crop_scale, crop_ratio=self.preset.crop_ratio,
                                flip_p=self.preset.flip_p, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0,
                                crop_sampler=self.preset.crop_sampler, resize_kernel=self.preset.resize_kernel)

    @torch.no_grad()
    def forward(self, images: Images, generator: torch.Generator | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Random crop + flip of a batch: ``float32 [B, 3, size, size]``, normalised (``rows``: see
        ``augment.params.sample_view_params``)."""
        hs, ws, n, device = image_sizes(images)
        p = sample_view_params(self._view, hs, ws, n, generator, device, rows)
        return fused.apply_eval_train(images, p.boxes, p.flip, self.preset)


class LinearEvalTest(nn.Module):
    """Linear-probe test transform, normalised: the authors' central 224/256 square resized to ``size``
    (``eval_crop="official"``, default) or bicubic resize of the short side (256 at 224) + centre crop."""

    def __init__(self, size: int = 224, resize: int | None = None, **overrides) -> None:
        super().__init__()
        self.preset: EvalPreset = linear_eval_test_preset(size, resize, **overrides)

    @torch.no_grad()
    def forward(self, images: Images, generator: torch.Generator | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Deterministic transform (``generator`` and ``rows`` accepted for a uniform signature, unused)."""
        image_sizes(images)
        return fused.apply_eval_test(images, self.preset.resize_to, self.preset.size, self.preset.mean,
                                     self.preset.std, self.preset.eval_crop, self.preset.resize_kernel)
