"""Protocol mode over 2 CPU processes (``--devices 2``, gloo) gives the figures of one process with the doubled batch,
also when rank 0 is preempted mid-epoch and the run resumed; one report, written once.

The runs are subprocesses: Lightning starts rank 1 by running the command again (``tests/protocol_ranks.py``, or
``python -m zoo.cli probe``). What makes 2 ranks equal to 1: every rank trains the heads on the gathered global batch
(batch-norm statistics and the mean over non-held-out rows of the whole batch), the train views are drawn as rows of
the global batch, and the last batch's padding places are empty instead of repeated images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from zoo.weights.safe_load import safe_torch_load

DRIVER = Path(__file__).with_name("protocol_ranks.py")


def _env() -> dict[str, str]:
    # one thread per process: the 1- and 2-process runs use the same kernels, whatever CPU this is
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _probe(out: Path, devices: int, batch: int, signal_at: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), str(out), str(devices), str(batch)] + ([str(signal_at)] if signal_at else [])
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def _figures(run: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    assert run.returncode == 0 and len(lines) == 1, (run.returncode, run.stdout, run.stderr[-3000:])
    return json.loads(lines[0])


def test_two_processes_preempted_and_resumed_give_the_figures_of_one(tmp_path):
    one = _figures(_probe(tmp_path / "one", 1, 32))
    assert 20 < one["top1"] < 100 and one["counts"]["train"] == 199  # a trained probe, not chance, on every image
    killed = _probe(tmp_path / "two", 2, 16, signal_at=9)  # rank 0's 9th batch: epoch 1 of 4 (7 steps each)
    assert killed.returncode == 143, killed.stderr[-3000:]
    (ckpt,) = (tmp_path / "two").glob("protocol_pass_*/checkpoints/last.ckpt")
    saved = safe_torch_load(ckpt)
    assert saved["epoch"] == 1 and saved["global_step"] % 7 != 0  # mid-epoch
    resumed = _probe(tmp_path / "two", 2, 16)
    assert f"epoch 1, step {saved['global_step']}" in resumed.stderr
    two = _figures(resumed)
    # same images, views, batch-norm statistics and schedule; the features of a 16-image and a 32-image forward
    # differ by float rounding only, far below a changed prediction
    for key in ("top1", "top5", "base_lr", "heldout_top1", "counts"):
        assert two[key] == one[key], (key, two[key], one[key])


def test_the_command_line_reports_once_over_two_processes(tmp_path):
    out = tmp_path / "probe"
    cmd = [sys.executable, "-m", "zoo.cli", "probe", "--backbone", "random:convnet_tiny", "--data", "digits",
           "--mode", "protocol", "--devices", "2", "--max_train", "65", "--max_test", "21", "--epochs", "1",
           "--lr_grid", "[0.4]", "--batch_size", "16", "--cache_dir", "null", "--progress", "false",
           "--out", str(out), "--overwrite"]  # rank 1 must neither claim nor clear --out while rank 0 works in it
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("probe (protocol)") == 1 and run.stdout.count("wrote ") == 1, run.stdout
    assert "resuming the probe" not in run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["train"] == 65 and metrics["config"]["devices"] == 2
    assert not list(out.glob("protocol_pass_*"))  # the pass's checkpoints are spent, on rank 0's watch
