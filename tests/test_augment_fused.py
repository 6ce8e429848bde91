"""The fused path (what runs) equals the reference ops (the spec) for the same parameters; parameters are drawn per
sample, in range, reproducibly; the modules' call signature and errors.

Tolerance: 2e-5 on [0, 1] images, i.e. on the normalised output 2e-5 / 0.224 ~ 1e-4. Both paths use the same bicubic
taps (the fused matrices reproduce F.interpolate's clamped indices exactly) and the same Gaussian taps; what differs
is float32 summation order (matmul vs interpolate/conv) and the HSV step (closed form vs kornia's
rgb->hsv->rgb with its 1e-8 epsilon), each a few ulps; the bound leaves room for those to be amplified by the
contrast factor (<= 1.4) across five colour stages.
"""
from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
import torch

import augment
from augment import fused
from augment.params import sample_view_params
from augment.presets import ViewPreset, byol_presets
from augment.reference import reference_eval_test, reference_eval_train, reference_view

TOL = 1e-4  # on normalised outputs; see module docstring


def _u8(b, h, w, c=3, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("view", [0, 1])
def test_fused_view_equals_reference(view, per_sample):
    preset = byol_presets(24)[view]
    imgs = _u8(10, 30, 36, seed=view)
    p = sample_view_params(preset, 30, 36, 10, torch.Generator().manual_seed(7 + view))
    if preset.solarize_p > 0:  # a preset with p = 0 skips the op statically
        p.solarize[::2] = True
    p.blur[1::3] = True
    out = fused.apply_view(imgs, p, preset, per_sample)
    ref = reference_view(imgs, p, preset)
    assert out.shape == (10, 3, 24, 24) and out.dtype == torch.float32
    assert (out - ref).abs().max() < TOL


def test_every_colour_order_matches_sequential_ops():
    """All 24 orders of (brightness, contrast, saturation, hue) through the h-A-h-A-h stage template."""
    preset = ViewPreset(size=12, blur_p=0.0)
    n = 24
    imgs = _u8(n, 16, 16, seed=3)
    p = sample_view_params(preset, 16, 16, n, torch.Generator().manual_seed(0))
    p.order = torch.tensor(list(itertools.permutations(range(4))))
    p.jitter[:] = True
    p.gray[:] = False
    # strong parameters so that a wrong order shows: large deltas push values into the clip
    p.brightness = torch.linspace(-0.4, 0.4, n)
    p.contrast = torch.linspace(1.4, 0.6, n)
    p.saturation = torch.linspace(0.8, 1.2, n)
    p.hue = torch.linspace(-0.1, 0.1, n)
    for per_sample in (False, True):
        assert (fused.apply_view(imgs, p, preset, per_sample) - reference_view(imgs, p, preset)).abs().max() < TOL
    # the static schedule (GPU / compile: every stage on every sample) equals the CPU subset schedule
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert (fused.colour_pass(x, p, subset=False) - fused.colour_pass(x, p, subset=True)).abs().max() < 1e-5
    wrong = p[torch.arange(n)]
    wrong.order = p.order.flip(1)
    assert (fused.apply_view(imgs, wrong, preset) - reference_view(imgs, p, preset)).abs().max() > 1e-2


def test_fused_hsv_stage_vs_colorsys():
    x = torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(1))
    sat, hue = torch.tensor([0.7, 2.5]), torch.tensor([0.08, -0.3])
    out = fused._hsv_stage(x, sat, hue)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].double().tolist())
                want = colorsys.hsv_to_rgb((h + float(hue[b])) % 1.0, min(s * float(sat[b]), 1.0), v)
                np.testing.assert_allclose(out[b, :, i, j].numpy(), want, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_variable_size_list_equals_reference_and_gray_images_expand(per_sample):
    preset = byol_presets(20)[1]
    imgs = [_u8(1, 33, 25, seed=1)[0], _u8(1, 21, 40, seed=2)[0], _u8(1, 50, 30, c=1, seed=3)[0]]
    view = augment.ByolView(preset, per_sample=per_sample)
    p = view.sample_params(imgs, torch.Generator().manual_seed(5))
    out = view.apply(imgs, p)
    assert (out - reference_view(imgs, p, preset)).abs().max() < TOL
    assert out.shape == (3, 3, 20, 20)


@pytest.mark.parametrize("per_sample", [False, True])
def test_float_and_single_channel_batches(per_sample):
    v1, _ = augment.byol_views(16, per_sample=per_sample)
    x = _u8(4, 20, 20, c=1)
    a = v1(x, torch.Generator().manual_seed(0))
    b = v1(x.float() / 255, torch.Generator().manual_seed(0))
    assert a.shape == (4, 3, 16, 16) and (a - b).abs().max() < 1e-4
    assert (a - reference_view(x, v1.last_params, v1.preset)).abs().max() < TOL


def test_default_schedule_choice():
    """Per-sample loop on CPU from PER_SAMPLE_MIN_SIZE up (cache-resident, faster there), batched below."""
    preset_small, preset_big = byol_presets(32)[0], byol_presets(fused.PER_SAMPLE_MIN_SIZE)[0]
    x = _u8(2, 100, 100)
    for preset in (preset_small, preset_big):
        p = sample_view_params(preset, 100, 100, 2, torch.Generator().manual_seed(0))
        auto = fused.apply_view(x, p, preset)
        batched = fused.apply_view(x, p, preset, per_sample=False)
        looped = fused.apply_view(x, p, preset, per_sample=True)
        assert torch.equal(auto, looped if preset is preset_big else batched)
        assert (batched - looped).abs().max() < TOL


def test_eval_transforms_equal_reference():
    imgs = [_u8(1, 40, 50, seed=1)[0], _u8(1, 64, 44, seed=2)[0]]
    test_t = augment.LinearEvalTest(32)
    assert test_t.preset.resize_to == 37
    out = test_t(imgs)
    assert out.shape == (2, 3, 32, 32)
    assert (out - reference_eval_test(imgs, test_t.preset)).abs().max() < TOL
    batch = _u8(3, 40, 48)
    assert (test_t(batch) - reference_eval_test(list(batch), test_t.preset)).abs().max() < TOL

    train_t = augment.LinearEvalTrain(24)
    g = torch.Generator().manual_seed(0)
    out = train_t(batch, g)
    p = sample_view_params(train_t._view, 40, 48, 3, torch.Generator().manual_seed(0))
    assert (out - reference_eval_train(batch, p.boxes, p.flip, train_t.preset)).abs().max() < TOL


def test_params_per_sample_in_range_with_paper_probabilities():
    v1, v2 = byol_presets(224)
    n = 4000
    g = torch.Generator().manual_seed(0)
    p1 = sample_view_params(v1, 256, 256, n, g)
    p2 = sample_view_params(v2, 256, 256, n, g)
    for p in (p1, p2):
        assert p.brightness.abs().max() <= 0.4 and p.brightness.unique().numel() > 0.99 * n
        assert ((p.contrast >= 0.6) & (p.contrast <= 1.4)).all() and p.contrast.unique().numel() > 0.99 * n
        assert ((p.saturation >= 0.8) & (p.saturation <= 1.2)).all()
        assert p.hue.abs().max() <= 0.1 and p.hue.unique().numel() > 0.99 * n
        assert ((p.sigma >= 0.1) & (p.sigma <= 2.0)).all()
        assert (p.order.sort(1).values == torch.arange(4)).all()  # permutations
        assert p.order.unique(dim=0).shape[0] == 24
        assert abs(p.flip.float().mean() - 0.5) < 0.03 and abs(p.jitter.float().mean() - 0.8) < 0.03
        assert abs(p.gray.float().mean() - 0.2) < 0.03
    assert p1.blur.all() and not p1.solarize.any()
    assert abs(p2.blur.float().mean() - 0.1) < 0.02 and abs(p2.solarize.float().mean() - 0.2) < 0.03
    assert not torch.equal(p1.boxes, p2.boxes)  # the views draw independently


def test_reproducible_from_generator_state_and_per_sample_differences():
    v1, v2 = augment.byol_views(16)
    same = _u8(1, 24, 24).expand(6, -1, -1, -1)  # six copies of one image
    a = v1(same, torch.Generator().manual_seed(11))
    b = v1(same, torch.Generator().manual_seed(11))
    c = v1(same, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-sample parameters: identical inputs come out different within one batch
    assert all((a[i] - a[j]).abs().max() > 1e-3 for i in range(6) for j in range(i))


def test_torchvision_batch_transform_shares_parameters_ours_does_not():
    from torchvision.transforms import v2

    same = torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    tv = v2.ColorJitter(brightness=0.4)(same)
    assert all(torch.equal(tv[0], tv[i]) for i in range(4))  # one draw for the whole batch
    ours = augment.ByolView(ViewPreset(size=8, jitter_p=1.0, gray_p=0, blur_p=0, flip_p=0,
                                       crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)))
    out = ours(same, torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], out[1])


def test_fused_view_traces_without_graph_breaks():
    preset = byol_presets(16)[1]
    imgs = _u8(4, 20, 20)
    p = sample_view_params(preset, 20, 20, 4, torch.Generator().manual_seed(0))
    compiled = torch.compile(lambda x, q: fused.apply_view(x, q, preset, False), backend="eager", fullgraph=True)
    # traced: static schedule; eager CPU: subset schedule (identity HSV stages differ by rounding only)
    assert (compiled(imgs, p) - fused.apply_view(imgs, p, preset, False)).abs().max() < TOL


def test_preset_overrides_and_scaling_rule():
    p1, p2 = byol_presets(32, view2_solarize_p=0.0, brightness=0.1)
    assert p1.kernel_size == 3 and p2.solarize_p == 0.0 and p1.brightness == p2.brightness == 0.1
    assert byol_presets(224)[0].kernel_size == 23 and byol_presets(224)[1].blur_p == 0.1
    with pytest.raises(ValueError, match="unknown augmentation preset key"):
        byol_presets(32, blurr_p=0.3)
    with pytest.raises(ValueError, match="probability"):
        byol_presets(32, gray_p=1.5)


def test_bad_batches_give_clear_errors():
    v1, _ = augment.byol_views(16)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        v1(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        v1(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty"):
        v1([])
    with pytest.raises(ValueError, match="image 1"):
        v1([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)])


def test_fused_blur_and_crop_vs_numpy():
    from test_augment_ops import _blur_numpy, _resize_axis_matrix

    x = torch.rand(2, 3, 40, 37, generator=torch.Generator().manual_seed(4))
    sigma, on = torch.tensor([0.7, 1.9]), torch.tensor([True, True])
    out = fused.blur(x, sigma, on, 9)  # 40 rows: two 32-row blocks, the last one partly padding
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), _blur_numpy(x[b].double().numpy(), float(sigma[b]), 9), atol=1e-5)
    boxes = torch.tensor([[5, 2, 30, 20], [0, 0, 40, 37]])
    flip = torch.tensor([True, False])
    out = fused.crop_resize_flip(x, boxes, 16, flip)
    for b, (t, l, h, w) in enumerate(boxes.tolist()):
        crop = x[b, :, t:t + h, l:l + w].double().numpy()
        want = np.clip(np.einsum("ij,cjk,lk->cil", _resize_axis_matrix(h, 16), crop, _resize_axis_matrix(w, 16)), 0, 1)
        if flip[b]:
            want = want[..., ::-1]
        np.testing.assert_allclose(out[b].numpy(), want, atol=1e-5)


def test_bfloat16_compute_stays_within_bf16_tolerance():
    preset = byol_presets(32)[1]
    imgs = _u8(6, 40, 40, seed=8)
    p = sample_view_params(preset, 40, 40, 6, torch.Generator().manual_seed(2))
    ref = fused.apply_view(imgs, p, preset, per_sample=False)
    low = fused.apply_view(imgs, p, preset, per_sample=False, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    # bf16 matmul inputs keep 8 significant bits (~0.4% relative, ~1/255 on [0, 1]) in the crop and blur; the
    # contrast factor (<= 1.4) can amplify it; normalised scale is /0.225 -> bound 0.08 at the worst pixel
    err = (low - ref).abs()
    assert err.mean() < 0.01 and err.max() < 0.08


def test_compile_option_uses_torch_compile_for_tensors_only(monkeypatch):
    calls = []
    real = torch.compile

    def eager_compile(fn, **kw):  # the eager backend checks tracing without paying for code generation
        calls.append(fn)
        return real(fn, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", eager_compile)
    v1, _ = augment.byol_views(16, compile=True)
    plain, _ = augment.byol_views(16, per_sample=False)
    x = _u8(4, 20, 20)
    a = v1(x, torch.Generator().manual_seed(0))
    assert len(calls) == 1 and (a - plain(x, torch.Generator().manual_seed(0))).abs().max() < TOL
    v1(list(x), torch.Generator().manual_seed(0))  # variable-size lists stay eager
    assert len(calls) == 1
