"""ProbeReport's table: printed once the progress bar is done (never under a live bar), at most 80 columns."""
import types

from zoo.eval.probe_report import ProbeReport

RESULT = {"dataset": "digits", "method": "SimSiam", "encoder": "convnet_tiny", "steps": 660,
          "random_init_knn_top1": 88.58, "random_init_linear_top1": 94.99, "trained_knn_top1": 96.1,
          "trained_linear_top1": 97.77, "gain_knn_points": 7.52, "gain_linear_points": 2.78}


class Bar:
    def teardown(self, trainer, module, stage):
        print("BAR-STOPPED")


def test_table_prints_after_the_progress_bar_stops_and_fits_80_columns(capsys):
    report = ProbeReport()
    report.result, report._pending = dict(RESULT), True
    trainer = types.SimpleNamespace(progress_bar_callback=Bar())
    report.teardown(trainer, None, "fit")
    out = capsys.readouterr().out
    assert out.index("BAR-STOPPED") < out.index("random initialisation") < out.index("SimSiam-trained")
    assert "660 SimSiam steps" in out and "+7.52" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    report.teardown(trainer, None, "fit")  # printed once
    assert capsys.readouterr().out == ""


def test_the_band_a_config_quotes_is_printed_with_inside_or_outside(capsys):
    import pytest

    from zoo.eval.probe_report import band_lines, print_report

    inside = dict(RESULT, expected={"source": "README: seeds 0-2", "gain_knn_points": {"band": [3.0, 9.0], "inside": True}})
    print_report(inside)
    out = capsys.readouterr().out
    assert "gain_knn_points 3..9: this run 7.52, inside" in out and "README: seeds 0-2" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    outside = dict(RESULT, expected={"trained_knn_top1": {"band": [97.0, 99.0], "inside": False}})
    assert any("OUTSIDE" in line for line in band_lines(outside))
    assert any("check the install" in line for line in band_lines(outside))
    assert band_lines(RESULT) == []  # a config without a band prints nothing more
    with pytest.raises(ValueError, match="expected.gain=.*give \\[low, high\\]"):
        ProbeReport(expected={"gain": [1, 2]})
    with pytest.raises(ValueError, match="expected.gain_knn_points"):
        ProbeReport(expected={"gain_knn_points": [5, 2]})


def test_the_evaluators_notices_print_under_the_table_not_under_the_bar(capsys):
    report = ProbeReport()
    note = "random_init: the best base lr 0.1 is at the bottom of lr_grid [0.1, 0.4, 1.6]"
    report.result, report._pending = {**RESULT, "notices": [note]}, True
    report.teardown(types.SimpleNamespace(progress_bar_callback=Bar()), None, "fit")
    out = capsys.readouterr().out
    assert out.index("gain (points)") < out.index(f"probe: {note}")


def test_notices_name_the_callbacks_settings_not_the_probe_commands_flags():
    from zoo.eval.probe_report import callback_terms

    line = ("the best base lr 0.1 is at the bottom of lr_grid [0.1, 0.4, 1.6]: the optimum may lie below; widen "
            "--lr_grid, or pass --grid_extensions 2 to extend it")
    said = callback_terms(line)
    assert "--" not in said
    assert "widen ProbeReport's init_args.lr_grid, or set ProbeReport's init_args.grid_extensions to 2" in said
    assert "the end-of-fit probe's num_workers (fixed)" in callback_terms("lower --num_workers")
    assert ProbeReport(grid_extensions=2).grid_extensions == 2
