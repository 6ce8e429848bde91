"""Shared helpers for the language-model tests: a tiny corpus, a tiny model config, a quiet CPU Trainer."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from zoo.data.text import TextDataModule

# A 2-layer Gemma 2-style model (local + global layer) small enough for a few CPU steps per test.
TINY = dict(n_layers=2, d_model=64, d_ff=128, n_heads=2, n_kv_heads=1, head_dim=32, window=16, max_seq_len=128)


def tiny_corpus(root: Path, n_docs: int = 8) -> Path:
    """Repetitive Python-like documents: easy to learn, so a few steps visibly lower the loss."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"def f{i}_{j}(x):\n    return x + {j % 7}\n" for j in range(60)]
        (root / f"m{i}.py").write_text("".join(lines))
    return root


def tiny_data(tmp_path: Path, seq_len: int = 32, batch_size: int = 8, **kw) -> TextDataModule:
    """TextDataModule over tiny_corpus with its cache inside tmp_path."""
    return TextDataModule(paths=str(tiny_corpus(tmp_path / "corpus")), seq_len=seq_len, batch_size=batch_size,
                          val_fraction=0.25, cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def quiet_trainer(tmp_path: Path, max_steps: int, **kw) -> L.Trainer:
    """CPU Trainer without progress bar or checkpoints; logs kept in memory (callback_metrics)."""
    kw.setdefault("limit_val_batches", 2)
    kw.setdefault("val_check_interval", max_steps)
    kw.setdefault("check_val_every_n_epoch", None)  # validate by step count, even across epochs
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                     default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


def fit_and_val_losses(module: L.LightningModule, dm: TextDataModule, tmp_path: Path, steps: int = 30):
    """(validation loss before training, trainer after ``steps`` training steps)."""
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.validate(module, dm)
    before = trainer.callback_metrics["val/loss"].item()
    trainer = quiet_trainer(tmp_path, max_steps=steps)
    trainer.fit(module, dm)
    return before, trainer
