"""Augmentation presets as data: the two training views (BYOL's numbers by default) and the linear-evaluation train/test pipelines.

Numbers: BYOL paper (Grill et al. 2020), Appendix B Table 6 ("Augmentations") and the appendix "Linear evaluation
protocol"; the authors' code: google-deepmind/deepmind-research, byol/utils/.

Scaling to other image sizes (``size`` argument; e.g. 32 px CIFAR/digits, 64 px, 96 px):
* crop scale/ratio, probabilities and colour strengths do not depend on size;
* blur taps follow BYOL's own rule ``2 * ((size // 10) // 2) + 1`` (i.e. ``size // 10`` rounded up to odd):
  224 -> 23, 96 -> 9, 64 -> 7, 32 -> 3; sigma stays U[0.1, 2.0] in pixels like the paper's code (the kernel radius
  then bounds the blur for small images);
* linear-eval test (``eval_crop="official"``, the authors' order) crops the central square of side
  ``int(size / resize_to * min(h, w))`` with ``resize_to = round(size * 256 / 224)`` (224/256 of the short side at
  224 px, the same fraction at every size) and resizes it to ``size``; ``"resize_then_crop"`` resizes the short side
  to ``resize_to`` (256 at 224, 37 at 32) and centre-crops ``size`` (torchvision's usual order).

Faithfulness switches (defaults = the authors' TF pipeline, byol/utils/dataset.py):
* ``crop_sampler``: ``"official"`` one draw, no retries, sides clamped to the image (``_decode_and_random_crop``);
  ``"torchvision"`` 10 tries then a centre-crop fallback (``RandomResizedCrop``);
* ``resize_kernel``: ``"tf_bicubic"`` TF2 ``tf.image.resize(BICUBIC)`` (Keys a = -0.5, taps outside the image get
  weight 0 and the rest is renormalised); ``"torch_bicubic"`` PyTorch's ``F.interpolate`` (a = -0.75, clamped taps).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from augment.ops import CROP_SAMPLERS, IMAGENET_MEAN, IMAGENET_STD, RESIZE_KERNELS, blur_kernel_size

__all__ = ["ViewPreset", "EvalPreset", "train_view_presets", "byol_presets", "linear_eval_train_preset",
           "linear_eval_test_preset"]


@dataclass(frozen=True)
class ViewPreset:
    """One augmentation pipeline: crop -> flip -> colour jitter -> grayscale -> blur -> solarize -> normalise."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4   # additive delta ~ U[-b, b]
    contrast: float = 0.4     # factor ~ U[1 - c, 1 + c]
    saturation: float = 0.2   # factor ~ U[1 - s, 1 + s]
    hue: float = 0.1          # shift ~ U[-h, h] turns
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None  # None: derived from size (see module docstring)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_sampler: str = "official"     # or "torchvision" (see module docstring)
    resize_kernel: str = "tf_bicubic"  # or "torch_bicubic"

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.size < 1:
            raise ValueError(f"preset size must be a positive number of pixels; got {self.size}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p} is not a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue={self.hue} must be in [0, 0.5] turns")
        if self.contrast > 1 or self.saturation > 1:
            raise ValueError("contrast and saturation strengths must be <= 1 (factors stay non-negative)")
        if self.blur_kernel is not None and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0):
            raise ValueError(f"blur_kernel={self.blur_kernel} must be a positive odd integer (or None for the rule)")

    @property
    def kernel_size(self) -> int:
        """Blur taps used at this size."""
        return self.blur_kernel if self.blur_kernel is not None else blur_kernel_size(self.size)


@dataclass(frozen=True)
class EvalPreset:
    """Linear-evaluation pipeline: train = random resized crop + flip; test = centre window resized (no randomness).

    One preset serves both; which fields apply is decided by the view built from it (``LinearEvalTrain`` or
    ``LinearEvalTest``), so it carries no train/test flag of its own.
    """

    size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    resize: int | None = None  # test only; None -> round(size * 256 / 224)
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    crop_sampler: str = "official"     # train; or "torchvision"
    resize_kernel: str = "tf_bicubic"  # or "torch_bicubic"
    eval_crop: str = "official"        # test; or "resize_then_crop"

    def __post_init__(self) -> None:
        _check_choices(self)

    @property
    def resize_to(self) -> int:
        """Short side before the centre crop."""
        return self.resize if self.resize is not None else round(self.size * 256 / 224)


EVAL_CROPS = ("official", "resize_then_crop")


def _check_choices(preset) -> None:
    """Readable errors for the string switches of a preset."""
    choices = {"crop_sampler": CROP_SAMPLERS, "resize_kernel": RESIZE_KERNELS, "eval_crop": EVAL_CROPS}
    for name, allowed in choices.items():
        value = getattr(preset, name, None)
        if value is not None and value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")


# BYOL Table 6: the views differ only in blur and solarisation probabilities
_VIEW1 = dict(blur_p=1.0, solarize_p=0.0)
_VIEW2 = dict(blur_p=0.1, solarize_p=0.2)


def train_view_presets(size: int = 224, **overrides) -> tuple[ViewPreset, ViewPreset]:
    """Two training view presets at ``size``, BYOL's paper numbers by default (a method's ``default_view_overrides``
    change them); ``key=v`` overrides both views, ``view1_key=v``/``view2_key=v`` one."""
    names = {f.name for f in dataclasses.fields(ViewPreset)} - {"size"}
    per_view: list[dict] = [dict(_VIEW1), dict(_VIEW2)]
    for key, value in overrides.items():
        target, name = ((0,), key[6:]) if key.startswith("view1_") else ((1,), key[6:]) \
            if key.startswith("view2_") else ((0, 1), key)
        if name not in names:
            raise ValueError(f"unknown augmentation preset key {key!r}; valid keys: {sorted(names)} "
                             "(optionally prefixed view1_ / view2_)")
        for i in target:
            per_view[i][name] = tuple(value) if isinstance(value, list) else value
    return ViewPreset(size=size, **per_view[0]), ViewPreset(size=size, **per_view[1])


byol_presets = train_view_presets  # the name of the time when BYOL was the only method; kept for code that uses it


def linear_eval_train_preset(size: int = 224, **overrides) -> EvalPreset:
    """Linear-probe training augmentation: random resized crop (0.08-1) + horizontal flip."""
    return EvalPreset(size=size, **overrides)


def linear_eval_test_preset(size: int = 224, resize: int | None = None, **overrides) -> EvalPreset:
    """Linear-probe test transform: the authors' central square (224/256 of the short side) resized to ``size``
    (``eval_crop="official"``), or bicubic resize of the short side (256 at 224) then centre crop ``size``."""
    return EvalPreset(size=size, resize=resize, **overrides)
