"""Image encoders of the registry: shapes, widths, torchvision key compatibility, errors."""
import pytest
import torch
import torchvision

import zoo


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048), ("resnet18_cifar", 512),
                                      ("convnet_tiny", 256)])
def test_encoders_return_features(name, dim):
    m = zoo.create(name).eval()
    size = 32 if "cifar" in name or "tiny" in name else 64
    out = m(torch.rand(2, 3, size, size))
    assert out.shape == (2, dim) and m.num_features == dim


def test_wide_and_deep_resnets_have_byol_sizes_on_meta():
    # BYOL Table 6 / 1b: R50 24M, R50(2x) 94M, R50(4x) 375M, R200(2x) 250M parameters (encoder only)
    for name, millions, feat in [("resnet50", 24, 2048), ("resnet50x2", 94, 4096), ("resnet50x4", 375, 8192),
                                 ("resnet200x2", 250, 4096)]:
        m = zoo.create(name, device="meta")
        n = sum(p.numel() for p in m.parameters()) / 1e6
        assert abs(n - millions) / millions < 0.06, (name, n)
        assert m.num_features == feat
        assert all(p.is_meta for p in m.parameters())


def test_resnet_loads_torchvision_state_dict_and_matches_outputs():
    tv = torchvision.models.resnet18().eval()
    ours = zoo.create("resnet18").eval()
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(sd, strict=True)
    tv.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(ours(x), tv(x), atol=1e-5)


def test_cifar_stem_keeps_resolution():
    m = zoo.create("resnet18_cifar")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)


def test_timm_encoder_and_unknown_names():
    m = zoo.create("timm:resnet10t").eval()
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, m.num_features)
    with pytest.raises(KeyError, match="resnet5O"):
        zoo.create("resnet5O")
    with pytest.raises(KeyError, match="timm has no model"):
        zoo.create("timm:not_a_real_model_xyz")
    with pytest.raises(ValueError, match="no pretrained weights"):
        zoo.create("timm:resnet18", pretrained=True)
    assert "resnet50x2" in zoo.available() and "convnet_tiny" in zoo.available()


def test_available_lists_models_not_the_timm_builder():
    # "timm" alone is the builder behind "timm:<name>"; listing it reads as if it were a model.
    assert "timm" not in zoo.available()
    for bad in ("timm", "timm:"):
        with pytest.raises(KeyError, match="timm:<name>"):
            zoo.create(bad)


def _vision_names() -> list[str]:
    from zoo.models.lm_configs import CONFIGS
    from zoo.models.multimodal import NAMES as MULTIMODAL

    return [n for n in zoo.available() if n not in CONFIGS and n not in MULTIMODAL]


@pytest.mark.parametrize("name,grid", [("resnet18", 2), ("resnet50", 2), ("resnet18_cifar", 8), ("convnet_tiny", 8),
                                       ("timm:resnet18", 2), ("timm:convnext_atto", 2)])
def test_forward_features_grid_pools_to_the_pooled_vector(name, grid):
    from zoo.models.vision import feature_tokens

    torch.manual_seed(0)
    m = zoo.create(name).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, m.num_features, grid, grid)
        torch.testing.assert_close(m.forward_head(feats, pre_logits=True), m(x))
        tokens = feature_tokens(m, x)
        assert tokens.shape == (2, grid * grid, m.num_features)
        assert torch.equal(tokens[:, 1], feats[:, :, 0, 1])  # row-major: token 1 is row 0, column 1
        if name != "timm:convnext_atto":  # ConvNeXt normalises after pooling; the others only average the grid
            torch.testing.assert_close(tokens.mean(1), m(x), atol=1e-5, rtol=1e-5)


def test_every_registered_vision_family_has_the_feature_api():
    from zoo.models.vision import feature_tokens

    names = _vision_names()
    assert {"resnet18", "resnet50x4", "resnet200x2", "convnet_tiny"} <= set(names)
    for name in names:  # shapes only, on the meta device: no memory for the wide models
        m = zoo.create(name, device="meta")
        x = torch.empty(2, 3, 64, 64, device="meta")
        tokens = feature_tokens(m, x)
        assert tokens.shape[0] == 2 and tokens.shape[2] == m.num_features, name
        assert m.forward_head(m.forward_features(x)).shape == (2, m.num_features), name


def test_vit_and_swin_tokens():
    from zoo.models.vision import feature_tokens

    vit = zoo.create("timm:vit_tiny_patch16_224", img_size=32).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        tokens = feature_tokens(vit, x)
        assert tokens.shape == (1, 1 + 4, vit.num_features)  # class token + 2 x 2 patches
        torch.testing.assert_close(vit.forward_head(vit.forward_features(x), pre_logits=True), vit(x))
    swin = zoo.create("timm:swin_tiny_patch4_window7_224", device="meta")  # channels-last maps (output_fmt NHWC)
    tokens = feature_tokens(swin, torch.empty(1, 3, 224, 224, device="meta"))
    assert tokens.shape == (1, 7 * 7, swin.num_features)
