"""`zoo export --format timm|torchvision`: folders that timm and torchvision load themselves to the features
zoo.load_backbone gives, the model card every export carries, the official release in one command, refusals.

Tolerance: timm's / torchvision's ResNet run the same conv -> BN -> ReLU sequence on the same weights as ours, so the
outputs agree to fp32 rounding (~1.2e-7 relative per op, a few dozen ops deep); 1e-5 is the bound the issue asks for.
"""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import zoo
from zoo.weights import load_backbone
from zoo.weights.export import main as export_main
from zoo.weights.pretrained_cli import main as pretrained_main

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial statistics, so a loader that drops them is caught
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _run_checkpoint(root, classes: int | None = 10, seed: int = 0):
    """A run folder with checkpoints/last.ckpt in our contract (resnet18, online/target, optional classifier) and a
    probe_report.json beside it, as `zoo fit` leaves them."""
    torch.manual_seed(seed)
    online, target = _randomise_bn(zoo.create("resnet18")), _randomise_bn(zoo.create("resnet18"))
    sd = {f"online_encoder.{k}": v for k, v in online.state_dict().items()}
    sd.update({f"target_encoder.{k}": v for k, v in target.state_dict().items()})
    clf = None
    if classes:
        clf = nn.Linear(512, classes)
        sd.update({f"online_classifier.{k}": v for k, v in clf.state_dict().items()})
    (root / "checkpoints").mkdir(parents=True)
    path = root / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.0", "epoch": 3,
                "hyper_parameters": {"encoder": "resnet18", "image_size": 64, "base_lr": 2.0,
                                     "eval_overrides": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
                "zoo": {"format": 1, "kind": "image-encoder", "arch": "resnet18", "overrides": {},
                        "encoders": {"online": "online_encoder.", "target": "target_encoder."},
                        "classifier": "online_classifier." if classes else None}}, path)
    (root / "probe_report.json").write_text(json.dumps({"trained_linear_top1": 0.91, "random_init_linear_top1": 0.4}))
    return path, online, clf


def _timm_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    ckpt, online, clf = _run_checkpoint(root)
    out = root / "export"
    assert export_main([str(ckpt), "--format", "timm,torchvision", "--out", str(out)]) == 0
    return ckpt, out, online, clf


def test_timm_loads_the_export_to_the_same_features(exported):
    ckpt, out, online, clf = exported
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = load_backbone(ckpt)(x)
        logits = load_backbone(ckpt, head=True)(x)
        torch.testing.assert_close(ours, online(x), atol=0, rtol=0)
        overlay = timm.create_model("resnet18", pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10))
        local = timm.create_model(f"local-dir:{out}", pretrained=True)
        for model in (overlay.eval(), local.eval()):
            torch.testing.assert_close(_timm_features(model, x), ours, **TOL)
            torch.testing.assert_close(model(x), logits, **TOL)
        features_only = timm.create_model("resnet18", pretrained=True, num_classes=0,
                                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
        torch.testing.assert_close(features_only(x), ours, **TOL)
        torch.testing.assert_close(load_backbone(out)(x), ours, **TOL)  # our loader reads the folder back
        torch.testing.assert_close(load_backbone(out, head=True)(x), logits, **TOL)
    cfg = local.pretrained_cfg  # the normalisation of the training config, as timm's data config sees it
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.25, 0.25, 0.25]
    assert list(cfg["input_size"]) == [3, 64, 64] and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == pytest.approx(64 / 73, abs=1e-4)
    data_cfg = timm.data.resolve_data_config({}, model=local)
    assert tuple(data_cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(data_cfg["input_size"]) == (3, 64, 64)


def test_torchvision_loads_the_export_strictly(exported):
    ckpt, out, online, clf = exported
    sd = torch.load(out / "model.pth", weights_only=True)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(sd, strict=True)
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), load_backbone(ckpt, head=True)(x), **TOL)
        tv.fc = nn.Identity()
        torch.testing.assert_close(tv(x), load_backbone(ckpt)(x), **TOL)


def test_model_card_travels_with_every_export(exported, capsys):
    ckpt, out, _, _ = exported
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    cards = [json.loads((out / "config.json").read_text())["zoo"], json.loads((out / "model_card.json").read_text())]
    single = out.parent / "single.safetensors"
    assert export_main([str(ckpt), "--out", str(single)]) == 0
    from zoo.weights.safe_load import read_safetensors

    cards.append(read_safetensors(single)[1]["zoo"])
    for card in cards:
        assert card["arch"] == "resnet18" and card["source_sha256"] == digest
        assert card["training_config"]["base_lr"] == 2.0
        assert card["probe_report"]["trained_linear_top1"] == 0.91
        assert card["normalization"]["mean"] == [0.5, 0.5, 0.5] and card["normalization"]["input_size"] == [3, 64, 64]
    assert "resnet18" in (out / "README.md").read_text()
    for target in (str(out), str(single)):
        capsys.readouterr()
        assert pretrained_main(["info", target]) == 0
        shown = capsys.readouterr().out
        assert digest in shown and "trained_linear_top1" in shown and "0.5" in shown


def test_no_classifier_gives_a_zero_head_the_stock_constructors_load(tmp_path):
    ckpt, online, _ = _run_checkpoint(tmp_path / "run", classes=None, seed=1)
    out = tmp_path / "out"
    assert export_main([str(ckpt), "--format", "timm,torchvision", "--out", str(out)]) == 0
    x = torch.randn(2, 3, 64, 64)
    tv = torchvision.models.resnet18()  # 1000 classes, as the default constructor builds
    tv.load_state_dict(torch.load(out / "model.pth", weights_only=True), strict=True)
    assert not tv.fc.weight.any() and not tv.fc.bias.any()  # the card's promise: fc holds zeros
    literal = timm.create_model("resnet18", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    with torch.no_grad():
        ours = online(x)
        torch.testing.assert_close(_timm_features(literal, x), ours, **TOL)
        tv.fc = nn.Identity()
        torch.testing.assert_close(tv.eval()(x), ours, **TOL)
    card = json.loads((out / "model_card.json").read_text())
    assert card["classifier"]["zeros"] is True and "zeros" in card["classifier"]["from"]
    with pytest.raises(ValueError, match="no trained classifier"):
        load_backbone(out, head=True)
    (out / "config.json").unlink()  # the torchvision half alone (model.pth + model_card.json) loads back too
    (out / "model.safetensors").unlink()
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(out)(x), ours, **TOL)


def test_exports_refuse_what_the_other_library_cannot_build(tmp_path, capsys):
    torch.manual_seed(0)
    tiny = zoo.create("convnet_tiny")
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    cases = [(["--format", "timm", "--arch", "convnet_tiny"], "no timm equivalent"),
             (["--format", "torchvision", "--arch", "convnet_tiny"], "not one of torchvision's ResNets"),
             (["--format", "onnx"], "choose from safetensors, timm, torchvision"),
             (["--format", "timm,safetensors"], "safetensors export is one file")]
    for extra, expected in cases:
        out = tmp_path / "o"
        args = [str(tmp_path / "tiny.pth"), "--out", str(out), *extra]
        if "--arch" not in extra:
            args += ["--arch", "convnet_tiny"]
        assert export_main(args) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # refused before anything was written


def _release(path, online: nn.Module, target: nn.Module, classes: int = 1000) -> None:
    """A file in the official layout (the test_official_byol converter's inverse) with a 1000-way classifier."""
    from test_official_byol import _install_fake_modules, to_haiku

    rng = np.random.default_rng(0)
    op, os_ = to_haiku(online, "res_net50")
    tp, ts = (op, os_) if target is online else to_haiku(target, "res_net50")
    op = dict(op)  # the classifier is the online branch's only (pickle shares every other leaf with the target)
    op["classifier"] = {"w": rng.normal(size=(2048, classes)).astype(np.float32) * 0.01,
                        "b": rng.normal(size=(classes,)).astype(np.float32)}
    with pytest.MonkeyPatch.context() as mp:
        _install_fake_modules(mp)
        from test_official_byol import _ByolExperimentState

        es = _ByolExperimentState(op, tp, os_, ts, ())
        with open(path, "wb") as f:
            pickle.dump({"experiment_state": es, "step": 1, "rng": np.zeros(2, np.uint32)}, f, protocol=2)


def test_official_release_converts_to_both_formats_in_one_command(tmp_path, capsys):
    torch.manual_seed(0)
    online = _randomise_bn(torchvision.models.resnet50())
    pkl = tmp_path / "pretrain_res50x1.pkl"
    _release(pkl, online, online)  # target = online: pickle stores the shared leaves once (half the file, faster)
    out = tmp_path / "r50"
    assert export_main([str(pkl), "--format", "timm,torchvision", "--out", str(out)]) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with_head = load_backbone(pkl, padding="torch", head=True)  # timm/torchvision pad symmetrically (the card says)
        ours, logits = with_head.encoder(x), with_head(x)
        literal = timm.create_model("resnet50", pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
        torch.testing.assert_close(_timm_features(literal, x), ours, **TOL)
        torch.testing.assert_close(literal(x), logits, **TOL)
        tv = torchvision.models.resnet50()
        tv.load_state_dict(torch.load(out / "model.pth", weights_only=True), strict=True)
        torch.testing.assert_close(tv.eval()(x), logits, **TOL)
        # zoo.load_backbone(folder) restores the recorded TF-SAME padding: the original's features
        from zoo.models.tf_same import apply_tf_same_padding

        apply_tf_same_padding(with_head.encoder)
        torch.testing.assert_close(load_backbone(out)(x), with_head.encoder(x), **TOL)
    card = json.loads((out / "config.json").read_text())["zoo"]
    assert card["padding"] == "tf_same" and "padding_note" in card
    assert card["source_sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert card["classifier"]["num_classes"] == 1000


def test_wide_resnets_are_refused_in_one_line(tmp_path, capsys):
    """BYOL's wide ResNets widen the stem too; neither timm (fixed 64-channel 7x7 stem) nor torchvision builds one."""
    torch.manual_seed(0)
    enc = zoo.create("resnet18", width=2)
    torch.save({"state_dict": {f"online_encoder.{k}": v for k, v in enc.state_dict().items()},
                "pytorch-lightning_version": "2.6.0",
                "zoo": {"format": 1, "kind": "image-encoder", "arch": "resnet18", "overrides": {"width": 2},
                        "encoders": {"online": "online_encoder."}, "classifier": None}}, tmp_path / "wide.ckpt")
    out = tmp_path / "wide"
    for fmt, expected in (("torchvision", "not one of torchvision's ResNets"), ("timm", "wider than timm's fixed")):
        assert export_main([str(tmp_path / "wide.ckpt"), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
