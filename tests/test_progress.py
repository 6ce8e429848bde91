"""zoo.train.progress.track: a progress bar for work outside the Trainer's loops."""
import io
import itertools
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


def test_track_off_a_terminal_writes_lines_first_item_each_tenth_and_on_time(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(range(100), "train features", enabled=True)) == list(range(100))
    lines = err.getvalue().splitlines()
    # a line after the first item, one per tenth, the last one once: 1, 10, 20, ..., 90, 100
    assert [int(line.split()[2].split("/")[0]) for line in lines] == [1, *range(10, 101, 10)]
    assert "\r" not in err.getvalue() and all("ETA" in line and "/100" in line for line in lines)
    err.seek(0)
    err.truncate()
    clock = itertools.count(0, 20)  # every item takes 20 s: a line per item, well before each tenth
    monkeypatch.setattr("zoo.train.progress.time.perf_counter", lambda: float(next(clock)))
    list(track(range(50), "slow", enabled=True, interval=15.0))
    assert len(err.getvalue().splitlines()) == 50
