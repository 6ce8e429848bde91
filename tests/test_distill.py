"""lm.Distill: distillation maths (full and stored subset with residual), precompute, convergence to a teacher."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lm import CausalLM, Distill
from lm.modules.distill import entropy, kl_divergence, select_subset, soft_cross_entropy, subset_cross_entropy
from lm_testutil import TINY, quiet_trainer, tiny_data


def test_full_distribution_loss_is_kl_plus_teacher_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, 50), torch.randn(5, 7, 50) * 3
    p = t.softmax(-1)
    torch.testing.assert_close(soft_cross_entropy(s, p), kl_divergence(p, s) + entropy(p))
    assert (kl_divergence(p, s) >= 0).all()
    torch.testing.assert_close(kl_divergence(p, t), torch.zeros(5, 7), atol=1e-5, rtol=0)
    # Gradient of the loss w.r.t. student logits is q - p (softmax cross-entropy).
    s.requires_grad_(True)
    soft_cross_entropy(s, p).sum().backward()
    torch.testing.assert_close(s.grad, s.detach().softmax(-1) - p, atol=1e-6, rtol=0)


def test_subset_loss_residual_bucket():
    torch.manual_seed(1)
    s, t = torch.randn(4, 30), torch.randn(4, 30) * 2
    p = t.softmax(-1)
    # All ids stored: no residual, identical to the full loss.
    all_ids = torch.arange(30).expand(4, 30)
    torch.testing.assert_close(subset_cross_entropy(s, all_ids, p), soft_cross_entropy(s, p))
    # k < V: exact cross-entropy of the (k + 1)-outcome coarsening, computed by hand.
    ids, probs = select_subset(t, 5, "topk")
    q = s.softmax(-1)
    q_k = q.gather(-1, ids)
    by_hand = -(probs * q_k.log()).sum(-1) - (1 - probs.sum(-1)) * (1 - q_k.sum(-1)).log()
    torch.testing.assert_close(subset_cross_entropy(s, ids, probs), by_hand, atol=1e-5, rtol=1e-5)
    # Stored mass that rounds to >= 1 (float16) must not produce nan from 0 * log(0).
    sharp = torch.full((1, 30), -1e4)
    sharp[0, 3] = 0.0
    out = subset_cross_entropy(sharp, torch.tensor([[3, 4]]), torch.tensor([[1.0004, 0.0]]))
    assert torch.isfinite(out).all()


def test_subset_loss_minimiser_matches_stored_probs_and_residual():
    torch.manual_seed(2)
    p = torch.randn(30).mul(2).softmax(-1)
    ids, probs = select_subset(p.log()[None], 4, "topk")
    logits = torch.zeros(1, 30, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        subset_cross_entropy(logits, ids, probs).sum().backward()
        opt.step()
    q = logits.detach().softmax(-1)
    torch.testing.assert_close(q.gather(-1, ids), probs, atol=2e-3, rtol=0)
    assert (1 - q.gather(-1, ids).sum()).item() == pytest.approx(1 - probs.sum().item(), abs=2e-3)


def test_select_subset_topk_and_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    ids, probs = select_subset(logits, 2, "topk")
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(probs, logits.softmax(-1)[:, [1, 3]])
    p = torch.tensor([0.1, 0.6, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    draws, _ = select_subset(p.log().expand(20000, 4), 1, "sample", g)
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 20000
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)  # Gumbel-top-1 samples from p
    ids, _ = select_subset(p.log().expand(50, 4), 3, "sample", torch.Generator().manual_seed(1))
    assert all(len(set(row)) == 3 for row in ids.tolist())  # without replacement
    with pytest.raises(ValueError, match="subset='nope'"):
        select_subset(logits, 2, "nope")


def sharp_teacher():
    # Large init makes a random teacher's next-token distributions peaked: something definite to imitate.
    return {**TINY, "init_std": 0.5, "final_softcap": None}


def test_student_converges_to_fixed_teacher(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data(tmp_path)
    module = Distill(student="gemma2-tiny", student_overrides=TINY, teacher="gemma2-tiny",
                     teacher_overrides=sharp_teacher(), lr=5e-3, warmup_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.validate(module, dm)
    before = trainer.callback_metrics["val/kl_teacher"].item()
    trainer = quiet_trainer(tmp_path, max_steps=40)
    trainer.fit(module, dm)
    after = trainer.callback_metrics["val/kl_teacher"].item()
    assert before > 1.0 and after < 0.35 * before
    assert "train/kl" in trainer.callback_metrics
    assert not any(k.startswith("teacher") for k in module.state_dict())  # teacher is not checkpointed


def test_topk_precompute_stored_once_and_trains(tmp_path, monkeypatch):
    torch.manual_seed(0)
    dm = tiny_data(tmp_path)
    module = Distill(student_overrides=TINY, teacher="gemma2-tiny", teacher_overrides=sharp_teacher(), top_k=4,
                     subset="sample", lr=5e-3, warmup_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=6)
    trainer.fit(module, dm)
    folder = next((dm.data_dir / "teacher").iterdir())
    ids, probs = np.load(folder / "ids.npy"), np.load(folder / "probs.npy")
    assert ids.shape == probs.shape == (len(dm.train_set), dm.seq_len, 4)
    assert probs.dtype == np.float16 and (probs.astype(np.float32).sum(-1) <= 1.001).all()
    assert json.loads((folder / "meta.json").read_text())["subset"] == "sample"
    assert 0 < trainer.callback_metrics["train/stored_mass"].item() <= 1.001  # float16 storage
    # The stored probabilities are the teacher's own for those ids.
    teacher = module.teacher.cpu()
    index, window = dm.train_set[0]  # setup switched the data module to (index, tokens) batches
    assert index == 0
    window = window[None]
    with torch.no_grad():
        full = teacher(window[:, :-1]).float().softmax(-1)[0]
    got = full.gather(-1, torch.from_numpy(ids[0].astype(np.int64)))
    torch.testing.assert_close(got, torch.from_numpy(probs[0].astype(np.float32)), atol=2e-3, rtol=2e-3)
    # A second run finds the stored targets instead of running the teacher again.
    import lm.modules.distill as distill

    monkeypatch.setattr(distill, "select_subset", lambda *a, **k: pytest.fail("teacher targets recomputed"))
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, dm)


def test_teacher_from_checkpoint_and_bad_inputs(tmp_path):
    dm = tiny_data(tmp_path)
    teacher = CausalLM(model_overrides=TINY, warmup_steps=1)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(teacher, dm)
    ckpt = tmp_path / "t.ckpt"
    trainer.save_checkpoint(ckpt)
    module = Distill(student_overrides=TINY, teacher_ckpt=str(ckpt))
    module.configure_model()  # what a Trainer calls: builds student and teacher
    x = torch.randint(0, 259, (1, 8))
    torch.testing.assert_close(module.teacher(x), teacher.model.eval()(x))
    with pytest.raises(ValueError, match="needs a teacher"):
        Distill(student_overrides=TINY)
    with pytest.raises(ValueError, match="vocab_size=300 differs"):
        Distill(student_overrides=TINY, teacher="gemma2-tiny", teacher_overrides={**TINY, "vocab_size": 300})
    with pytest.raises(FileNotFoundError, match="no .ckpt file"):
        Distill(student_overrides=TINY, teacher_ckpt=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="top_k must be"):
        Distill(student_overrides=TINY, teacher="gemma2-tiny", top_k=0)


def test_precompute_shows_progress_with_total_and_eta(tmp_path, monkeypatch):
    import io
    import sys

    from lm.modules.distill import precompute_teacher_targets

    dm = tiny_data(tmp_path)
    dm.setup("fit")
    module = Distill(student_overrides=TINY, teacher="gemma2-tiny", teacher_overrides=TINY, top_k=4)
    module.configure_model()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    n = len(dm.train_set)
    precompute_teacher_targets(module.teacher, dm.train_set, tmp_path / "targets", 4, batch_size=4, progress=True)
    batches = -(-n // 4)
    text = err.getvalue()
    assert f"teacher topk-4 targets ({n} windows, batches)" in text
    assert f"{batches}/{batches}" in text and "ETA" in text
    err.truncate(0)
    precompute_teacher_targets(module.teacher, dm.train_set, tmp_path / "lines", 4, batch_size=4)
    assert "\r" not in err.getvalue() and f"{batches}/{batches}" in err.getvalue()  # not a terminal: whole lines
    err.truncate(0)
    precompute_teacher_targets(module.teacher, dm.train_set, tmp_path / "quiet", 4, batch_size=4, progress=False)
    assert err.getvalue() == ""
