"""Every image method, found rather than listed: each package with an ``ImagePretraining`` subclass ships
``configs/<package>/digits.yaml``, and that config trains for 2 steps through ``zoo fit``, writes a checkpoint whose
contract ``zoo.load_backbone`` reads for every encoder it declares (and the classifier), and resumes.

This is the test template of ARCHITECTURE.md's "Adding an image method": a new method package with its digits
config is picked up here with no edit to this file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _defines_a_method(package: Path) -> bool:
    """Does any module of ``package`` define a class deriving from ``ImagePretraining`` (read from the source)?"""
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    (b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)) == "ImagePretraining"
                    for b in node.bases):
                return True
    return False


METHODS = sorted(p.name for p in ROOT.iterdir()
                 if (p / "__init__.py").is_file() and p.name != "zoo" and _defines_a_method(p))


def test_the_known_methods_are_found():
    assert {"byol", "simsiam", "barlowtwins"} <= set(METHODS), METHODS


@pytest.mark.parametrize("method", METHODS)
def test_method_ships_a_digits_config_naming_its_own_class(method):
    config = ROOT / "configs" / method / "digits.yaml"
    assert config.is_file(), f"{method}: add configs/{method}/digits.yaml (see ARCHITECTURE.md, 'Adding an image method')"
    class_path = yaml.safe_load(config.read_text())["model"]["class_path"]
    assert class_path.split(".")[0] == method, class_path


@pytest.mark.parametrize("method", METHODS)
def test_digits_config_trains_two_steps_checkpoints_and_loads_every_declared_encoder(method, tmp_path):
    from zoo.cli import main
    from zoo.weights import load_backbone
    from zoo.weights.checkpoint import read_checkpoint

    config = ROOT / "configs" / method / "digits.yaml"
    run = tmp_path / "run"
    argv = ["fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run),
            "--trainer.callbacks=[]", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size", "16"]
    assert main(argv) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    contract = read_checkpoint(ckpt)["zoo"]
    assert contract["kind"] == "image-encoder" and contract["method"].split(".")[0] == method
    x = torch.rand(4, 3, 32, 32)
    encoders = list(contract["encoders"])
    default = load_backbone(ckpt)
    assert default.zoo_which == encoders[0]  # the first declared encoder is the default
    for which in encoders:
        feats = load_backbone(ckpt, which=which)(x)
        assert feats.shape[0] == 4 and bool(torch.isfinite(feats).all())
    assert load_backbone(ckpt, head=True)(x).shape == (4, 10)
    with pytest.raises(ValueError, match="which="):
        load_backbone(ckpt, which="no-such-encoder")
    # the run resumes from its checkpoint for one more step
    assert main([*argv[:4], "3", *argv[5:], "--ckpt_path", str(ckpt)]) == 0


@pytest.mark.parametrize("method", METHODS)
def test_a_misspelt_base_key_is_answered_with_the_base_key(method, capsys):
    """The base's keys reach a method through its ``**kwargs``; the unknown-key line still suggests them."""
    from zoo.cli import main

    config = ROOT / "configs" / method / "digits.yaml"
    assert main(["fit", "--config", str(config), "--model.init_args.weight_decy", "1"]) == 2
    assert "did you mean weight_decay?" in capsys.readouterr().err


def test_the_base_names_nothing_the_method_chooses_module_and_metric_names():
    """A method that declares no names gets the base's neutral ones (modules ``encoder`` / ``classifier``, branch
    ``main``, metrics ``*/probe_top*``); the kNN callback finds its encoder by default. BYOL keeps its own names."""
    from byol import BYOL
    from zoo.eval.knn import KNNProbeCallback
    from zoo.train.ssl import ImagePretraining

    class Plain(ImagePretraining):
        def build_networks(self, num_features: int) -> None:
            self.head = torch.nn.Linear(num_features, 4)

        def forward_views(self, views):
            return [self.main_encoder(v) for v in views]

        def compute_loss(self, outputs):
            return (outputs[0] - outputs[1]).pow(2).mean(), outputs[0]

    tiny = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=16, num_classes=3)
    model = Plain(**tiny)
    assert [n for n, _ in model.named_children()][:3] == ["encoder", "head", "classifier"]  # registration order kept
    assert model.backbone() is model.encoder and model.probe_classifier is model.classifier
    contract = model.checkpoint_contract()
    assert contract["encoders"] == {"main": "encoder."} and contract["classifier"] == "classifier."
    assert KNNProbeCallback(data="digits")._encoder(model) is model.encoder
    logged: dict = {}
    model.log_dict = lambda values, **_: logged.update(values)
    model.validation_step({"image": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8),
                           "label": torch.tensor([0, 1, 2, 0])}, 0)
    assert set(logged) == {"val/probe_top1", "val/probe_top5"}

    byol = BYOL(**tiny, projector_hidden=32, projection_dim=16)
    names = [n for n, _ in byol.named_children()]
    assert names[0] == "online_encoder" and "online_classifier" in names and "encoder" not in names
    assert KNNProbeCallback(data="digits")._encoder(byol) is byol.online_encoder
    assert byol.checkpoint_contract()["encoders"] == {"online": "online_encoder.", "target": "target_encoder."}
