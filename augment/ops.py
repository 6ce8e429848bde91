"""Reference augmentation ops: the specification the fused path (``augment.fused``) must reproduce.

Every op is a pure batched function of float images ``[B, C, H, W]`` in ``[0, 1]`` and per-sample parameter
tensors; randomness lives elsewhere (``sample_crop_boxes`` and ``augment.params``). Semantics follow the BYOL
authors' TensorFlow pipeline (Grill et al. 2020, Appendix B; byol/utils/augmentations.py of their
google-deepmind/deepmind-research repository):

* brightness is ADDITIVE (``tf.image.adjust_brightness``); torchvision's and kornia's ``ColorJitter`` multiply;
* contrast blends towards the per-CHANNEL spatial mean (``tf.image.adjust_contrast``); torchvision blends towards the
  grayscale mean and kornia's ``adjust_contrast`` multiplies without any mean;
* saturation / hue work in HSV with saturation clipped to ``[0, 1]`` and hue wrapped (TF semantics; kornia's
  ``adjust_saturation`` / ``adjust_hue`` implement exactly this, so they are used here);
* blur uses ZERO padding (TF 'SAME' convolution); kornia's default is reflect, so ``border_type='constant'``.
* crops: ``official_crop_boxes`` is the authors' one-draw sampler, ``sample_crop_boxes`` torchvision's (or either);
  the resize is TF2's bicubic (``resize(kernel="tf_bicubic")``) or PyTorch's; ``official_center_boxes`` is the
  authors' eval window. The presets choose (``augment.presets``); the ops' own defaults stay PyTorch's.

Every op ends with a clip to ``[0, 1]`` (the pipeline clips after each colour op).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import kornia
import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale, used by BYOL
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "GRAY_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD", "sample_crop_boxes", "resize", "random_resized_crop", "hflip",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "to_grayscale", "gaussian_kernel1d",
    "gaussian_blur", "solarize", "normalize", "resize_short_side", "center_crop", "blur_kernel_size",
    "CROP_SAMPLERS", "RESIZE_KERNELS", "official_crop_boxes", "tf_bicubic_taps", "official_center_boxes",
]

CROP_SAMPLERS = ("official", "torchvision")
RESIZE_KERNELS = ("tf_bicubic", "torch_bicubic")


def _per_sample(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``[B]`` parameter against ``x`` of shape ``[B, C, H, W]``."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.shape != (x.shape[0],):
        raise ValueError(f"per-sample parameter has shape {tuple(t.shape)}; expected ({x.shape[0]},) for this batch")
    return t.view(-1, 1, 1, 1)


def _check_batch(x: torch.Tensor, name: str = "images", channels: int | None = None) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [B, C, H, W] in [0, 1]; got "
                         f"{type(x).__name__} {getattr(x, 'shape', '')} {getattr(x, 'dtype', '')}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels; got {x.shape[1]}")


# ----------------------------------------------------------------------------------------------- geometry
def _crop_inputs(h, w, n: int, generator: torch.Generator | None, scale: tuple[float, float],
                 ratio: tuple[float, float], device: torch.device | str | None):
    """Checked ranges; image sides as float64 ``[n]`` on the generator's device; the device the boxes go to."""
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"crop scale {scale} and ratio {ratio} must be positive (lo, hi) pairs")
    gen_device = generator.device if generator is not None else (torch.device(device) if device else None)
    out_device = torch.device(device) if device is not None else gen_device or torch.device("cpu")
    hh = torch.as_tensor(h, device=gen_device).to(torch.float64).expand(n)
    ww = torch.as_tensor(w, device=gen_device).to(torch.float64).expand(n)
    return hh, ww, gen_device, out_device


def _area_and_aspect(area: torch.Tensor, u_scale: torch.Tensor, u_ratio: torch.Tensor, scale: tuple[float, float],
                     ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target crop area ~ U[scale] x ``area`` and aspect ratio log-uniform in ``ratio``, from two uniforms."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    return area * (scale[0] + (scale[1] - scale[0]) * u_scale), torch.exp(log_lo + (log_hi - log_lo) * u_ratio)


def official_crop_boxes(
    h: int | torch.Tensor,
    w: int | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` crop boxes ``[n, 4]`` = (top, left, height, width) with the BYOL authors' sampler.

    One draw per box, no retries (their ``_decode_and_random_crop``): area = U[scale] x image area, aspect ratio
    log-uniform in ``ratio``, ``w = round(sqrt(area * ratio))``, ``h = round(sqrt(area / ratio))``, each clamped to
    the image side (and to >= 1 for tiny images, where TF would fail), offsets uniform over the valid range. Four
    float64 uniforms per box, whatever the data (reproducible, compile-friendly).
    """
    hh, ww, gen_device, out_device = _crop_inputs(h, w, n, generator, scale, ratio, device)
    u = torch.rand(n, 4, generator=generator, device=gen_device, dtype=torch.float64)
    target, aspect = _area_and_aspect(hh * ww, u[:, 0], u[:, 1], scale, ratio)
    cw = torch.round(torch.sqrt(target * aspect)).clamp(min=1).minimum(ww)
    ch = torch.round(torch.sqrt(target / aspect)).clamp(min=1).minimum(hh)
    top = torch.floor(u[:, 2] * (hh - ch + 1)).minimum(hh - ch)  # min: u < 1, but guard the float edge
    left = torch.floor(u[:, 3] * (ww - cw + 1)).minimum(ww - cw)
    return torch.stack([top, left, ch, cw], dim=1).to(device=out_device, dtype=torch.long)


def sample_crop_boxes(
    h: int | torch.Tensor,
    w: int | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    device: torch.device | str | None = None,
    sampler: str = "torchvision",
) -> torch.Tensor:
    """Draw ``n`` random-resized-crop boxes ``[n, 4]`` = (top, left, height, width), torchvision's algorithm.

    ``sampler="official"`` hands over to ``official_crop_boxes`` (the BYOL authors' one-draw sampler, the default of
    the BYOL presets); ``"torchvision"`` is the algorithm below.

    Area fraction ~ U[scale], aspect ratio log-uniform in ``ratio``; the first of ``attempts`` tries that fits the
    image wins, otherwise a centre crop clamped to ``ratio`` (torchvision's fallback). All tries are drawn at once,
    so the number of random numbers consumed never depends on the data (reproducible, compile-friendly).
    ``h``/``w`` are ints or ``[n]`` tensors (one size per image of a variable-size batch).
    """
    if sampler not in CROP_SAMPLERS:
        raise ValueError(f"crop_sampler={sampler!r}: use one of {CROP_SAMPLERS}")
    if sampler == "official":
        return official_crop_boxes(h, w, n, generator, scale, ratio, device)
    hh, ww, gen_device, out_device = _crop_inputs(h, w, n, generator, scale, ratio, device)
    area = hh * ww
    u = torch.rand(n, attempts, 4, generator=generator, device=gen_device, dtype=torch.float64)
    target, aspect = _area_and_aspect(area[:, None], u[..., 0], u[..., 1], scale, ratio)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= ww[:, None]) & (ch > 0) & (ch <= hh[:, None])
    # first successful try; argmax on a bool-as-int finds it, `any` tells whether there is one
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.any(dim=1)
    ch_t = ch.gather(1, first)[:, 0]
    cw_t = cw.gather(1, first)[:, 0]
    top_t = torch.floor(u[..., 2].gather(1, first)[:, 0] * (hh - ch_t + 1))
    left_t = torch.floor(u[..., 3].gather(1, first)[:, 0] * (ww - cw_t + 1))
    # torchvision fallback: whole image if its ratio is inside the range, else the largest in-range centre crop
    in_ratio = ww / hh
    fw = torch.where(in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], torch.round(hh * ratio[1]), ww))
    fh = torch.where(in_ratio < ratio[0], torch.round(ww / ratio[0]), hh)
    fw, fh = fw.clamp(1, None).minimum(ww), fh.clamp(1, None).minimum(hh)
    ftop, fleft = torch.div(hh - fh, 2, rounding_mode="floor"), torch.div(ww - fw, 2, rounding_mode="floor")
    boxes = torch.stack([
        torch.where(found, top_t, ftop), torch.where(found, left_t, fleft),
        torch.where(found, ch_t, fh), torch.where(found, cw_t, fw),
    ], dim=1)
    return boxes.to(device=out_device, dtype=torch.long)


def official_center_boxes(h: int | torch.Tensor, w: int | torch.Tensor, size: int, resize_to: int) -> torch.Tensor:
    """The BYOL authors' eval window ``[n, 4]`` (their ``_decode_and_center_crop``): the central square of side
    ``int(size / resize_to * min(h, w))`` (224 / 256 at 224 px, computed in float32 like TF) at offset
    ``((h - side) + 1) // 2`` (same for ``w``), to be resized to ``size`` afterwards."""
    hh, ww = torch.as_tensor(h).to(torch.long).reshape(-1), torch.as_tensor(w).to(torch.long).reshape(-1)
    hh, ww = torch.broadcast_tensors(hh, ww)
    frac = torch.tensor(size / resize_to, dtype=torch.float32)  # a Python double made float32, as in TF
    side = torch.floor(frac * torch.minimum(hh, ww).to(torch.float32)).to(torch.long).clamp(min=1)
    side = torch.minimum(side, torch.minimum(hh, ww))
    return torch.stack([torch.div(hh - side + 1, 2, rounding_mode="floor"),
                        torch.div(ww - side + 1, 2, rounding_mode="floor"), side, side], dim=1)


_TF_TABLE_SIZE = 1024  # TF quantises the tap phase to 1/1024 of a pixel (resize_bicubic_op.cc, kTableSize)


def _tf_cubic_table(a: float = -0.5) -> torch.Tensor:
    """TF's Keys-cubic lookup table ``[1025, 2]`` (near taps, far taps), evaluated in double, stored as float32."""
    x = torch.arange(_TF_TABLE_SIZE + 1, dtype=torch.float64) / _TF_TABLE_SIZE
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    x1 = x + 1.0
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    return torch.stack([near, far], dim=1).to(torch.float32)


_TF_TABLE = _tf_cubic_table()


def tf_bicubic_taps(in_len: torch.Tensor | int, out_len: torch.Tensor | int, pos: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tap indices and weights ``([B, n, 4] long, [B, n, 4] float32)`` of TF2 ``tf.image.resize(BICUBIC)``.

    That is ``resize_bicubic(half_pixel_centers=True)``: source ``(i + 0.5) * in / out - 0.5`` in float32, Keys
    cubic a = -0.5 looked up at the phase rounded to 1/1024, and taps that fall outside ``[0, in_len)`` get weight
    0 with the others renormalised to sum 1 (TF does NOT clamp the indices to the border there, unlike PyTorch).
    ``in_len``/``out_len``: ints or ``[B]``; ``pos``: output indices ``[B, n]`` (or ``[n]``).
    """
    dev = pos.device
    in_len = torch.as_tensor(in_len, device=dev).reshape(-1, 1)
    scale = in_len.to(torch.float32) / torch.as_tensor(out_len, device=dev).to(torch.float32).reshape(-1, 1)
    src = ((pos if pos.ndim == 2 else pos[None]).to(torch.float32) + 0.5) * scale - 0.5
    fl = torch.floor(src)
    phase = torch.round((src - fl) * _TF_TABLE_SIZE).to(torch.long)  # lrintf: round half to even, as torch.round
    table = _TF_TABLE.to(dev)
    w = torch.stack([table[phase, 1], table[phase, 0], table[_TF_TABLE_SIZE - phase, 0],
                     table[_TF_TABLE_SIZE - phase, 1]], dim=-1)
    idx = fl.to(torch.long)[..., None] + torch.arange(-1, 3, device=dev)
    inside = (idx >= 0) & (idx < in_len[..., None])
    w = torch.where(inside, w, torch.zeros_like(w))
    w = w * (1.0 / w.sum(dim=-1, keepdim=True))
    return torch.minimum(idx.clamp(min=0), in_len[..., None] - 1), w


def _tf_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF2 bicubic resize of ``[B, C, H, W]`` float (rows first, then columns, like TF's kernel), no clip."""
    h, w = x.shape[-2:]
    iy, wy = tf_bicubic_taps(h, size[0], torch.arange(size[0], device=x.device))
    ix, wx = tf_bicubic_taps(w, size[1], torch.arange(size[1], device=x.device))
    rows = (x[..., iy[0], :] * wy[0].to(x.dtype)[..., None]).sum(dim=-2)  # [B, C, out_h, W]
    return (rows[..., ix[0]] * wx[0].to(x.dtype)).sum(dim=-1)


def resize(img: torch.Tensor, size: tuple[int, int], kernel: str = "torch_bicubic") -> torch.Tensor:
    """Bicubic resize, half-pixel centres, no antialias, then clip to [0, 1].

    ``kernel="torch_bicubic"``: PyTorch's ``F.interpolate`` (Keys a = -0.75, indices clamped to the border);
    ``"tf_bicubic"``: TF2 ``tf.image.resize(BICUBIC)`` as the BYOL authors used it (``tf_bicubic_taps``).
    Bicubic overshoots near edges (negative lobes), hence the clip. ``img`` is ``[C, H, W]`` or ``[B, C, H, W]``.
    """
    if kernel not in RESIZE_KERNELS:
        raise ValueError(f"resize_kernel={kernel!r} is not one of {RESIZE_KERNELS}")
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    if not x.is_floating_point():
        x = x.float() / 255.0
    if kernel == "tf_bicubic":
        out = _tf_resize(x, tuple(size)).clamp_(0.0, 1.0)
    else:
        out = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return out[0] if squeeze else out


def random_resized_crop(
    images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor, size: int | tuple[int, int],
    kernel: str = "torch_bicubic",
) -> torch.Tensor:
    """Crop each image to its box (top, left, height, width) and bicubic-resize to ``size``, clipped to [0, 1].

    ``images``: a batch ``[B, C, H, W]`` or a list of ``[C, H_i, W_i]`` (uint8 is scaled by 1/255; in a list mixing
    1- and 3-channel images the 1-channel ones are repeated to RGB).
    """
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(images) != boxes.shape[0]:
        raise ValueError(f"{len(images)} images but {boxes.shape[0]} crop boxes")
    crops = []
    for img, (t, l, h, w) in zip(images, boxes.tolist()):
        if t < 0 or l < 0 or h < 1 or w < 1 or t + h > img.shape[-2] or l + w > img.shape[-1]:
            raise ValueError(f"crop box {(t, l, h, w)} lies outside an image of size {tuple(img.shape[-2:])}")
        crops.append(resize(img[:, t:t + h, l:l + w], out_hw, kernel))
    if len({c.shape[0] for c in crops}) > 1:  # a list mixing gray and RGB images: gray becomes RGB
        crops = [c.expand(3, -1, -1) for c in crops]
    return torch.stack(crops)


def hflip(images: torch.Tensor, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror left-right the samples whose ``flags`` entry is true (all samples when ``flags`` is None)."""
    flipped = torch.flip(images, dims=[-1])
    if flags is None:
        return flipped
    return torch.where(flags.to(torch.bool).view(-1, 1, 1, 1), flipped, images)


# ----------------------------------------------------------------------------------------------- colour
def adjust_brightness(images: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """ADD ``delta`` (per sample) to every channel, then clip: ``tf.image.adjust_brightness`` semantics."""
    _check_batch(images)
    # kornia.enhance.adjust_brightness is additive too, but torchvision / kornia ColorJitter multiply (tested)
    return kornia.enhance.adjust_brightness(images, torch.as_tensor(delta, dtype=images.dtype,
                                                                    device=images.device), clip_output=True)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale each channel around its own spatial mean by ``factor``, then clip (``tf.image.adjust_contrast``)."""
    _check_batch(images)
    # written here: kornia's adjust_contrast multiplies x without a mean and torchvision uses the grayscale mean
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return ((images - mean) * _per_sample(factor, images) + mean).clamp(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Multiply HSV saturation by ``factor`` (clipped to [0, 1]) and convert back (``tf.image.adjust_saturation``)."""
    _check_batch(images, channels=3)
    f = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
    return kornia.enhance.adjust_saturation(images, f).clamp(0.0, 1.0)


def adjust_hue(images: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """Rotate HSV hue by ``delta`` turns (in [-0.5, 0.5]), wrapping around (``tf.image.adjust_hue``)."""
    _check_batch(images, channels=3)
    d = torch.as_tensor(delta, dtype=images.dtype, device=images.device)
    # kornia measures hue in radians, TF in turns of the colour circle
    return kornia.enhance.adjust_hue(images, d * (2 * math.pi)).clamp(0.0, 1.0)


def to_grayscale(images: torch.Tensor, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Replace RGB by its luma 0.2989 R + 0.5870 G + 0.1140 B repeated on 3 channels, for samples with ``flags``."""
    _check_batch(images, channels=3)
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
    gray = kornia.color.rgb_to_grayscale(images, rgb_weights=weights).expand_as(images)
    if flags is None:
        return gray.contiguous()
    return torch.where(flags.to(torch.bool).view(-1, 1, 1, 1), gray, images)


def blur_kernel_size(image_size: int) -> int:
    """BYOL's rule: ``k = image_size // 10``, radius ``k // 2``, taps ``2 * radius + 1`` (224 -> 23, 32 -> 3)."""
    return 2 * ((image_size // 10) // 2) + 1


def gaussian_kernel1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised Gaussian taps ``[B, kernel_size]``, ``exp(-x^2 / 2 sigma^2)`` at ``x = -r..r``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd integer; got {kernel_size}")
    r = kernel_size // 2
    x = torch.arange(-r, r + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma.reshape(-1, 1) ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                  flags: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian blur, per-sample ``sigma`` [B], ZERO padding (TF 'SAME'), for samples with ``flags``."""
    _check_batch(images)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd integer; got {kernel_size}")
    s = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1).expand(images.shape[0])
    # kornia's gaussian kernel is the same formula; border 'constant' = zero padding like TF
    blurred = kornia.filters.gaussian_blur2d(images, (kernel_size, kernel_size), torch.stack([s, s], dim=1),
                                             border_type="constant", separable=True)
    if flags is None:
        return blurred
    return torch.where(flags.to(torch.bool).view(-1, 1, 1, 1), blurred, images)


def solarize(images: torch.Tensor, flags: torch.Tensor | None = None, threshold: float = 0.5) -> torch.Tensor:
    """``x -> 1 - x`` where ``x >= threshold``, for samples with ``flags`` (all when None)."""
    _check_batch(images)
    out = kornia.enhance.solarize(images, thresholds=threshold)  # where(x < t, x, 1 - x)
    if flags is None:
        return out
    return torch.where(flags.to(torch.bool).view(-1, 1, 1, 1), out, images)


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Channel-wise ``(x - mean) / std`` (ImageNet statistics by default)."""
    _check_batch(images)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


# ----------------------------------------------------------------------------------------------- evaluation
def short_side_shape(h: int, w: int, short: int) -> tuple[int, int]:
    """Output (h, w) when the short side becomes ``short``: long side ``int(short * long / short_in)`` (torchvision)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def resize_short_side(img: torch.Tensor | Sequence[torch.Tensor], size: int = 256,
                      kernel: str = "torch_bicubic") -> torch.Tensor | list:
    """Bicubic-resize so the shorter side is ``size`` (aspect kept), clipped; one image, a batch, or a list."""
    if isinstance(img, (list, tuple)):
        return [resize_short_side(i, size, kernel) for i in img]
    return resize(img, short_side_shape(img.shape[-2], img.shape[-1], size), kernel)


def center_crop(img: torch.Tensor | Sequence[torch.Tensor], size: int = 224) -> torch.Tensor:
    """Central ``size x size`` window (offset ``round((H - size) / 2)`` like torchvision); lists are stacked."""
    if isinstance(img, (list, tuple)):
        return torch.stack([center_crop(i, size) for i in img])
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop({size}) needs an image at least {size}x{size}; got {h}x{w} (resize first)")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[..., top:top + size, left:left + size]
