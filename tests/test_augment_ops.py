"""Reference augmentation ops vs independent NumPy / stdlib implementations of their formulas, and why kornia's or
torchvision's version is (not) used for each."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from augment import ops

ATOL = 1e-5  # float32 ops vs float64 NumPy: a few ulps of values in [0, 1]


def _img(b=3, c=3, h=7, w=9, seed=0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- colour
def test_brightness_is_additive_per_sample_and_clipped():
    x = _img()
    delta = torch.tensor([-0.3, 0.0, 0.25])
    want = np.clip(x.numpy() + delta.numpy()[:, None, None, None], 0, 1)
    np.testing.assert_allclose(ops.adjust_brightness(x, delta).numpy(), want, atol=ATOL)


def test_brightness_differs_from_torchvision_and_kornia_colorjitter_multiplicative():
    import kornia.augmentation as K
    from torchvision.transforms.v2 import functional as TF

    x = torch.zeros(1, 3, 4, 4)  # black: additive +0.2 -> 0.2, multiplicative x1.2 -> stays 0
    ours = ops.adjust_brightness(x, torch.tensor([0.2]))
    assert torch.allclose(ours, torch.full_like(x, 0.2))
    assert torch.equal(TF.adjust_brightness(x, 1.2), x)
    kj = K.ColorJitter(brightness=(1.2, 1.2), p=1.0)
    assert torch.equal(kj(x), x)


def test_contrast_uses_per_channel_mean():
    x = _img(seed=1)
    f = torch.tensor([0.6, 1.0, 1.4])
    xn = x.numpy().astype(np.float64)
    mean = xn.mean(axis=(2, 3), keepdims=True)
    want = np.clip((xn - mean) * f.numpy()[:, None, None, None] + mean, 0, 1)
    np.testing.assert_allclose(ops.adjust_contrast(x, f).numpy(), want, atol=ATOL)


def test_contrast_differs_from_kornia_and_torchvision():
    import kornia
    from torchvision.transforms.v2 import functional as TF

    x = _img(b=1, seed=2)
    ours = ops.adjust_contrast(x, torch.tensor([1.4]))
    # kornia multiplies without any mean; torchvision blends towards ONE grayscale mean for all channels
    assert (ours - kornia.enhance.adjust_contrast(x, 1.4)).abs().max() > 0.05
    assert (ours - TF.adjust_contrast(x, 1.4)).abs().max() > 1e-3


def _hsv_numpy(x: np.ndarray, fn) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].astype(np.float64))
                out[b, :, i, j] = colorsys.hsv_to_rgb(*fn(b, h, s, v))
    return out


def test_saturation_matches_hsv_formula_with_clipped_saturation():
    x = _img(seed=3)
    f = torch.tensor([0.8, 1.2, 3.0])  # 3.0 drives saturation past 1: must clip there (TF semantics)
    want = _hsv_numpy(x.numpy(), lambda b, h, s, v: (h, min(s * float(f[b]), 1.0), v))
    np.testing.assert_allclose(ops.adjust_saturation(x, f).numpy(), want, atol=ATOL)


def test_hue_matches_hsv_rotation_with_wraparound():
    x = _img(seed=4)
    d = torch.tensor([-0.1, 0.05, 0.45])
    want = _hsv_numpy(x.numpy(), lambda b, h, s, v: ((h + float(d[b])) % 1.0, s, v))
    np.testing.assert_allclose(ops.adjust_hue(x, d).numpy(), want, atol=ATOL)


def test_grayscale_weights_and_per_sample_flags():
    x = _img(seed=5)
    flags = torch.tensor([True, False, True])
    xn = x.numpy()
    y = 0.2989 * xn[:, 0] + 0.5870 * xn[:, 1] + 0.1140 * xn[:, 2]
    want = np.where(flags.numpy()[:, None, None, None], np.repeat(y[:, None], 3, axis=1), xn)
    np.testing.assert_allclose(ops.to_grayscale(x, flags).numpy(), want, atol=ATOL)


def test_solarize_threshold_half_and_flags():
    x = _img(seed=6)
    flags = torch.tensor([True, True, False])
    xn = x.numpy()
    want = np.where(flags.numpy()[:, None, None, None] & (xn >= 0.5), 1 - xn, xn)
    np.testing.assert_allclose(ops.solarize(x, flags).numpy(), want, atol=ATOL)
    edge = torch.tensor([0.4999, 0.5, 0.7]).view(1, 1, 1, 3)
    assert torch.allclose(ops.solarize(edge), torch.tensor([0.4999, 0.5, 0.3]).view(1, 1, 1, 3))


def test_normalize_imagenet():
    x = _img(seed=7)
    m, s = np.array(ops.IMAGENET_MEAN)[None, :, None, None], np.array(ops.IMAGENET_STD)[None, :, None, None]
    np.testing.assert_allclose(ops.normalize(x).numpy(), (x.numpy() - m) / s, atol=1e-5)


# ------------------------------------------------------------------------------------------------- blur
def _blur_numpy(x: np.ndarray, sigma: float, k: int) -> np.ndarray:
    r = k // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    c, h, w = x.shape
    pad = np.zeros((c, h + 2 * r, w + 2 * r))
    pad[:, r:r + h, r:r + w] = x  # zero padding (TF 'SAME')
    tmp = sum(g[i] * pad[:, i:i + h, :] for i in range(k))
    return sum(g[i] * tmp[:, :, i:i + w] for i in range(k))


def test_gaussian_blur_zero_padding_per_sample_sigma():
    x = _img(b=3, h=13, w=11, seed=8)
    sigma = torch.tensor([0.1, 1.0, 2.0])
    out = ops.gaussian_blur(x, sigma, 7)
    for b in range(3):
        np.testing.assert_allclose(out[b].numpy(), _blur_numpy(x[b].numpy().astype(np.float64), float(sigma[b]), 7),
                                   atol=ATOL)
    # zero padding darkens the border of a constant image; reflect padding (kornia's default) would not
    ones = torch.ones(1, 3, 9, 9)
    blurred = ops.gaussian_blur(ones, torch.tensor([2.0]), 7)
    assert blurred[0, 0, 0, 0] < 0.7 and abs(float(blurred[0, 0, 4, 4]) - 1) < 1e-6


def test_blur_kernel_size_rule():
    assert ops.blur_kernel_size(224) == 23  # radius 11, BYOL
    assert [ops.blur_kernel_size(s) for s in (32, 64, 96)] == [3, 7, 9]


# ------------------------------------------------------------------------------------------------- geometry
def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _resize_axis_matrix(n_in: int, n_out: int) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(f + k, 0), n_in - 1)] += _cubic(src - (f + k))
    return m


def test_random_resized_crop_is_crop_then_bicubic_then_clip():
    x = _img(b=2, h=20, w=16, seed=9)
    boxes = torch.tensor([[2, 3, 10, 8], [0, 0, 20, 16]])
    out = ops.random_resized_crop(x, boxes, 12)
    for b, (t, l, h, w) in enumerate(boxes.tolist()):
        crop = x[b, :, t:t + h, l:l + w].numpy().astype(np.float64)
        my, mx = _resize_axis_matrix(h, 12), _resize_axis_matrix(w, 12)
        want = np.clip(np.einsum("ij,cjk,lk->cil", my, crop, mx), 0, 1)
        np.testing.assert_allclose(out[b].numpy(), want, atol=ATOL)


def test_bicubic_overshoot_is_clipped():
    step = torch.zeros(1, 1, 4, 4)
    step[..., 2:] = 1.0
    raw = torch.nn.functional.interpolate(step, size=(4, 13), mode="bicubic", align_corners=False)
    assert raw.min() < 0 and raw.max() > 1  # why the clip is needed
    out = ops.resize(step, (4, 13))
    assert out.min() >= 0 and out.max() <= 1


def test_hflip_per_sample():
    x = _img(seed=10)
    out = ops.hflip(x, torch.tensor([True, False, True]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1]) and torch.equal(out[2], x[2].flip(-1))


def test_sample_crop_boxes_ranges_and_per_sample_variety():
    g = torch.Generator().manual_seed(0)
    boxes = ops.sample_crop_boxes(200, 300, 2000, g)
    t, l, h, w = boxes.T.double()
    assert (t >= 0).all() and (l >= 0).all() and (t + h <= 200).all() and (l + w <= 300).all()
    area = h * w / (200 * 300)
    # rounding of h and w moves area / ratio slightly past the nominal bounds
    assert area.min() > 0.075 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.75 * 0.97 and ratio.max() < 4 / 3 * 1.03
    assert len(set(map(tuple, boxes.tolist()))) > 1900  # boxes differ across samples
    # same distribution as torchvision's sampler (independent implementation, its own RNG stream)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, 200, 300), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(2000)], dtype=torch.float64)
    tv_area = tv[:, 2] * tv[:, 3] / (200 * 300)
    assert abs(float(area.mean()) - float(tv_area.mean())) < 0.03  # ~4 standard errors
    assert abs(float(ratio.log().mean()) - float((tv[:, 3] / tv[:, 2]).log().mean())) < 0.03


def test_sample_crop_boxes_fallback_is_torchvision_centre_crop():
    # a 10 x 1000 strip: no try can fit, torchvision falls back to a centre crop with ratio 4/3
    boxes = ops.sample_crop_boxes(10, 1000, 5, torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 493, 10, 13]] * 5
    tall = ops.sample_crop_boxes(1000, 10, 3, torch.Generator().manual_seed(0))
    assert tall.tolist() == [[493, 0, 13, 10]] * 3


def test_sample_crop_boxes_reproducible_and_variable_sizes():
    hs, ws = torch.tensor([50, 300, 80]), torch.tensor([60, 100, 400])
    a = ops.sample_crop_boxes(hs, ws, 3, torch.Generator().manual_seed(3))
    b = ops.sample_crop_boxes(hs, ws, 3, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert ((a[:, 0] + a[:, 2]) <= hs).all() and ((a[:, 1] + a[:, 3]) <= ws).all()


def test_eval_helpers_single_and_batch():
    img = torch.rand(3, 300, 400)
    r = ops.resize_short_side(img, 256)
    assert r.shape == (3, 256, 341)  # int(256 * 400 / 300) like torchvision
    c = ops.center_crop(r, 224)
    assert c.shape == (3, 224, 224)
    assert torch.equal(c, r[:, 16:240, 58:282])
    batch = ops.center_crop(ops.resize_short_side([img, torch.rand(3, 500, 260)], 256), 224)
    assert batch.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="resize first"):
        ops.center_crop(torch.rand(3, 100, 100), 224)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="per-sample parameter"):
        ops.adjust_contrast(_img(), torch.ones(5))
    with pytest.raises(ValueError, match="float tensor"):
        ops.adjust_brightness(torch.zeros(3, 4, 4, dtype=torch.uint8), 0.1)
    with pytest.raises(ValueError, match="outside"):
        ops.random_resized_crop(_img(), torch.tensor([[0, 0, 50, 5]] * 3), 4)
    with pytest.raises(ValueError, match="odd"):
        ops.gaussian_blur(_img(), torch.ones(3), 4)


def test_kornia_crop_and_resize_samples_a_different_grid():
    """Why random_resized_crop is written here: kornia maps the box's corner pixels onto the output's corner
    pixels and interpolates across the box edge, whereas crop-then-resize (TF/torchvision) uses half-pixel
    centres inside the crop only."""
    import kornia

    x = _img(b=1, h=20, w=16, seed=11)
    t, l, h, w = 2, 3, 10, 8
    corners = torch.tensor([[[l, t], [l + w - 1, t], [l + w - 1, t + h - 1], [l, t + h - 1]]], dtype=torch.float32)
    theirs = kornia.geometry.transform.crop_and_resize(x, corners, (12, 12), mode="bicubic", align_corners=False)
    assert (theirs - ops.random_resized_crop(x, torch.tensor([[t, l, h, w]]), 12)).abs().max() > 0.01


def test_kornia_default_blur_border_is_reflect_not_zero():
    import kornia

    ones = torch.ones(1, 3, 9, 9)
    reflect = kornia.filters.gaussian_blur2d(ones, (7, 7), (2.0, 2.0))
    assert torch.allclose(reflect, ones)  # reflect keeps a constant image constant; TF's zero padding does not
    assert not torch.allclose(ops.gaussian_blur(ones, torch.tensor([2.0]), 7), ones)


@pytest.mark.parametrize("sampler", ["official", "torchvision"])
def test_rows_of_a_split_batch_get_the_parameters_one_batch_draws(sampler):
    """Data-parallel ranks seeded alike, each drawing ``rows=(offset, total)``, augment as one process does."""
    from dataclasses import fields, replace

    from augment.params import sample_view_params
    from augment.presets import train_view_presets

    preset = replace(train_view_presets(32)[0], crop_sampler=sampler)
    hs, ws = torch.randint(20, 90, (11,)), torch.randint(20, 90, (11,))
    whole = sample_view_params(preset, hs, ws, 11, torch.Generator().manual_seed(4))
    for offset, n in ((0, 4), (4, 5), (9, 2), (0, 11)):
        part = sample_view_params(preset, hs[offset:offset + n], ws[offset:offset + n], n,
                                  torch.Generator().manual_seed(4), rows=(offset, 11))
        for f in fields(whole):
            assert torch.equal(getattr(part, f.name), getattr(whole, f.name)[offset:offset + n]), (offset, f.name)
    same = sample_view_params(preset, 40, 50, 3, torch.Generator().manual_seed(4), rows=(2, 6))  # one size for all
    assert torch.equal(same.boxes, sample_view_params(preset, 40, 50, 6, torch.Generator().manual_seed(4)).boxes[2:5])
    with pytest.raises(ValueError, match=r"rows=\(5, 6\): 3 images from row 5 do not fit in a batch of 6"):
        sample_view_params(preset, 40, 50, 3, torch.Generator().manual_seed(4), rows=(5, 6))
