"""simsiam.SimSiam: the paper's loss and heads, a real (tiny) training run on digits, and its checkpoint read by
zoo.load_backbone, zoo export and the probe through the checkpoint contract alone."""
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simsiam import SimSiam, negative_cosine, prediction_mlp, projection_mlp, simsiam_loss
from zoo.data import ImageDataModule
from zoo.eval.probe import ProbeConfig, run_probe
from zoo.train.schedules import warmup_cosine
from zoo.train.trainer import UsageError, build_trainer
from zoo.weights import load_backbone
from zoo.weights.checkpoint import checkpoint_contract, read_checkpoint
from zoo.weights.export import export_backbone

TINY = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=16, projector_hidden=32,
            projection_dim=16, predictor_hidden=8, base_lr=0.5)


def test_loss_is_the_symmetrised_negative_cosine_with_stop_gradient():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 5, requires_grad=True) for _ in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    ref = -0.5 * F.cosine_similarity(p1, z2.detach(), dim=-1).mean() - 0.5 * F.cosine_similarity(
        p2, z1.detach(), dim=-1).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None and p2.grad is not None
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(negative_cosine(x, torch.tensor([[0.0, 3.0], [2.0, 2.0]])), torch.tensor([0.0, -1.0]))


def test_heads_have_the_papers_shapes():
    proj, pred = projection_mlp(64, 2048, 2048), prediction_mlp(2048, 512)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    bns = [m for m in proj if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 2048), (2048, 2048), (2048, 2048)]
    assert len(bns) == 3 and not bns[-1].affine and isinstance(proj[-1], nn.BatchNorm1d)  # BN on the output fc
    assert sum(isinstance(m, nn.ReLU) for m in proj) == 2  # no ReLU on the output
    assert [(m.in_features, m.out_features) for m in pred if isinstance(m, nn.Linear)] == [(2048, 512), (512, 2048)]
    assert isinstance(pred[-1], nn.Linear) and pred[-1].bias is not None  # no BN or ReLU on the predictor's output
    with pytest.raises(UsageError, match="predictor_hidden"):
        SimSiam(**{**TINY, "predictor_hidden": 0})


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def _train(tmp_path, steps=4, **kw):
    torch.manual_seed(0)
    model, rec = SimSiam(**{**TINY, **kw}), LrRecorder()
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=steps, callbacks=[rec], logger=False,
                            enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                            enable_checkpointing=False)
    trainer.fit(model, ImageDataModule("digits", batch_size=16, num_workers=0, image_size=16))
    return model, rec, trainer


def test_trains_with_cosine_lr_and_a_fixed_predictor_lr(tmp_path):
    model, rec, trainer = _train(tmp_path, steps=4)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert -1.0 <= float(trainer.callback_metrics["train/loss"]) <= 1.0
    peak = 0.5 * 16 / 256
    encoder_lrs, predictor_lrs, classifier_lrs = zip(*rec.lrs)
    assert encoder_lrs == pytest.approx([warmup_cosine(k, 4, 0, peak) for k in range(4)])
    assert classifier_lrs == encoder_lrs
    assert predictor_lrs == pytest.approx([peak] * 4)  # the paper's fixed predictor lr
    assert not hasattr(model, "target_encoder") and "train/tau" not in trainer.callback_metrics


def test_checkpoint_loads_through_the_contract_in_load_backbone_export_and_probe(tmp_path):
    model, _, trainer = _train(tmp_path, steps=2)
    ckpt = tmp_path / "simsiam.ckpt"
    trainer.save_checkpoint(ckpt)
    contract = checkpoint_contract(read_checkpoint(ckpt))
    assert contract == {"format": 1, "kind": "image-encoder", "method": "simsiam.SimSiam", "arch": "convnet_tiny",
                        "overrides": {"widths": [8, 16, 16, 32]}, "encoders": {"online": "online_encoder."},
                        "classifier": "online_classifier."}
    x = torch.randn(3, 3, 16, 16)
    enc = model.online_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(ckpt)(x), enc(x))
        torch.testing.assert_close(load_backbone(ckpt, head=True)(x), model.online_classifier(enc(x)))
    with pytest.raises(ValueError, match=r"no 'target' encoder \(it has: \['online'\]\); pass which='online'"):
        load_backbone(ckpt, which="target")
    out = export_backbone(ckpt, tmp_path / "simsiam.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(out)(x), enc(x))
    cfg = ProbeConfig(knn_k=(5,), image_size=16, resize=16, num_workers=0, extract_batch_size=256, cache_dir=None,
                      progress=False)
    res = run_probe(str(ckpt), "digits", mode="knn", cfg=cfg)
    assert res["arch"] == "convnet_tiny" and 10 < res["top1"] <= 100  # 10 classes: chance is 10


def test_digits_stored_at_another_size_than_the_views_is_refused(tmp_path):
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=1, logger=False, enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(UsageError, match=r"data\.image_size=32 but model\.image_size=16: .* set both to the same"):
        trainer.fit(SimSiam(**TINY), ImageDataModule("digits", batch_size=16, num_workers=0, image_size=32))
