"""The resize the BYOL authors used, TF2 ``tf.image.resize(BICUBIC)`` on uint8 then ``clip(x / 255, 0, 1)``, against
golden outputs of TensorFlow itself (tests/fixtures/tf_resize_*.npz, written by tools/make_tf_resize_fixtures.py;
TensorFlow is not needed to run these tests). Both the reference ops and the fused path must match to 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import augment
from augment import fused, ops
from augment.params import sample_view_params
from augment.presets import ViewPreset
from augment.reference import reference_view

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("tf_resize_*.npz"))
TOL = 1e-4  # on [0, 1]; the TF kernel is reproduced to float32 rounding (measured <= 2e-7)
SQUARE = [f for f in FIXTURES if np.load(f)["size"][0] == np.load(f)["size"][1]]


def _load(path: Path):
    z = np.load(path)
    return torch.from_numpy(z["image"]), torch.from_numpy(z["box"]).long(), tuple(z["size"].tolist()), z["out"]


def test_fixtures_present():
    names = {f.stem for f in FIXTURES}
    assert {"tf_resize_upsample", "tf_resize_downsample", "tf_resize_crop_window", "tf_resize_tiny",
            "tf_resize_eval_center"} <= names


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_reference_op_matches_tensorflow(path):
    img, box, size, want = _load(path)
    t, l, h, w = box.tolist()
    out = ops.resize(img[:, t:t + h, l:l + w], size, kernel="tf_bicubic")
    assert np.abs(out.numpy() - want).max() <= TOL
    # and via the crop op, uint8 and float inputs alike
    out = ops.random_resized_crop(img[None].float() / 255, box[None], size, kernel="tf_bicubic")[0]
    assert np.abs(out.numpy() - want).max() <= TOL


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fused_resize_matrices_match_tensorflow(path):
    img, box, size, want = _load(path)
    t, l, h, w = box.tolist()
    wy = fused.resize_matrix(torch.tensor([t]), torch.tensor([h]), size[0], 0, size[0], img.shape[-2],
                             kernel="tf_bicubic") / 255
    wx = fused.resize_matrix(torch.tensor([l]), torch.tensor([w]), size[1], 0, size[1], img.shape[-1],
                             kernel="tf_bicubic")
    out = fused._matmul_resample(img[None].float(), wy, wx).clamp(0, 1)[0]
    assert np.abs(out.numpy() - want).max() <= TOL


@pytest.mark.parametrize("per_sample", [False, True])
def test_fused_view_pipeline_matches_tensorflow(per_sample):
    """A view with every random op off is crop + TF resize + clip: both schedules equal TF and the reference."""
    for path in SQUARE:
        img, box, size, want = _load(path)
        preset = ViewPreset(size=size[0], flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, mean=(0.0, 0.0, 0.0),
                            std=(1.0, 1.0, 1.0))
        assert preset.resize_kernel == "tf_bicubic"  # the default
        imgs = img.expand(3, -1, -1)[None]
        p = sample_view_params(preset, imgs.shape[-2], imgs.shape[-1], 1, torch.Generator().manual_seed(0))
        p.boxes = box[None]
        out = fused.apply_view(imgs, p, preset, per_sample)
        assert np.abs(out[0].numpy() - np.broadcast_to(want, out[0].shape)).max() <= TOL, path.stem
        assert (out - reference_view(imgs, p, preset)).abs().max() <= TOL


def test_eval_view_end_to_end_matches_tensorflow():
    """``_decode_and_center_crop`` + TF resize: LinearEvalTest(28, resize=32) keeps the same 224/256 window."""
    img, box, size, want = _load(Path(__file__).parent / "fixtures" / "tf_resize_eval_center.npz")
    assert ops.official_center_boxes(img.shape[-2], img.shape[-1], 224, 256)[0].tolist() == box.tolist()
    view = augment.LinearEvalTest(28, resize=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = view(img[None])[0]
    assert np.abs(out.numpy() - want).max() <= TOL
    out = view([img])[0]  # a list (variable-size batch) takes the same path
    assert np.abs(out.numpy() - want).max() <= TOL


def test_torch_kernel_is_an_option_and_differs_from_tensorflow():
    img, box, size, want = _load(Path(__file__).parent / "fixtures" / "tf_resize_upsample.npz")
    torch_out = ops.resize(img, size, kernel="torch_bicubic")
    assert np.abs(torch_out.numpy() - want).max() > 0.01  # a = -0.75 and border clamping vs TF's renormalisation
    preset = ViewPreset(size=8, resize_kernel="torch_bicubic")
    assert preset.resize_kernel == "torch_bicubic"
    with pytest.raises(ValueError, match="resize_kernel"):
        ViewPreset(size=8, resize_kernel="lanczos")
    with pytest.raises(ValueError, match="resize_kernel"):
        ops.resize(img, size, kernel="area")


def test_tf_taps_border_renormalised_not_clamped():
    """TF's half-pixel path drops taps outside the image and renormalises (PyTorch clamps them to the edge)."""
    idx, w = ops.tf_bicubic_taps(4, 8, torch.arange(8))
    assert torch.allclose(w.sum(-1), torch.ones(1, 8))
    # output 0 samples at source -0.25: taps -2..1, the two outside get weight 0
    assert w[0, 0, 0] == 0 and w[0, 0, 1] == 0 and idx.min() >= 0 and idx.max() <= 3
    # interior phase 0.25 (output 3 -> source 1.25): Keys a = -0.5 weights at the 1/1024-quantised phase
    a, t = -0.5, 0.25
    keys = [a * (1 + t) ** 3 - 5 * a * (1 + t) ** 2 + 8 * a * (1 + t) - 4 * a, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
            (a + 2) * (1 - t) ** 3 - (a + 3) * (1 - t) ** 2 + 1,
            a * (2 - t) ** 3 - 5 * a * (2 - t) ** 2 + 8 * a * (2 - t) - 4 * a]
    assert torch.allclose(w[0, 3], torch.tensor(keys, dtype=torch.float32), atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("kernel, sampler", [("torch_bicubic", "torchvision"), ("tf_bicubic", "torchvision"),
                                             ("torch_bicubic", "official")])
def test_fused_equals_reference_for_every_switch(kernel, sampler, per_sample):
    from augment.presets import byol_presets

    preset = byol_presets(24, resize_kernel=kernel, crop_sampler=sampler)[1]
    imgs = torch.randint(0, 256, (6, 3, 30, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    p = sample_view_params(preset, 30, 36, 6, torch.Generator().manual_seed(3))
    p.blur[::2] = True
    assert (fused.apply_view(imgs, p, preset, per_sample) - reference_view(imgs, p, preset)).abs().max() < TOL
