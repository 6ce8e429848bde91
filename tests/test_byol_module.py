"""byol.BYOL in a real (tiny) training run: EMA semantics, per-view forward, stop-gradients, schedules, bad input."""
import copy

import lightning.pytorch as pl
import pytest
import torch

from byol import BYOL, lr_schedule, scaled_lr, tau_schedule
from zoo.data import ImageDataModule
from zoo.train.trainer import build_trainer

TINY = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=16, projector_hidden=32,
            projection_dim=16, base_lr=0.5, tau_base=0.9, warmup_steps=2)


def _data(batch_size=16):
    return ImageDataModule("digits", batch_size=batch_size, num_workers=0, image_size=16)


class Recorder(pl.Callback):
    """Snapshots online/target parameters around each step and the lr / tau actually used."""

    def __init__(self):
        self.before, self.after, self.lrs = [], [], []

    def on_train_batch_start(self, trainer, module, batch, idx):
        self.before.append(copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()}))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        self.after.append({k: v.detach().clone() for k, v in module.state_dict().items()})


def _fit(tmp_path, steps=3, **kw):
    model = BYOL(**{**TINY, **kw})
    rec = Recorder()
    # The EMA runs inside optimizer_step, right after the online update; it is checked against the next step's
    # "before" snapshot, with the online weights of this step's "after" snapshot.
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=steps, callbacks=[rec], logger=False,
                            enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, _data())
    return model, rec, trainer


def test_target_is_ema_of_new_online_weights_with_scheduled_tau(tmp_path):
    model, rec, trainer = _fit(tmp_path, steps=3)
    total = model.total_steps
    assert total == 3
    for k in range(2):
        tau = tau_schedule(k, total, 0.9)
        new_online, old_target = rec.after[k], rec.before[k]
        got = rec.before[k + 1]
        for name in ("0.weight", "3.weight"):
            exp = tau * old_target[f"target_projector.{name}"] + (1 - tau) * new_online[f"online_projector.{name}"]
            assert torch.allclose(got[f"target_projector.{name}"], exp, atol=1e-6)
        w = "features.0.weight"
        exp = tau * old_target[f"target_encoder.{w}"] + (1 - tau) * new_online[f"online_encoder.{w}"]
        assert torch.allclose(got[f"target_encoder.{w}"], exp, atol=1e-6)
    # batch-norm running statistics of the target are its own (updated by its train-mode forward), not copied
    assert not torch.equal(model.target_encoder.features[1].running_mean, model.online_encoder.features[1].running_mean)
    assert all(not p.requires_grad for p in model.target_encoder.parameters())


def test_lr_follows_warmup_cosine_of_scaled_base(tmp_path):
    model, rec, _ = _fit(tmp_path, steps=4)
    peak = scaled_lr(0.5, 16)
    assert rec.lrs == pytest.approx([lr_schedule(k, 4, 2, peak) for k in range(4)])


def test_views_are_forwarded_separately_and_classifier_is_stop_gradient():
    model = BYOL(**TINY, num_classes=10)
    seen = []
    model.online_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    v1, v2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    model._views_forward(v1, v2)
    assert seen == [8, 8]  # two calls of batch B, never one of 2B: batch-norm statistics per view
    # the online classifier's loss must not reach the encoder
    h1 = model.online_encoder(v1)
    loss = torch.nn.functional.cross_entropy(model.online_classifier(h1.detach()), torch.zeros(8, dtype=torch.long))
    loss.backward()
    assert all(p.grad is None for p in model.online_encoder.parameters())
    assert model.online_classifier.weight.grad is not None


def test_views_differ_per_sample_and_are_reproducible():
    model = BYOL(**TINY, num_classes=10)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    x[:] = x[0]  # identical images: any difference between outputs comes from per-sample parameters
    g = torch.Generator().manual_seed(3)
    a = model.view1(x, g)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert len({round(float(v), 4) for v in a.flatten(1).mean(1)}) > 3
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(model.view1(x, g2), a)


def test_training_runs_logs_and_checkpoints(tmp_path):
    model = BYOL(**TINY)
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=12, enable_progress_bar=False,
                            limit_val_batches=2, val_check_interval=12, enable_model_summary=False)
    trainer.fit(model, _data(32))
    m = trainer.callback_metrics
    assert {"train/loss", "train/online_top1", "val/online_top1", "train/tau"} <= set(m)
    assert 0.0 <= float(m["train/loss"]) <= 8.0 + 2.5  # BYOL loss in [0, 8] plus the classifier's cross-entropy
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert model.hparams.num_classes == 10  # read from the datamodule, saved for reloading


def test_bad_values_fail_early_with_the_key():
    with pytest.raises(ValueError, match="tau_base"):
        BYOL(**{**TINY, "tau_base": 1.5})
    with pytest.raises(ValueError, match="base_lr"):
        BYOL(**{**TINY, "base_lr": -0.1})
    with pytest.raises(ValueError, match="nan_policy"):
        BYOL(**TINY, nan_policy="ignore")


def test_batch_of_one_is_refused_before_training(tmp_path):
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        trainer.fit(BYOL(**TINY), _data(1))


def test_probe_report_compares_trained_with_initial_encoder(tmp_path, capsys):
    import json

    from byol import ProbeReport

    report = ProbeReport(epochs=3, lr_grid=(0.4,))
    model = BYOL(**TINY)
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=2, logger=False, enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, callbacks=[report])
    trainer.fit(model, _data(32))
    saved = json.loads((tmp_path / "probe_report.json").read_text())
    assert saved == report.result
    for key in ("random_init_knn_top1", "trained_knn_top1", "random_init_linear_top1", "trained_linear_top1"):
        assert 0 <= saved[key] <= 100
    assert saved["gain_knn_points"] == pytest.approx(saved["trained_knn_top1"] - saved["random_init_knn_top1"])
    assert saved["gain_linear_points"] == pytest.approx(saved["trained_linear_top1"] - saved["random_init_linear_top1"])
    # the initial copy really is the initial encoder: it differs from the trained one
    w0 = report.initial.features[0].weight
    assert not torch.equal(w0, model.online_encoder.features[0].weight.cpu())
    assert "random initialisation" in capsys.readouterr().out


def test_compile_and_channels_last_train_to_the_same_weights(tmp_path):
    """``compile=True`` (the whole per-view forward through torch.compile) and channels-last change speed only: the
    same two steps give the same online and target weights as the plain eager run."""
    torch.manual_seed(0)
    ref, _, _ = _fit(tmp_path / "eager", steps=2)
    torch.manual_seed(0)
    fast, _, _ = _fit(tmp_path / "compiled", steps=2, compile=True, channels_last=True)
    assert fast._compiled_views is not None  # the compiled forward really ran
    assert fast.online_encoder.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    for name, value in ref_sd.items():
        assert torch.allclose(fast_sd[name].float(), value.float(), atol=1e-4, rtol=1e-3), name


def test_warmup_in_epochs_with_a_step_budget(tmp_path):
    """``max_epochs=-1, max_steps=N``: Lightning leaves num_training_batches unset (inf); the warmup in epochs is
    still converted with the real epoch length (digits at batch 16: 1437 // 16 = 89 batches per epoch)."""
    kw = {k: v for k, v in TINY.items() if k != "warmup_steps"}
    model = BYOL(**kw, warmup_epochs=0.02)
    trainer = build_trainer(default_root_dir=str(tmp_path), max_epochs=-1, max_steps=3, logger=False,
                            enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                            enable_checkpointing=False)
    trainer.fit(model, _data())
    assert trainer.global_step == 3 and model.total_steps == 3
    assert trainer.num_training_batches == 89 and model.warmup == round(0.02 * 89) == 2


def test_endless_budget_is_refused_naming_the_keys(tmp_path):
    from zoo.train.trainer import UsageError

    trainer = build_trainer(default_root_dir=str(tmp_path), max_epochs=-1, max_steps=-1, logger=False,
                            enable_progress_bar=False, limit_val_batches=0, enable_checkpointing=False)
    with pytest.raises(UsageError, match=r"trainer\.max_steps and trainer\.max_epochs are both -1"):
        trainer.fit(BYOL(**TINY), _data())


def test_online_classifier_eval_view_follows_the_official_order_and_can_switch_back():
    # The validation view defaults to the authors' central 224/256 square + TF bicubic; eval_overrides switches back.
    default = BYOL(**TINY, num_classes=10).eval_view.preset
    assert (default.eval_crop, default.resize_kernel) == ("official", "tf_bicubic")
    old = BYOL(**TINY, num_classes=10,
               eval_overrides={"eval_crop": "resize_then_crop", "resize_kernel": "torch_bicubic"}).eval_view.preset
    assert (old.eval_crop, old.resize_kernel) == ("resize_then_crop", "torch_bicubic")
    images = torch.randint(0, 256, (2, 3, 40, 36), dtype=torch.uint8)
    a = BYOL(**TINY, num_classes=10).eval_view(images)
    b = BYOL(**TINY, num_classes=10, eval_overrides={"eval_crop": "resize_then_crop"}).eval_view(images)
    assert a.shape == b.shape and not torch.allclose(a, b)
    with pytest.raises((ValueError, TypeError), match="eval_crop"):
        BYOL(**TINY, eval_overrides={"eval_crop": "middle"})
