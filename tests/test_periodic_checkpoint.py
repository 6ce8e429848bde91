"""The default periodic ``last.ckpt``: written at every epoch's last batch, on a timer and at the end of training,
with no flag; a hard crash after it resumes bit-exactly (the reference run and helpers are tests/test_resume.py's)."""
from __future__ import annotations

import pytest

from test_resume import STEPS, check_same_as_reference, last, reference, zoo_fit  # noqa: F401 - fixture


def test_default_epoch_end_checkpoint_then_hard_crash_resumes_exactly(reference, tmp_path):  # noqa: F811
    """No interval, no signal: the run dies at the start of step 5; the default save at the last batch of epoch 0
    (step 4) is all there is, and resuming from it ends bit-identical to the straight run."""
    root = tmp_path / "crashed"
    with pytest.raises(ConnectionAbortedError):
        zoo_fit(root, callbacks=[{"class_path": "fault_callbacks.CrashAt", "init_args": {"step": 5}}])
    saved = last(root)
    assert saved["global_step"] == 4
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "samples": 0, "global_batch": 16}]
    check_same_as_reference(reference, zoo_fit(root, "--ckpt_path", "last"), root)


def test_the_timer_saves_mid_epoch_and_the_end_of_training_is_saved(tmp_path, monkeypatch):
    """``--trainer.checkpoint_every_minutes``: with a clock that advances 10 minutes per batch and an interval of
    15, the timer fires every second batch; the end of training is saved whatever was saved before."""
    import zoo.train.checkpointing as checkpointing

    clock = iter(range(0, 10**6, 600))
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: float(next(clock)))
    saves = []
    real = checkpointing.RootCheckpoint._save_last_checkpoint

    def record(self, trainer, candidates):
        saves.append(trainer.global_step)
        real(self, trainer, candidates)

    monkeypatch.setattr(checkpointing.RootCheckpoint, "_save_last_checkpoint", record)
    cli = zoo_fit(tmp_path, "--trainer.max_steps", "7", "--trainer.checkpoint_every_minutes", "15")
    assert cli.trainer.global_step == 7 and last(tmp_path)["global_step"] == 7
    assert 4 in saves and saves[-1] == 7  # the epoch end (4 batches per epoch) and the end of training
    assert len([s for s in saves if s not in (4, 7)]) >= 2  # and the timer, mid-epoch
    saves.clear()
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: 0.0)  # a frozen clock: only epoch ends and the end
    zoo_fit(tmp_path / "b", "--trainer.max_steps", "9")
    assert saves == [4, 8, 9]
