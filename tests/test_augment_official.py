"""The authors' geometry (google-deepmind/deepmind-research, byol/utils/dataset.py), each against a plain NumPy
transcription written here: the one-draw pretraining crop (``_decode_and_random_crop``) and the eval window
(``_decode_and_center_crop``); both sampled per sample and reproducible from the generator.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import augment
from augment import fused, ops
from augment.params import sample_view_params
from augment.presets import byol_presets, linear_eval_test_preset
from augment.reference import reference_eval_test

N = 100_000


def _official_crop_np(rng: np.random.Generator, h: int, w: int, n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``_decode_and_random_crop`` for ``n`` independent draws: (top, left, height, width) arrays."""
    target = rng.uniform(scale[0], scale[1], n) * (h * w)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), n))
    cw = np.minimum(np.round(np.sqrt(target * aspect)).astype(np.int64), w)
    ch = np.minimum(np.round(np.sqrt(target / aspect)).astype(np.int64), h)
    left = rng.integers(0, w - cw + 1)
    top = rng.integers(0, h - ch + 1)
    return top, left, ch, cw


def _stats(top, left, ch, cw, h, w) -> dict:
    ch, cw = np.asarray(ch, np.float64), np.asarray(cw, np.float64)
    log_ar = np.log(cw / ch)
    hist = np.histogram(log_ar, bins=20, range=(-0.5, 0.5))[0] / len(ch)
    return {"area": float((ch * cw).mean() / (h * w)), "clamped": float(((ch == h) | (cw == w)).mean()),
            "hist": hist, "top": float(np.mean(top) / h), "left": float(np.mean(left) / w)}


@pytest.mark.parametrize("h, w, scale", [(224, 224, (0.08, 1.0)), (200, 300, (0.08, 1.0)), (60, 240, (0.08, 1.0)),
                                         (32, 32, (0.25, 1.0))])
def test_official_crop_distribution_matches_numpy_transcription(h, w, scale):
    ours = ops.official_crop_boxes(h, w, N, torch.Generator().manual_seed(0), scale=scale).numpy()
    want = _stats(*_official_crop_np(np.random.default_rng(0), h, w, N, scale), h, w)
    got = _stats(*ours.T, h, w)
    # standard errors at 1e5 draws: area <= 1e-3, a fraction <= 1.6e-3, a histogram bin <= 1e-3 (x sqrt 2 for a diff)
    assert abs(got["area"] - want["area"]) < 0.006, (got["area"], want["area"])
    assert abs(got["clamped"] - want["clamped"]) < 0.008, (got["clamped"], want["clamped"])
    assert np.abs(got["hist"] - want["hist"]).max() < 0.006
    assert abs(got["top"] - want["top"]) < 0.005 and abs(got["left"] - want["left"]) < 0.005
    t, l, bh, bw = ours.T
    assert (t >= 0).all() and (l >= 0).all() and (t + bh <= h).all() and (l + bw <= w).all() and (bh >= 1).all()
    assert (bh * bw / (h * w)).min() > scale[0] * 0.9  # the preset's min scale is honoured (up to rounding)


def test_official_differs_from_torchvision_where_it_matters():
    """On a strip the official sampler clamps (no retries); torchvision retries, then falls back."""
    g = torch.Generator().manual_seed(1)
    off = ops.sample_crop_boxes(60, 240, 20_000, g, sampler="official").double()
    tv = ops.sample_crop_boxes(60, 240, 20_000, torch.Generator().manual_seed(1), sampler="torchvision").double()
    clamped_off = float((off[:, 2] == 60).double().mean())
    clamped_tv = float((tv[:, 2] == 60).double().mean())
    assert clamped_off > clamped_tv + 0.1  # clamped heights pile up at the border only for the official one
    with pytest.raises(ValueError, match="crop_sampler"):
        ops.sample_crop_boxes(60, 240, 2, g, sampler="timm")


def test_presets_default_to_official_sampler_and_keep_torchvision_option():
    v1, v2 = byol_presets(32)
    assert v1.crop_sampler == v2.crop_sampler == "official"
    assert byol_presets(32, crop_sampler="torchvision")[0].crop_sampler == "torchvision"
    assert augment.LinearEvalTrain(32)._view.crop_sampler == "official"
    with pytest.raises(ValueError, match="crop_sampler"):
        byol_presets(32, crop_sampler="nope")
    # digits config: min scale 0.25 with the official sampler
    p = byol_presets(32, crop_scale=(0.25, 1.0))[0]
    params = sample_view_params(p, 32, 32, 4000, torch.Generator().manual_seed(0))
    area = params.boxes[:, 2] * params.boxes[:, 3] / 1024.0
    assert area.min() >= 0.2 and area.max() <= 1.0


def test_official_sampler_per_sample_reproducible_and_resumable():
    p = byol_presets(16)[0]
    g = torch.Generator().manual_seed(5)
    sample_view_params(p, 40, 50, 8, g)  # advance: a resumed run restores the state, not the seed
    state = g.get_state()
    a = sample_view_params(p, 40, 50, 64, g).boxes
    g2 = torch.Generator()
    g2.set_state(state)
    b = sample_view_params(p, 40, 50, 64, g2).boxes
    assert torch.equal(a, b)
    assert len(set(map(tuple, a.tolist()))) > 60  # each sample its own box
    hs, ws = torch.tensor([30, 300, 80]), torch.tensor([60, 100, 400])
    boxes = ops.sample_crop_boxes(hs, ws, 3, torch.Generator().manual_seed(3), sampler="official")
    assert ((boxes[:, 0] + boxes[:, 2]) <= hs).all() and ((boxes[:, 1] + boxes[:, 3]) <= ws).all()


# ----------------------------------------------------------------------------------------------- evaluation view
def _official_center_np(h: int, w: int, size: int = 224, padding: int = 32) -> tuple[int, int, int, int]:
    """``_decode_and_center_crop``: float32 product, truncated; offsets ``((h - side) + 1) // 2``."""
    side = int(np.float32(size / (size + padding)) * np.float32(min(h, w)))
    return (h - side + 1) // 2, (w - side + 1) // 2, side, side


def test_official_center_window_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    hw = np.concatenate([rng.integers(2, 2000, (3000, 2)), [[2, 2], [8, 8], [256, 256], [375, 500], [333, 1001]]])
    got = ops.official_center_boxes(torch.from_numpy(hw[:, 0]), torch.from_numpy(hw[:, 1]), 224, 256).numpy()
    want = np.array([_official_center_np(int(h), int(w)) for h, w in hw])
    assert (got == want).all()
    assert got[-2].tolist() == [24, 86, 328, 328]  # a typical 375 x 500 ImageNet val image
    # a 1-pixel side keeps its pixel (TF's window would be empty and the decode would fail)
    assert ops.official_center_boxes(1, 5, 224, 256).tolist() == [[0, 2, 1, 1]]


def _resize_then_crop_np(h: int, w: int, short: int = 256, size: int = 224):
    """The other order: short side -> 256 (torchvision's long side int(...)), centre 224 at round((H - 224) / 2)."""
    rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    return rh, rw, int(round((rh - size) / 2)), int(round((rw - size) / 2))


@pytest.mark.parametrize("kernel", ["tf_bicubic", "torch_bicubic"])
def test_eval_view_official_order_reference_and_fused_agree(kernel):
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
            for h, w in [(40, 50), (64, 44), (37, 37), (30, 90)]]
    official = augment.LinearEvalTest(32, resize_kernel=kernel)
    assert official.preset.eval_crop == "official" and official.preset.resize_kernel == kernel
    other = augment.LinearEvalTest(32, eval_crop="resize_then_crop", resize_kernel=kernel)
    a, b = official(imgs), other(imgs)
    assert (a - reference_eval_test(imgs, official.preset)).abs().max() < 1e-4
    assert (b - reference_eval_test(imgs, other.preset)).abs().max() < 1e-4
    assert (a - b).abs().max() > 0.05  # the orders really differ
    # the official view is exactly: NumPy window, then the resize op
    for img, out in zip(imgs, a):
        t, l, s, _ = _official_center_np(img.shape[1], img.shape[2], 32, 5)  # 32 / 37 = size / resize_to
        want = ops.normalize(ops.resize(img[:, t:t + s, l:l + s], (32, 32), kernel)[None])[0]
        assert (out - want).abs().max() < 1e-4
    rh, rw, top, left = _resize_then_crop_np(64, 44, 37, 32)
    want = ops.normalize(ops.resize(imgs[1], (rh, rw), kernel)[None, :, top:top + 32, left:left + 32])[0]
    assert (b[1] - want).abs().max() < 1e-4
    with pytest.raises(ValueError, match="eval_crop"):
        augment.LinearEvalTest(32, eval_crop="five_crop")


def test_probe_uses_official_views_by_default_and_keys_its_cache_on_them(tmp_path):
    from zoo.eval.probe import ProbeConfig, load_config
    from zoo.eval.features import ImagePrepare

    cfg = ProbeConfig()
    assert (cfg.eval_crop, cfg.resize_kernel, cfg.crop_sampler) == ("official", "tf_bicubic", "official")
    test_view = ImagePrepare(224, 256)
    assert test_view.view.preset.eval_crop == "official" and test_view.view.preset.resize_kernel == "tf_bicubic"
    assert ImagePrepare(32, 37, train=True).view._view.crop_sampler == "official"
    old = ImagePrepare(224, 256, eval_crop="resize_then_crop", resize_kernel="torch_bicubic")
    assert old.view.preset.eval_crop == "resize_then_crop" and old.describe() != test_view.describe()
    with pytest.raises(ValueError, match="eval_crop"):
        ProbeConfig(eval_crop="ten_crop")
    yaml = tmp_path / "p.yaml"
    yaml.write_text("eval_crop: resize_then_crop\nresize_kernel: torch_bicubic\ncrop_sampler: torchvision\n")
    assert load_config(yaml).crop_sampler == "torchvision"


def test_eval_preset_has_no_unread_train_flag():
    """Train or test is the view's choice (LinearEvalTrain / LinearEvalTest); a flag on the preset did nothing."""
    import dataclasses

    from augment.presets import EvalPreset

    assert "train" not in {f.name for f in dataclasses.fields(EvalPreset)}
    with pytest.raises(TypeError, match="train"):
        EvalPreset(train=False)
