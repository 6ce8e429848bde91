"""load_backbone on every source (our .ckpt, our export, torchvision/timm state dicts), safe loading, bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from torch import nn

import zoo
from zoo.weights import load_backbone
from zoo.weights.export import main as export_main
from zoo.weights.safe_load import (UnsafeFileError, load_state_dict_file, read_safetensors, safe_torch_load,
                                   write_safetensors)

TINY = {"widths": [8, 16, 16, 32]}


class _Payload:
    """Unpickling this runs a shell command that creates a file: the loader must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_safe_load_refuses_code_and_never_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(str(marker))}, bad)
    with pytest.raises(UnsafeFileError, match="system"):
        safe_torch_load(bad)
    with pytest.raises(UnsafeFileError):
        load_backbone(bad, arch="resnet18")
    assert not marker.exists()


def test_safe_load_plain_files_and_safetensors_metadata(tmp_path):
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pth")
    got, meta = load_state_dict_file(tmp_path / "w.pth")
    assert torch.equal(got["a"], sd["a"]) and meta == {"epoch": 3}
    write_safetensors(tmp_path / "w.safetensors", sd, {"arch": "x", "n": [1, 2]})
    t, meta = read_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(t["b"], sd["b"]) and meta["zoo"] == {"arch": "x", "n": [1, 2]}
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "nope.ckpt")


def _fake_byol_ckpt(path, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Linear]:
    """A checkpoint in exactly byol.BYOL's Lightning layout (prefixes online_/target_ encoder, heads, classifier)."""
    torch.manual_seed(seed)
    online, target = zoo.create("convnet_tiny", **TINY), zoo.create("convnet_tiny", **TINY)
    with torch.no_grad():
        for m in (online, target):
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 2)
    clf = nn.Linear(32, 10)
    sd = {}
    for prefix, mod in (("online_encoder.", online), ("target_encoder.", target), ("online_classifier.", clf),
                        ("online_projector.", nn.Linear(32, 8)), ("target_projector.", nn.Linear(32, 8)),
                        ("online_predictor.", nn.Linear(8, 8))):
        sd.update({prefix + k: v for k, v in mod.state_dict().items()})
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"encoder": "convnet_tiny", "encoder_overrides": TINY, "image_size": 32},
                "optimizer_states": [], "lr_schedulers": []}, path)
    return online.eval(), target.eval(), clf


def test_lightning_ckpt_online_target_head(tmp_path):
    path = tmp_path / "last.ckpt"
    online, target, clf = _fake_byol_ckpt(path)
    x = torch.randn(3, 3, 16, 16)
    m, t, h = load_backbone(path), load_backbone(path, which="target"), load_backbone(path, head=True)
    with torch.no_grad():
        torch.testing.assert_close(m(x), online(x))
        torch.testing.assert_close(t(x), target(x))
        torch.testing.assert_close(h(x), clf(online(x)))
    assert not m.training and m.zoo_arch == "convnet_tiny" and m.zoo_arch_overrides == TINY
    with pytest.raises(ValueError, match="which"):
        load_backbone(path, which="both")


def test_real_byol_module_checkpoint(tmp_path):
    """A checkpoint written by Lightning from the real byol.BYOL module loads back (online and target)."""
    import lightning.pytorch as pl

    byol = pytest.importorskip("byol")
    model = byol.BYOL(encoder="convnet_tiny", encoder_overrides=TINY, image_size=16, num_classes=10)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "byol.ckpt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "byol.ckpt")(x), model.online_encoder.eval()(x))
        torch.testing.assert_close(load_backbone(tmp_path / "byol.ckpt", which="target")(x),
                                   model.target_encoder.eval()(x))


def test_export_cli_reloads_without_arguments(tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    online, target, _ = _fake_byol_ckpt(ckpt)
    out = tmp_path / "backbone.safetensors"
    assert export_main([str(ckpt), "--out", str(out)]) == 0
    assert export_main([str(ckpt), "--out", str(tmp_path / "t.safetensors"), "--which", "target"]) == 0
    _, meta = read_safetensors(out)
    assert meta["zoo"]["arch"] == "convnet_tiny" and meta["zoo"]["format"] == "zoo-backbone"
    assert meta["zoo"]["num_features"] == 32
    tensors, _ = read_safetensors(out)
    assert not any(k.startswith(("online_", "target_", "fc.")) for k in tensors)  # encoder only
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(out)(x), online(x))
        torch.testing.assert_close(load_backbone(tmp_path / "t.safetensors")(x), target(x))
    assert export_main([str(tmp_path / "missing.ckpt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict(tmp_path, suffix):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(tv.state_dict(), path)
    else:
        write_safetensors(path, tv.state_dict())
    m = load_backbone(path, arch="resnet18")
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x))
    head = load_backbone(path, arch="resnet18", head=True)
    assert head.head.out_features == 1000
    with pytest.raises(ValueError, match="arch="):
        load_backbone(path)


def test_timm_state_dict(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False).eval()  # with its classifier head
    torch.save(ref.state_dict(), tmp_path / "test_resnet.pth")
    m = load_backbone(tmp_path / "test_resnet.pth", arch="timm:test_resnet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        torch.testing.assert_close(m(x), want)


def test_mismatched_arch_names_keys_and_first_shape(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError) as err:
        load_backbone(tmp_path / "r18.pth", arch="resnet34")
    assert "missing keys" in str(err.value) and "layer1.2" in str(err.value)
    with pytest.raises(ValueError, match=r"first shape mismatch: conv1.weight is \[64, 3, 7, 7\]"):
        load_backbone(tmp_path / "r18.pth", arch="resnet18_cifar")
    sd = torchvision.models.resnet18().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(first: \['extra.weight'\]\)"):
        load_backbone(tmp_path / "extra.pth", arch="resnet18")


def test_wrapped_prefixes_are_bridged(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    torch.save({"module.backbone." + k: v for k, v in tv.state_dict().items()}, tmp_path / "ddp.pth")
    m = load_backbone(tmp_path / "ddp.pth", arch="resnet18")
    tv.fc = nn.Identity()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x))


def test_random_source_is_seeded():
    a, b = load_backbone("random:convnet_tiny"), load_backbone("random:convnet_tiny")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert json.dumps(a.zoo_arch) == '"convnet_tiny"'


def _fake_lm_ckpt(path) -> nn.Module:
    """A checkpoint in lm.CausalLM's Lightning layout (model.* weights, 'model' hyper-parameter), no training."""
    from lm_testutil import TINY as LM_TINY

    torch.manual_seed(0)
    model = zoo.create("gemma2-tiny", **LM_TINY).eval()
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "epoch": 0,
                "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"model": "gemma2-tiny", "model_overrides": LM_TINY}}, path)
    return model


def test_load_backbone_on_lm_checkpoint_points_to_load_lm(tmp_path):
    path = tmp_path / "lm.ckpt"
    _fake_lm_ckpt(path)
    for kw in ({}, {"arch": "resnet18"}):
        with pytest.raises(ValueError, match=r"language-model checkpoint.*zoo\.load_lm") as err:
            load_backbone(path, **kw)
        assert "arch=" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", ["safetensors", "pth", "export"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad, kind):
    torch.manual_seed(0)
    model = zoo.create("convnet_tiny", **TINY)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() > 1)
    sd[key].view(-1)[3] = bad
    path = tmp_path / f"w.{'pth' if kind == 'pth' else 'safetensors'}"
    if kind == "pth":
        torch.save(sd, path)
    else:
        write_safetensors(path, sd, {"format": "zoo-backbone", "arch": "convnet_tiny", "arch_overrides": TINY}
                          if kind == "export" else None)
    kw = {} if kind == "export" else {"arch": zoo.create("convnet_tiny", **TINY)}
    with pytest.raises(ValueError, match=f"tensor '{key}' holds 1 NaN/Inf") as err:
        load_backbone(path, **kw)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"\x80\x02garbage-not-a-pickle", "could not read"),
                                            (b"PK\x03\x04truncated zip", "could not read")])
def test_safe_torch_load_empty_garbage_truncated_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        safe_torch_load(path)
    assert str(path) in str(err.value) and not isinstance(err.value, UnsafeFileError)


def test_written_weight_files_get_the_umask_permissions(tmp_path):
    from zoo.weights.safe_load import write_safetensors

    old = os.umask(0o022)
    try:
        out = write_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
