"""Feature extraction split over devices: 2 CPU processes (gloo) give the features, labels, order and skipped files of
one process; a device count the machine does not have is one line."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

import zoo
from zoo.data.images import digits_dataset
from zoo.eval.probe import ProbeConfig, cpu_count, evaluate
from zoo.eval.probe_cli import main
from zoo.eval.store import FeatureStore


def _cfg(tmp_path, **kw) -> ProbeConfig:
    base = dict(epochs=1, batch_size=32, lr_grid=(0.4,), image_size=16, resize=16, num_workers=0,
                extract_batch_size=24, cache_dir=str(tmp_path / "cache"), progress=False, shard_rows=20,
                feature_dtype="float32")
    return ProbeConfig(**{**base, **kw})


def _store(cache, split: str):
    (meta,) = cache.glob(f"*/{split}/key.json")
    import json

    saved = json.loads(meta.read_text())
    return FeatureStore(meta.parent, saved["key"], saved["n"], saved["dtype"]).load()


def test_two_cpu_processes_extract_the_features_of_one(tmp_path, monkeypatch):
    import zoo.eval.probe as probe

    monkeypatch.setattr(probe, "cpu_count", lambda: 2)  # a 1-CPU runner still runs the two processes
    enc = zoo.create("convnet_tiny", widths=[8, 16, 16, 32])
    train, test = Subset(digits_dataset("train", 16), range(130)), Subset(digits_dataset("val", 16), range(50))
    one = evaluate(enc, train, test, "knn", _cfg(tmp_path / "one", knn_k=(5,)))
    two = evaluate(enc, train, test, "knn", _cfg(tmp_path / "two", knn_k=(5,), devices=2))
    for split in ("train", "test"):
        a, b = _store(tmp_path / "one" / "cache", split), _store(tmp_path / "two" / "cache", split)
        assert torch.equal(a.rows, b.rows) and torch.equal(a.labels, b.labels) and a.skipped == b.skipped
        # each row is one image through the same weights; only the batch it rode in differs (batch 24 over shards of
        # 20 rows): fp32 sums of ~10^2-10^3 products reordered, |error| <~ 1.2e-7 x sqrt(10^3) x |x| << 1e-5
        assert (a.feats.float() - b.feats.float()).abs().max() <= 1e-5
    assert one["knn"] == two["knn"]


def test_more_devices_than_the_machine_has_is_one_line(tmp_path, capsys):
    n = cpu_count() + 1
    assert main(["--backbone", "random:convnet_tiny", "--data", "digits", "--devices", str(n), "--cache_dir",
                 "null", "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--devices {n}: this machine has {n - 1} CPUs" in err
    with pytest.raises(ValueError, match="--num_nodes 2: start one process per device"):
        evaluate(zoo.create("convnet_tiny", widths=[8, 16, 16, 32]), Subset(digits_dataset("train", 16), range(8)),
                 Subset(digits_dataset("val", 16), range(4)), "knn", _cfg(tmp_path, num_nodes=2, devices=1))


def test_a_spawned_ranks_full_disk_is_one_line_naming_the_rank():
    import torch.multiprocessing as mp

    from zoo.eval.distributed import rank_error

    child = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
             '  File "x.py", line 3, in _spawned\n    os.pwrite(fd, data, 0)\n'
             "OSError: [Errno 28] No space left on device: '/cache/features/train/shard-3.npy'\n")
    err = rank_error(mp.ProcessRaisedException(child, 1, 4242), 2)
    assert type(err) is OSError and "Traceback" not in str(err) and len(str(err).splitlines()) == 1
    assert str(err) == ("feature extraction, rank 1 of 2: [Errno 28] No space left on device: "
                        "'/cache/features/train/shard-3.npy'")
    bug = mp.ProcessRaisedException(child.replace("OSError", "AttributeError"), 0, 4243)
    assert rank_error(bug, 2) is bug  # a bug keeps the rank's traceback


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_probe_stops_its_extraction_ranks_and_the_rerun_resumes(tmp_path, signum):
    """``kill PID`` of the probe while 2 spawned ranks extract: the ranks stop with it (no orphan writes into the
    store), it exits 143 in one line, the finished shards are kept and the rerun resumes from them. ``kill -9`` (the
    OOM killer) leaves no handler to run: the kernel stops the ranks (torch's spawn sets ``PR_SET_PDEATHSIG``)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    driver = [sys.executable, str(Path(__file__).with_name("extract_ranks.py")), str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(driver, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)  # its own process group: the ranks are found by it afterwards
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("cache/*/train/shard_*.json")) and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()
        time.sleep(0.05)
    run.send_signal(getattr(signal, signum))  # the parent only, as `kill PID` does
    out, err = run.communicate(timeout=120)
    if signum == "SIGTERM":
        assert run.returncode == 143, err[-3000:]
        assert "stopped by SIGTERM during feature extraction" in err and "Traceback" not in err
    else:
        assert run.returncode == -signal.SIGKILL
    for _ in range(100):  # the spawned ranks are gone (terminated and joined before the exit)
        try:
            os.killpg(run.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a rank outlived the probe")
    kept = len(list(tmp_path.glob("cache/*/train/shard_*.json")))
    assert 0 < kept < 30  # 240 images in shards of 8
    again = subprocess.run(driver, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "done" in again.stdout, again.stderr[-3000:]
    assert "resuming train features in" in again.stderr and f"{kept} of 30 shards already extracted" in again.stderr


@pytest.mark.parametrize("env,main", [
    ({}, True),
    ({"RANK": "1"}, True), ({"LOCAL_RANK": "1"}, True), ({"NODE_RANK": "2"}, True),  # stray: one process
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, False),  # torchrun
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, True),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, False),  # Lightning's own launch
    ({"NODE_RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, False), ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, True),
])
def test_rank_zero_is_asked_of_a_real_launch_only(monkeypatch, env, main):
    """A stray RANK / LOCAL_RANK in a one-process probe must not silence its report or skip claiming --out."""
    from zoo.eval.distributed import is_main_process

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_main_process() is main
