"""Fused batched augmentation: what actually runs. ``augment.ops`` is the specification it is tested against.

Design (issue 4), all free of data-dependent Python control flow so ``torch.compile`` can trace it:

* crop + resize + flip of the whole batch = two batched matmuls ``out = Wy @ X @ Wx^T`` with per-sample sparse
  interpolation matrices. The rows of ``Wy``/``Wx`` hold exactly the four bicubic taps ``F.interpolate`` would use
  on the cropped image (indices clamped to the crop, which a grid_sample over the whole image cannot do), so the
  result equals the reference to fp32 rounding; a flip is a reversal of ``Wx``'s rows, i.e. free. Variable-size
  images are first cut to their boxes and zero-padded to a common size (only the crops are copied).
* colour jitter (per-sample random order) + grayscale = one elementwise pass. Saturation and hue commute (both act
  inside HSV and keep V), so any order of {B, C, S, H} embeds in the fixed stage template h-A-h-A-h, where "h" is a
  combined saturation+hue HSV step and "A" a brightness-or-contrast affine step; a stage not used by a sample gets
  identity parameters. That is 5 stages instead of the 16 a "compute all four ops in each of four slots" scheme needs.
* blur = per-sample banded (Toeplitz) matrices, again two batched matmuls; truncating the band = zero padding.
* solarize + normalisation = one final elementwise pass (solarize comes after blur in the paper's order).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from augment.ops import GRAY_WEIGHTS, gaussian_kernel1d, short_side_shape
from augment.params import ViewParams

__all__ = ["resize_matrix", "crop_resize_flip", "colour_pass", "blur", "solarize_normalize", "prepare_batch",
           "apply_view", "apply_eval_train", "apply_eval_test", "STAGE_TEMPLATE"]

_A = -0.75  # PyTorch's bicubic coefficient (F.interpolate and grid_sample); TF uses -0.5


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Keys cubic-convolution weights ``[..., 4]`` for taps at offsets -1, 0, 1, 2 from floor(src)."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def resize_matrix(seg_start: torch.Tensor, seg_len: torch.Tensor, out_full: torch.Tensor | int,
                  out_start: torch.Tensor | int, count: int, total: int, dtype=torch.float32) -> torch.Tensor:
    """Per-sample bicubic resampling matrices ``[B, count, total]``.

    Row ``i`` holds the taps of output index ``out_start + i`` when the input segment
    ``[seg_start, seg_start + seg_len)`` of an axis of length ``total`` is resized to ``out_full`` samples with
    ``F.interpolate(mode='bicubic', align_corners=False)`` (tap indices clamped to the segment).
    """
    dev = seg_start.device
    seg_len_f = seg_len.to(torch.float32)
    scale = seg_len_f / torch.as_tensor(out_full, device=dev, dtype=torch.float32)  # as PyTorch: float in/out
    i = torch.arange(count, device=dev, dtype=torch.float32)[None] + torch.as_tensor(
        out_start, device=dev, dtype=torch.float32).reshape(-1, 1)
    src = scale.reshape(-1, 1) * (i + 0.5) - 0.5
    fl = torch.floor(src)
    w = _cubic_weights(src - fl)  # [B, count, 4]
    taps = fl.to(torch.long)[..., None] + torch.arange(-1, 3, device=dev)
    taps = torch.minimum(taps.clamp(min=0), (seg_len - 1).reshape(-1, 1, 1)) + seg_start.reshape(-1, 1, 1)
    mat = torch.zeros(w.shape[0], count, total, device=dev, dtype=torch.float32)
    return mat.scatter_add_(2, taps, w).to(dtype)


def _matmul_resample(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """``wy @ x @ wx^T`` per sample, contracting the larger axis first to save work."""
    wy, wx = wy[:, None], wx[:, None]
    if x.shape[-1] >= x.shape[-2]:
        return wy @ (x @ wx.transpose(-1, -2))
    return (wy @ x) @ wx.transpose(-1, -2)


def crop_resize_flip(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Crop each sample of ``x [B, C, H, W]`` to its box, bicubic-resize to ``size``, flip where asked, clip."""
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    xf = x.to(torch.float32)
    t, l, h, w = boxes.to(x.device).unbind(1)
    wy = resize_matrix(t, h, size, 0, size, x.shape[-2]) * scale  # fold the uint8 scaling into the weights
    wx = resize_matrix(l, w, size, 0, size, x.shape[-1])
    if flip is not None:
        wx = torch.where(flip.to(x.device).view(-1, 1, 1), wx.flip(1), wx)
    return _matmul_resample(xf, wy, wx).clamp_(0.0, 1.0)


def prepare_batch(images: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3-channel batch tensor from a batch or a list of variable-size images, cropped to ``boxes`` for lists.

    For a list, only each box is copied into a zero-padded ``[B, 3, max_h, max_w]`` tensor (boxes become
    (0, 0, h, w)), which bounds memory by the crops, not by the largest image.
    """
    if torch.is_tensor(images):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3; got shape {tuple(images.shape)}")
        return (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images), boxes
    if boxes is None:
        raise ValueError("a list of images needs crop boxes (one per image)")
    crops = []
    for img, (t, l, h, w) in zip(images, boxes.tolist()):
        crops.append(img[:, t:t + h, l:l + w])
    hmax, wmax = max(c.shape[-2] for c in crops), max(c.shape[-1] for c in crops)
    out = torch.zeros(len(crops), 3, hmax, wmax, dtype=crops[0].dtype, device=crops[0].device)
    for i, c in enumerate(crops):
        out[i, :, :c.shape[-2], :c.shape[-1]] = c  # broadcasting expands 1-channel crops to RGB
    new_boxes = torch.zeros_like(boxes)
    new_boxes[:, 2:] = boxes[:, 2:]
    return out, new_boxes


# ------------------------------------------------------------------------------------------------ colour
STAGE_TEMPLATE = "hAhAh"  # h = saturation+hue HSV step, A = brightness-or-contrast affine step


def _stage_table() -> torch.Tensor:
    """``table[code, op]`` = template stage running op (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    table = torch.zeros(256, 4, dtype=torch.long)
    for perm in itertools.permutations(range(4)):
        pos, prev = -1, None
        for op in perm:
            kind = "A" if op < 2 else "h"
            if not (kind == "h" and prev == "h"):  # consecutive S/H commute: share one HSV stage
                pos = STAGE_TEMPLATE.index(kind, pos + 1)
            table[perm[0] * 64 + perm[1] * 16 + perm[2] * 4 + perm[3], op] = pos
            prev = kind
    return table


_STAGES = _stage_table()
_RGB_N = (5.0, 3.0, 1.0)  # hsv->rgb phase of r, g, b


def _affine_stage(x: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness (``x + delta``) and/or contrast around the per-channel mean, then clip."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return torch.addcmul(mean * (1 - factor) + delta, x, factor).clamp_(0.0, 1.0)


def _hsv_stage(x: torch.Tensor, sat: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Scale HSV saturation by ``sat`` (clipped to 1) and rotate hue by ``hue`` turns, in closed form on RGB."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = h + 6 * hue.view(-1, 1, 1)
    c = torch.minimum(c * sat.view(-1, 1, 1), v)  # s' = min(s * f, 1)  <=>  chroma' = min(f * chroma, v)
    n = torch.tensor(_RGB_N, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h[:, None] + n, 6)
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp_(0.0, 1.0)


def colour_pass(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Colour jitter (per-sample random order, clip after each op) then grayscale, for RGB ``x`` in [0, 1]."""
    bsz = x.shape[0]
    order = p.order.to(x.device)
    stage = _STAGES.to(x.device)[order[:, 0] * 64 + order[:, 1] * 16 + order[:, 2] * 4 + order[:, 3]]
    on = p.jitter.to(x.device)

    def pick(op: int, k: int, value: torch.Tensor, identity: float) -> torch.Tensor:
        use = on & (stage[:, op] == k)
        return torch.where(use, value.to(x.device, x.dtype), torch.full_like(value, identity, dtype=x.dtype))

    for k, kind in enumerate(STAGE_TEMPLATE):
        if kind == "A":
            x = _affine_stage(x, pick(0, k, p.brightness, 0.0).view(bsz, 1, 1, 1),
                              pick(1, k, p.contrast, 1.0).view(bsz, 1, 1, 1))
        else:
            x = _hsv_stage(x, pick(2, k, p.saturation, 1.0), pick(3, k, p.hue, 0.0))
    gw = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (x * gw).sum(dim=1, keepdim=True)
    return torch.where(p.gray.to(x.device).view(-1, 1, 1, 1), gray, x)


def blur_matrix(sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int, n: int) -> torch.Tensor:
    """Per-sample banded ``[B, n, n]`` Gaussian matrices (zero padding); the identity where ``apply`` is false."""
    r = kernel_size // 2
    taps = gaussian_kernel1d(sigma.to(torch.float32), kernel_size)
    delta = torch.zeros_like(taps)
    delta[:, r] = 1.0
    taps = torch.where(apply.view(-1, 1), taps, delta)
    idx = torch.arange(n, device=sigma.device)
    off = idx[None, :] - idx[:, None]  # j - i
    band = off.abs() <= r
    return taps[:, (off + r).clamp(0, kernel_size - 1)] * band


def blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable per-sample Gaussian blur with zero padding as two batched banded matmuls."""
    ky = blur_matrix(sigma.to(x.device), apply.to(x.device), kernel_size, x.shape[-2]).to(x.dtype)
    kx = ky if x.shape[-1] == x.shape[-2] else blur_matrix(
        sigma.to(x.device), apply.to(x.device), kernel_size, x.shape[-1]).to(x.dtype)
    return _matmul_resample(x, ky, kx)


def solarize_normalize(x: torch.Tensor, solarize: torch.Tensor | None, threshold: float,
                       mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-sample solarisation (``1 - x`` where ``x >= threshold``) fused with channel normalisation."""
    if solarize is not None:
        flip = solarize.to(x.device).view(-1, 1, 1, 1) & (x >= threshold)
        x = torch.where(flip, 1.0 - x, x)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def apply_view(images: torch.Tensor | Sequence[torch.Tensor], p: ViewParams, preset) -> torch.Tensor:
    """One BYOL view of a batch with given parameters: crop/flip/resize -> colour -> blur -> solarize -> normalise."""
    x, boxes = prepare_batch(images, p.boxes)
    x = crop_resize_flip(x, boxes, preset.size, p.flip)
    x = colour_pass(x, p)
    if preset.blur_p > 0:  # static preset switch, not data-dependent
        x = blur(x, p.sigma, p.blur, preset.kernel_size)
    return solarize_normalize(x, p.solarize if preset.solarize_p > 0 else None, preset.solarize_threshold,
                              preset.mean, preset.std)


def apply_eval_train(images, boxes: torch.Tensor, flip: torch.Tensor, preset) -> torch.Tensor:
    """Linear-eval train transform with given parameters: random resized crop + flip, normalised."""
    x, boxes = prepare_batch(images, boxes)
    return solarize_normalize(crop_resize_flip(x, boxes, preset.size, flip), None, 0.5, preset.mean, preset.std)


def apply_eval_test(images: torch.Tensor | Sequence[torch.Tensor], resize_to: int, size: int,
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize short side to ``resize_to`` then centre-crop ``size``, as one resampling per axis, normalised.

    Equals ``center_crop(resize_short_side(img, resize_to), size)``: the crop just selects which output rows and
    columns of the resize to compute.
    """
    if torch.is_tensor(images):
        images = list(images)
    if not images:
        raise ValueError("cannot transform an empty batch")
    shapes = [short_side_shape(int(i.shape[-2]), int(i.shape[-1]), resize_to) for i in images]
    for (rh, rw), img in zip(shapes, images):
        if rh < size or rw < size:
            raise ValueError(f"resize {resize_to} of an image {tuple(img.shape[-2:])} is smaller than crop {size}")
    hw = torch.tensor([[int(i.shape[-2]), int(i.shape[-1])] for i in images])
    rs = torch.tensor(shapes)
    zeros = torch.zeros(len(images), dtype=torch.long)
    x, _ = prepare_batch(images, torch.stack([zeros, zeros, hw[:, 0], hw[:, 1]], 1))
    dev = x.device
    top = torch.round((rs[:, 0] - size) / 2.0).long()
    left = torch.round((rs[:, 1] - size) / 2.0).long()
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    wy = resize_matrix(zeros.to(dev), hw[:, 0].to(dev), rs[:, 0].to(dev), top.to(dev), size, x.shape[-2]) * scale
    wx = resize_matrix(zeros.to(dev), hw[:, 1].to(dev), rs[:, 1].to(dev), left.to(dev), size, x.shape[-1])
    out = _matmul_resample(x.to(torch.float32), wy, wx).clamp_(0.0, 1.0)
    return solarize_normalize(out, None, 0.5, mean, std)
