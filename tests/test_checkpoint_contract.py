"""The checkpoint contract (checkpoint["zoo"]) and its one reader: what methods write, what load_backbone reads
(only the contract; old files through the legacy fallback)."""
import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import zoo
from byol import BYOL
from zoo.weights import load_backbone
from zoo.weights.checkpoint import checkpoint_contract, read_checkpoint

TINY = {"widths": [8, 16, 16, 32]}


def _byol_ckpt(path):
    model = BYOL(encoder="convnet_tiny", encoder_overrides=TINY, image_size=16, num_classes=10)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.1)  # target differs from online, so loading the wrong one would show
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return model


def test_byol_writes_its_contract(tmp_path):
    _byol_ckpt(tmp_path / "b.ckpt")
    assert checkpoint_contract(read_checkpoint(tmp_path / "b.ckpt")) == {
        "format": 1, "kind": "image-encoder", "method": "byol.BYOL", "arch": "convnet_tiny", "overrides": TINY,
        "encoders": {"online": "online_encoder.", "target": "target_encoder."}, "classifier": "online_classifier."}


def test_old_checkpoint_without_contract_loads_through_the_fallback(tmp_path):
    model = _byol_ckpt(tmp_path / "b.ckpt")
    ckpt = read_checkpoint(tmp_path / "b.ckpt")
    del ckpt["zoo"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert checkpoint_contract(read_checkpoint(tmp_path / "old.ckpt")) is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "old.ckpt")(x), model.online_encoder.eval()(x))
        torch.testing.assert_close(load_backbone(tmp_path / "old.ckpt", which="target")(x),
                                   model.target_encoder.eval()(x))
        logits = load_backbone(tmp_path / "old.ckpt", head=True)(x)
        torch.testing.assert_close(logits, model.online_classifier(model.online_encoder(x)))


def test_the_contract_alone_says_where_the_encoder_is(tmp_path):
    """Attribute names and hyper-parameters the reader has never seen: it follows the contract's prefixes."""
    torch.manual_seed(0)
    enc, head = zoo.create("convnet_tiny", **TINY).eval(), nn.Linear(32, 4)
    sd = {f"student.backbone.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"probe.{k}": v for k, v in head.state_dict().items()})
    sd["student.head.weight"] = torch.zeros(3, 32)
    torch.save({"state_dict": sd, "hyper_parameters": {"whatever": 1}, "zoo": {
        "format": 1, "kind": "image-encoder", "arch": "convnet_tiny", "overrides": TINY,
        "encoders": {"online": "student.backbone."}, "classifier": "probe."}}, tmp_path / "m.ckpt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "m.ckpt")(x), enc(x))
        torch.testing.assert_close(load_backbone(tmp_path / "m.ckpt", head=True)(x), head(enc(x)))


def test_reader_refuses_what_it_cannot_read(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain.pt' is not a Lightning checkpoint .* `zoo fit`"):
        read_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"contract format 2 is newer than this byol-zoo reads \(up to 1\)"):
        checkpoint_contract({"state_dict": {}, "zoo": {"format": 2, "kind": "image-encoder"}})
    with pytest.raises(ValueError, match="'zoo' entry is malformed"):
        checkpoint_contract({"state_dict": {}, "zoo": {"kind": "image-encoder"}})
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {},
                "zoo": {"format": 1, "kind": "lm"}}, tmp_path / "lm.ckpt")
    with pytest.raises(ValueError, match=r"language-model checkpoint.*load_lm"):
        load_backbone(tmp_path / "lm.ckpt")
