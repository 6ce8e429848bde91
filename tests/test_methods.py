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
