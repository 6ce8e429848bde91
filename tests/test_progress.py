"""zoo.train.progress.track: a progress bar for work outside the Trainer's loops."""
import io
import sys

from zoo.train.progress import track


def test_track_yields_everything_and_draws_done_of_total(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(range(5), "teacher targets", enabled=True)) == [0, 1, 2, 3, 4]
    text = err.getvalue()
    assert "teacher targets" in text and "5/5" in text and "ETA" in text


def test_track_is_silent_off_a_terminal_and_on_other_ranks(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(iter([1, 2]), "x")) == [1, 2]  # not a tty: nothing drawn
    monkeypatch.setenv("RANK", "1")
    assert list(track([3], "x", enabled=True)) == [3]
    assert err.getvalue() == ""
