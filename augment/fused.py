"""Fused batched augmentation: what actually runs. ``augment.ops`` is the specification it is tested against.

Design (issue 4); the batched schedule has no data-dependent Python control flow, so ``torch.compile`` traces it
whole (tested with ``fullgraph=True``):

* crop + resize + flip of the whole batch = two batched matmuls ``out = Wy @ X @ Wx^T`` with per-sample sparse
  interpolation matrices. The rows of ``Wy``/``Wx`` hold exactly the four bicubic taps ``F.interpolate`` (or TF2's
  resize, ``resize_kernel="tf_bicubic"``) would use on the cropped image (indices clamped to the crop, or TF's
  out-of-crop taps dropped and renormalised, which a grid_sample over the whole image cannot do), so the
  result equals the reference to fp32 rounding; a flip is a reversal of ``Wx``'s rows, i.e. free. Variable-size
  images are first cut to their boxes and zero-padded to a common size (only the crops are copied).
* colour jitter (per-sample random order) + grayscale = one elementwise function with per-sample parameters
  (under torch.compile a handful of fused kernels; the contrast means are the only reductions). Saturation and hue
  commute (both act inside HSV and keep V), so any order of {B, C, S, H} embeds in the fixed stage template
  h-A-h-A-h, where "h" is a combined saturation+hue HSV step in closed form and "A" a brightness-or-contrast affine
  step; a stage a sample does not use gets identity parameters. That is 5 stages instead of the 16 of a "compute
  all four ops in each of four slots" scheme. On CPU (eager) each stage runs only on the samples that use it.
* blur = per-sample Toeplitz slabs: each axis is cut into overlapping windows of ``32 + 2r`` samples (a view) and
  multiplied by a ``[32, 32 + 2r]`` banded slab, one batched matmul per axis (4x fewer FLOPs than a full banded
  matrix at 224 px); zero padding is explicit (TF 'SAME'). On CPU (eager) only the images that blur are blurred.
* solarize + normalisation = one final elementwise pass (solarize comes after blur in the paper's order).

Two schedules of the same stage functions (``apply_view(per_sample=...)``): the batched one above (GPU, compile),
and on CPU for sizes >= 96 px a loop over images that runs only the stages each image uses, restricts the crop
matmuls to the box and keeps every intermediate in cache (2x faster there than the batched schedule).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from augment.ops import GRAY_WEIGHTS, RESIZE_KERNELS, gaussian_kernel1d, official_center_boxes, short_side_shape, \
    tf_bicubic_taps
from augment.params import ViewParams

__all__ = ["resize_matrix", "crop_resize_flip", "colour_pass", "blur", "solarize_normalize", "prepare_batch",
           "apply_view", "apply_eval_train", "apply_eval_test", "STAGE_TEMPLATE", "PER_SAMPLE_MIN_SIZE"]

PER_SAMPLE_MIN_SIZE = 96  # measured CPU crossover of the per-sample vs batched path (bench/augment.py)
_A = -0.75  # PyTorch's bicubic coefficient (F.interpolate and grid_sample); TF uses -0.5


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Keys cubic-convolution weights ``[..., 4]`` for taps at offsets -1, 0, 1, 2 from floor(src)."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def resize_matrix(seg_start: torch.Tensor, seg_len: torch.Tensor, out_full: torch.Tensor | int,
                  out_start: torch.Tensor | int, count: int, total: int, dtype=torch.float32,
                  kernel: str = "torch_bicubic") -> torch.Tensor:
    """Per-sample bicubic resampling matrices ``[B, count, total]``.

    Row ``i`` holds the taps of output index ``out_start + i`` when the input segment
    ``[seg_start, seg_start + seg_len)`` of an axis of length ``total`` is resized to ``out_full`` samples with
    ``F.interpolate(mode='bicubic', align_corners=False)`` (tap indices clamped to the segment), or with TF2's
    ``tf.image.resize(BICUBIC)`` for ``kernel="tf_bicubic"`` (``augment.ops.tf_bicubic_taps``).
    """
    if kernel not in RESIZE_KERNELS:
        raise ValueError(f"resize_kernel={kernel!r} is not one of {RESIZE_KERNELS}")
    dev = seg_start.device
    if kernel == "tf_bicubic":
        pos = torch.arange(count, device=dev)[None] + torch.as_tensor(out_start, device=dev).reshape(-1, 1)
        idx, w = tf_bicubic_taps(seg_len, out_full, pos)
        taps = idx + seg_start.reshape(-1, 1, 1)
        mat = torch.zeros(taps.shape[0], count, total, device=dev, dtype=torch.float32)
        return mat.scatter_add_(2, taps, w).to(dtype)
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


def crop_resize_flip(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, kernel: str = "torch_bicubic") -> torch.Tensor:
    """Crop each sample of ``x [B, C, H, W]`` to its box, bicubic-resize to ``size``, flip where asked, clip.

    ``dtype`` is the compute dtype (bfloat16 uses tensor cores on GPUs; uint8 values are exact in it).
    """
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    xf = x.to(dtype)
    t, l, h, w = boxes.to(x.device).unbind(1)
    # fold the uint8 scaling into the weights
    wy = (resize_matrix(t, h, size, 0, size, x.shape[-2], kernel=kernel) * scale).to(dtype)
    wx = resize_matrix(l, w, size, 0, size, x.shape[-1], kernel=kernel).to(dtype)
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


def _mask(compare, a: torch.Tensor, b) -> torch.Tensor:
    """``compare(a, b)`` (``torch.eq``, ``torch.ge``) as 0/1 in ``a``'s dtype. On CPU, a comparison written straight
    into a float tensor is ~10x faster than a bool result that later feeds ``torch.where`` or a multiply (neither is
    vectorised for bool there). The output is contiguous, as torch.compile requires of ``out=``."""
    return compare(a, b, out=torch.empty(a.shape, dtype=a.dtype, device=a.device))


def _hsv_stage(x: torch.Tensor, sat: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Scale HSV saturation by ``sat`` (clipped to 1) and rotate hue by ``hue`` turns, in closed form on RGB.

    With v = max, c = max - min (chroma) and H the hexcone hue in [0, 6): ``rgb_n = v - c' * T((n + H') mod 6)``,
    ``T(k) = clamp(min(k, 4 - k), 0, 1)``, n = 5, 3, 1 for r, g, b; saturation ``s' = min(s * f, 1)`` is
    ``c' = min(f * c, v)``. The hexcone branch (which channel is the max, r winning ties, then g) is a sum of the three
    branch values weighted by 0/1 masks (exact: one weight is 1), and ``mod 6`` is ``k - 6 floor(k / 6)``: both
    several times faster than ``torch.where`` / ``remainder`` on CPU. In-place updates of fresh temporaries keep
    allocations (page faults on CPU) down.
    """
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    is_r = _mask(torch.eq, v, r)
    is_g = _mask(torch.eq, v, g).mul_(1 - is_r)
    is_b = (1 - is_r).sub_(is_g)
    hc = (g - b).mul_(is_r).add_((b - r).add_(c, alpha=2).mul_(is_g)).add_((r - g).add_(c, alpha=4).mul_(is_b))
    h = hc.div_(c.clamp_min(1e-30)).add_(6 * hue.view(-1, 1, 1).to(x.dtype))  # where c = 0, hc = 0 too
    c = torch.minimum(c.mul_(sat.view(-1, 1, 1).to(x.dtype)), v)
    n = torch.tensor(_RGB_N, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = h[:, None] + n
    k = k.sub_(torch.floor(k * (1 / 6)).mul_(6))  # k mod 6
    return torch.addcmul(v[:, None], c[:, None], torch.minimum(k, 4 - k).clamp_(0.0, 1.0), value=-1)


def _stage_params(p: ViewParams, device: torch.device, dtype: torch.dtype
                  ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per template stage: (use mask [B], (param1 [B], param2 [B])) with identity values where unused."""
    order = p.order.to(device)
    stage = _STAGES.to(device)[order[:, 0] * 64 + order[:, 1] * 16 + order[:, 2] * 4 + order[:, 3]]
    on = p.jitter.to(device)
    values = (p.brightness, p.contrast, p.saturation, p.hue)
    identity = (0.0, 1.0, 1.0, 0.0)
    uses, params = [], []
    for k, kind in enumerate(STAGE_TEMPLATE):
        ops = (0, 1) if kind == "A" else (2, 3)
        use = [on & (stage[:, op] == k) for op in ops]
        vals = tuple(torch.where(u, values[op].to(device, dtype), torch.full_like(u, identity[op], dtype=dtype))
                     for u, op in zip(use, ops))
        uses.append(use[0] | use[1])
        params.append(vals)
    return uses, params, stage


def _run_stage(kind: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "A":
        return _affine_stage(x, a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1))
    return _hsv_stage(x, a, b)


def colour_pass(x: torch.Tensor, p: ViewParams, subset: bool = False) -> torch.Tensor:
    """Colour jitter (per-sample random order, clip after each op) then grayscale, for RGB ``x`` in [0, 1].

    ``subset=False``: every stage runs on the whole batch with identity parameters where a sample does not use it
    (static shapes: GPU, compile). ``True`` (CPU, where the index sync is free): each stage runs only on the
    samples that use it, roughly halving the work.
    """
    uses, params, _ = _stage_params(p, x.device, x.dtype)
    gray = p.gray.to(x.device)
    if not subset:
        for kind, (a, b) in zip(STAGE_TEMPLATE, params):
            x = _run_stage(kind, x, a, b)
        return torch.where(gray.view(-1, 1, 1, 1), _grayscale(x), x)
    owned = False  # the caller's tensor is never written: the first subset update copies, later ones are in place
    for kind, use, (a, b) in zip(STAGE_TEMPLATE, uses, params):
        idx = use.nonzero().flatten()
        if idx.numel():
            x = _put(x, idx, _run_stage(kind, x.index_select(0, idx), a[idx], b[idx]), owned)
            owned = True
    idx = gray.nonzero().flatten()
    return _put(x, idx, _grayscale(x.index_select(0, idx)), owned) if idx.numel() else x


def _put(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, in_place: bool) -> torch.Tensor:
    return x.index_copy_(0, idx, rows) if in_place else x.index_copy(0, idx, rows)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    gw = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * gw).sum(dim=1, keepdim=True).expand_as(x)


def blur_taps(sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian taps ``[B, K]``; a unit impulse (identity) where ``apply`` is false."""
    r = kernel_size // 2
    taps = gaussian_kernel1d(sigma.to(torch.float32), kernel_size)
    # far taps of a narrow Gaussian fall into the float32 subnormal range, where x86 arithmetic is ~100x slower;
    # they weigh < 1e-30, so dropping them changes nothing measurable
    taps = torch.where(taps < 1e-30, torch.zeros_like(taps), taps)
    delta = torch.zeros_like(taps)
    delta[:, r] = 1.0
    return torch.where(apply.view(-1, 1), taps, delta)


_BLOCK = 32  # output rows per block of the banded blur; window = block + 2 * radius input rows


def _band_block(taps: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, block, block + K - 1]`` Toeplitz slab: out row i = sum_k taps[k] * window row (i + k)."""
    k = taps.shape[1]
    i = torch.arange(block, device=taps.device)[:, None]
    j = torch.arange(block + k - 1, device=taps.device)[None, :]
    off = j - i
    inside = (off >= 0) & (off < k)
    return taps[:, off.clamp(0, k - 1)] * inside


def _blur_axis(x: torch.Tensor, slab: torch.Tensor, r: int, block: int) -> torch.Tensor:
    """Blur along the last axis: zero-pad, cut into overlapping windows (a view), one batched matmul per sample."""
    b, c, h, w = x.shape
    nb = -(-w // block)
    xp = torch.nn.functional.pad(x, (r, r + nb * block - w))  # zero padding = TF 'SAME'
    win = xp.unfold(-1, block + 2 * r, block)  # [B, C, H, nb, block + 2r]
    out = win.reshape(b, c * h * nb, block + 2 * r) @ slab.transpose(1, 2)  # [B, C*H*nb, block]
    return out.view(b, c, h, nb * block)[..., :w]


def blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable per-sample Gaussian blur with zero padding, as banded block matmuls (W pass, then H pass)."""
    r = kernel_size // 2
    block = min(_BLOCK, max(x.shape[-1], x.shape[-2]))
    slab = _band_block(blur_taps(sigma.to(x.device), apply.to(x.device), kernel_size), block).to(x.dtype)
    return _blur_slab(x, slab, r, block)


def _blur_slab(x: torch.Tensor, slab: torch.Tensor, r: int, block: int) -> torch.Tensor:
    y = _blur_axis(x, slab, r, block)
    return _blur_axis(y.transpose(-1, -2), slab, r, block).transpose(-1, -2)


def solarize_normalize(x: torch.Tensor, solarize: torch.Tensor | None, threshold: float,
                       mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-sample solarisation (``1 - x`` where ``x >= threshold``) fused with channel normalisation."""
    if solarize is not None:
        # |m - x| with m = 1 where the sample solarises and x >= threshold, else 0: 1 - x or x exactly (x >= 0),
        # and several times faster than torch.where on CPU
        flip = _mask(torch.ge, x, threshold).mul_(solarize.to(x.device, x.dtype).view(-1, 1, 1, 1))
        x = flip.sub_(x).abs_()
    scale = 1.0 / torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    shift = -torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) * scale
    return torch.addcmul(shift, x, scale).contiguous()  # (x - mean) / std as one multiply-add (no division)


def apply_view(images: torch.Tensor | Sequence[torch.Tensor], p: ViewParams, preset,
               per_sample: bool | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One BYOL view of a batch with given parameters: crop/flip/resize -> colour -> blur -> solarize -> normalise.

    ``per_sample=False``: the whole batch at once, static shapes, no host sync - for GPUs, torch.compile and CUDA
    graphs. ``True``: the same stage functions, one image at a time and only the stages it uses (no identity work
    for unselected ops, crop matmuls restricted to the box, every intermediate cache-resident): about 2x faster in
    eager CPU mode at 224 px, slower below ~96 px where per-call overhead dominates. Default (None): True on CPU
    for sizes >= PER_SAMPLE_MIN_SIZE, else False. ``dtype``: dtype of the resampling/blur matmuls of the batched
    schedule (e.g. torch.bfloat16 for tensor cores); colour math and the output are always float32.
    """
    dev = images.device if torch.is_tensor(images) else images[0].device
    if per_sample is None:
        per_sample = dev.type == "cpu" and preset.size >= PER_SAMPLE_MIN_SIZE and dtype == torch.float32
    if per_sample:
        return _apply_view_per_sample(images, p, preset)
    x, boxes = prepare_batch(images, p.boxes)
    # matmuls in ``dtype``; the colour pass stays float32 (bf16 hue arithmetic would be off by ~0.05), which costs
    # little once torch.compile fuses it (memory traffic, not arithmetic, bounds it)
    x = crop_resize_flip(x, boxes, preset.size, p.flip, dtype, _kernel(preset)).float()
    subset = x.device.type == "cpu" and not _tracing()  # CPU eager: skip the samples a stage leaves unchanged
    x = colour_pass(x, p, subset=subset)
    if preset.blur_p > 0 and subset:  # static preset switch, not data-dependent
        idx = p.blur.to(x.device).nonzero().flatten()  # view 2 blurs 10% of the images
        if idx.numel():
            rows = blur(x.index_select(0, idx).to(dtype), p.sigma[idx], p.blur[idx], preset.kernel_size)
            x = x.index_copy_(0, idx, rows.float())  # x is this function's own (fresh from the crop)
    elif preset.blur_p > 0:
        x = blur(x.to(dtype), p.sigma, p.blur, preset.kernel_size).float()
    return solarize_normalize(x, p.solarize if preset.solarize_p > 0 else None, preset.solarize_threshold,
                              preset.mean, preset.std)


def _kernel(preset) -> str:
    return getattr(preset, "resize_kernel", "torch_bicubic")


def _tracing() -> bool:
    """True while torch.compile traces: keep shapes static there even on CPU."""
    return torch.compiler.is_compiling()


def _apply_view_per_sample(images: torch.Tensor | Sequence[torch.Tensor], p: ViewParams, preset) -> torch.Tensor:
    """Eager path of ``apply_view``: a loop over images running only the stages each one uses."""
    n, size = len(images), preset.size
    dev = images.device if torch.is_tensor(images) else images[0].device
    p = p.to(dev)
    uses, params, _ = _stage_params(p, dev, torch.float32)
    uses = torch.stack(uses, 1).tolist()
    r = preset.kernel_size // 2
    block = min(_BLOCK, size)
    slabs = _band_block(blur_taps(p.sigma, torch.ones_like(p.blur), preset.kernel_size), block)
    boxes, gray, blur_on = p.boxes.tolist(), p.gray.tolist(), p.blur.tolist()
    solar = p.solarize.tolist() if preset.solarize_p > 0 else [False] * n
    # every image's resampling matrices in one go (their columns cover the box only; sliced per image below)
    zero = torch.zeros(n, dtype=torch.long, device=dev)
    uint8 = images[0].dtype == torch.uint8
    kernel = _kernel(preset)
    wy_all = resize_matrix(zero, p.boxes[:, 2], size, 0, size, int(p.boxes[:, 2].max()),
                           kernel=kernel) * (1 / 255 if uint8 else 1)
    wx_all = resize_matrix(zero, p.boxes[:, 3], size, 0, size, int(p.boxes[:, 3].max()), kernel=kernel)
    out = torch.empty(n, 3, size, size, device=dev)
    flip = p.flip.tolist()
    # (x - mean) / std as one multiply-add: division is the slowest elementwise op on CPU
    scale = 1.0 / torch.tensor(preset.std, device=dev).view(1, -1, 1, 1)
    shift = -torch.tensor(preset.mean, device=dev).view(1, -1, 1, 1) * scale
    for i in range(n):
        t, l, h, w = boxes[i]
        crop = images[i][:, t:t + h, l:l + w][None].to(torch.float32)  # only the box is read
        crop = crop.expand(-1, 3, -1, -1) if crop.shape[1] == 1 else crop
        wx = wx_all[i:i + 1, :, :w]
        wx = wx.flip(1) if flip[i] else wx  # a flip reverses the output columns: only this image's small matrix
        x = _matmul_resample(crop, wy_all[i:i + 1, :, :h], wx).clamp_(0.0, 1.0)
        for k, kind in enumerate(STAGE_TEMPLATE):
            if uses[i][k]:
                x = _run_stage(kind, x, params[k][0][i:i + 1], params[k][1][i:i + 1])
        if gray[i]:
            x = _grayscale(x)
        if blur_on[i] and preset.blur_p > 0:
            x = _blur_slab(x, slabs[i:i + 1], r, block)
        if solar[i]:
            x = _mask(torch.ge, x, preset.solarize_threshold).sub_(x).abs_()  # 1 - x where x >= threshold
        torch.addcmul(shift, x, scale, out=out[i:i + 1])
    return out


def apply_eval_train(images, boxes: torch.Tensor, flip: torch.Tensor, preset) -> torch.Tensor:
    """Linear-eval train transform with given parameters: random resized crop + flip, normalised."""
    x, boxes = prepare_batch(images, boxes)
    x = crop_resize_flip(x, boxes, preset.size, flip, kernel=_kernel(preset))
    return solarize_normalize(x, None, 0.5, preset.mean, preset.std)


def apply_eval_test(images: torch.Tensor | Sequence[torch.Tensor], resize_to: int, size: int,
                    mean: Sequence[float], std: Sequence[float], eval_crop: str = "resize_then_crop",
                    kernel: str = "torch_bicubic") -> torch.Tensor:
    """The linear-eval test view, normalised, as one resampling per axis.

    ``eval_crop="resize_then_crop"``: resize the short side to ``resize_to`` then centre-crop ``size``; equals
    ``center_crop(resize_short_side(img, resize_to), size)``: the crop just selects which output rows and columns
    of the resize to compute. ``"official"``: the authors' central square of ``size / resize_to`` of the short side
    (``augment.ops.official_center_boxes``) resized to ``size``.
    """
    if torch.is_tensor(images):
        images = list(images)
    if not images:
        raise ValueError("cannot transform an empty batch")
    if eval_crop == "official":
        hw = torch.tensor([[int(i.shape[-2]), int(i.shape[-1])] for i in images])
        boxes = official_center_boxes(hw[:, 0], hw[:, 1], size, resize_to)
        x, boxes = prepare_batch(images, boxes)
        return solarize_normalize(crop_resize_flip(x, boxes, size, kernel=kernel), None, 0.5, mean, std)
    if eval_crop != "resize_then_crop":
        raise ValueError(f"eval_crop={eval_crop!r} is not one of ('official', 'resize_then_crop')")
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
    wy = resize_matrix(zeros.to(dev), hw[:, 0].to(dev), rs[:, 0].to(dev), top.to(dev), size, x.shape[-2],
                       kernel=kernel) * scale
    wx = resize_matrix(zeros.to(dev), hw[:, 1].to(dev), rs[:, 1].to(dev), left.to(dev), size, x.shape[-1],
                       kernel=kernel)
    out = _matmul_resample(x.to(torch.float32), wy, wx).clamp_(0.0, 1.0)
    return solarize_normalize(out, None, 0.5, mean, std)
