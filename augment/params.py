"""All randomness of a view, drawn in one place: per-sample parameter tensors consumed by the ops.

The number of random numbers drawn depends only on the batch size (never on the data), so a view is reproducible
bit-exactly from the generator state and the sampling is free of data-dependent control flow.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from augment.ops import sample_crop_boxes
from augment.presets import ViewPreset

__all__ = ["ViewParams", "sample_view_params", "uniform"]


@dataclass
class ViewParams:
    """Per-sample parameters of one view; every field is a tensor with leading dimension B."""

    boxes: torch.Tensor       # [B, 4] long: top, left, height, width in input pixels
    flip: torch.Tensor        # [B] bool
    jitter: torch.Tensor      # [B] bool: colour jitter applied
    brightness: torch.Tensor  # [B] additive delta
    contrast: torch.Tensor    # [B] factor
    saturation: torch.Tensor  # [B] factor
    hue: torch.Tensor         # [B] shift in turns
    order: torch.Tensor       # [B, 4] long: permutation of (brightness, contrast, saturation, hue)
    gray: torch.Tensor        # [B] bool
    blur: torch.Tensor        # [B] bool
    sigma: torch.Tensor       # [B] blur sigma in pixels
    solarize: torch.Tensor    # [B] bool

    def to(self, device: torch.device | str) -> "ViewParams":
        """Move every tensor to ``device``."""
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, idx) -> "ViewParams":
        """Parameters of a subset of samples (an index, slice or mask)."""
        return ViewParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def uniform(lo: float, hi: float, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` float32 draws from U[lo, hi)."""
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def sample_view_params(
    preset: ViewPreset,
    heights: int | torch.Tensor,
    widths: int | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    rows: tuple[int, int] | None = None,
) -> ViewParams:
    """Draw one view's parameters for ``n`` images of the given sizes (ints, or ``[n]`` tensors).

    Draws happen on the generator's device (or ``device`` when there is no generator) and the result is moved to
    ``device``, so a CPU generator gives the same parameters whatever device the batch is on.

    ``rows=(offset, total)``: these ``n`` images are rows ``offset .. offset + n`` of a batch of ``total`` images
    split between data-parallel processes. The numbers drawn are those of the whole batch and these rows get the
    parameters that one process drawing for all ``total`` images gives them, so N ranks seeded alike augment exactly
    as one device does (the other rows' draws cost ``total`` x a few scalars, no pixels).
    """
    if n < 1:
        raise ValueError("cannot augment an empty batch (n = 0)")
    if rows is not None:
        offset, total = int(rows[0]), int(rows[1])
        if offset < 0 or offset + n > total:
            raise ValueError(f"rows={rows}: {n} images from row {offset} do not fit in a batch of {total}")
        if (offset, total) != (0, n):
            def whole(side: int | torch.Tensor) -> torch.Tensor:  # this batch's sides in place; the others': any
                side = torch.as_tensor(side).to(torch.float64).expand(n)
                return torch.cat([side[:1].expand(offset), side, side[:1].expand(total - offset - n)])

            return sample_view_params(preset, whole(heights), whole(widths), total, generator, device
                                      )[offset:offset + n]
    out_device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    gdev = generator.device if generator is not None else out_device
    boxes = sample_crop_boxes(heights if not torch.is_tensor(heights) else heights.to(gdev),
                              widths if not torch.is_tensor(widths) else widths.to(gdev), n, generator,
                              preset.crop_scale, preset.crop_ratio, device=gdev,
                              sampler=getattr(preset, "crop_sampler", "torchvision"))
    coins = torch.rand(n, 5, generator=generator, device=gdev)  # flip, jitter, gray, blur, solarize
    b, c, s, h = preset.brightness, preset.contrast, preset.saturation, preset.hue
    params = ViewParams(
        boxes=boxes,
        flip=coins[:, 0] < preset.flip_p,
        jitter=coins[:, 1] < preset.jitter_p,
        brightness=uniform(-b, b, n, generator, gdev),
        contrast=uniform(1 - c, 1 + c, n, generator, gdev),
        saturation=uniform(1 - s, 1 + s, n, generator, gdev),
        hue=uniform(-h, h, n, generator, gdev),
        # a uniform random permutation per sample: argsort of i.i.d. uniforms
        order=torch.argsort(torch.rand(n, 4, generator=generator, device=gdev), dim=1),
        gray=coins[:, 2] < preset.gray_p,
        blur=coins[:, 3] < preset.blur_p,
        sigma=uniform(preset.blur_sigma[0], preset.blur_sigma[1], n, generator, gdev),
        solarize=coins[:, 4] < preset.solarize_p,
    )
    return params.to(out_device) if out_device != gdev else params
