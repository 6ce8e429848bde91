"""zoo.train.progress: a bar on a terminal, whole lines elsewhere, paced by time and by tenths of the work."""
import io
import sys

from zoo.train.progress import LinePacer, RateClock, clock, track


def test_track_yields_everything_and_draws_done_of_total(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(range(5), "teacher targets", enabled=True, interactive=True)) == [0, 1, 2, 3, 4]
    text = err.getvalue()
    assert "teacher targets" in text and "5/5" in text and "ETA" in text


def test_track_writes_whole_lines_off_a_terminal_and_nothing_on_other_ranks(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(iter(range(20)), "features", total=20)) == list(range(20))  # StringIO: not a terminal
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert done == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20], lines  # first item, every tenth, no repeated last
    assert lines[0].startswith("features  1/20    5%") and lines[-1].startswith("features  20/20  100%")
    err.truncate(0)
    err.seek(0)
    assert list(track(iter([7, 8, 9]), "unknown total")) == [7, 8, 9]
    assert err.getvalue().splitlines()[-1].startswith("unknown total  3  ")  # no total: the count, and a last line
    err.truncate(0)
    err.seek(0)
    monkeypatch.setenv("RANK", "1")
    assert list(track([3], "x", enabled=True)) == [3]
    assert list(track([4], "x", enabled=False)) == [4]
    assert err.getvalue() == ""


def test_line_pacer_writes_by_time_or_by_tenth_whichever_comes_first():
    pacer = LinePacer(total=1000, seconds=20.0)
    t0 = pacer._last_time
    assert pacer.due(1, t0 + 0.5)  # the first unit of work
    assert not pacer.due(2, t0 + 5.0) and not pacer.due(50, t0 + 19.0)
    assert pacer.due(51, t0 + 21.0)  # 20 s passed before the first tenth
    assert not pacer.due(60, t0 + 22.0)
    assert pacer.due(100, t0 + 23.0)  # the first tenth came before 20 s more
    assert not pacer.due(101, t0 + 24.0)
    late = LinePacer(total=660, seconds=20.0)  # the digits demo: 20 s elapsed at step 130, a tenth is 66 steps
    t2 = late._last_time
    assert late.due(1, t2) and late.due(66, t2 + 19.0) and late.due(130, t2 + 39.5)
    assert not late.due(132, t2 + 40.0)  # no near-copy of the line at 130 two steps later
    assert late.due(198, t2 + 55.0)
    unknown = LinePacer(total=0, seconds=20.0)
    t1 = unknown._last_time
    assert unknown.due(1, t1) and not unknown.due(50, t1 + 1) and unknown.due(60, t1 + 21)


def test_rate_leaves_out_the_first_unit_and_clock_formats_long_times():
    rate = RateClock()
    rate.tick(1, now=100.0)  # the first step ends at t=100 s (start-up costs included)
    assert rate.rate(1, now=100.0) == 0.0  # not known yet
    rate.tick(11, now=105.0)
    assert rate.rate(11, now=105.0) == 2.0  # 10 steps in 5 s after the first
    assert clock(None) == "--:--:--" and clock(3661) == "01:01:01" and clock(90000) == "1d 01:00:00"
