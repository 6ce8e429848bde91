"""Launches under a scheduler, simulated on CPU: 2 SLURM tasks (srun's environment, set by the test; a fake
``scontrol`` on PATH records its arguments), 2 torchrun "nodes" on localhost, the requeue signal, ``--ckpt_path
auto``, and the run lock and rerun guard seen through Lightning's cluster environment."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"encoder": "convnet_tiny", "encoder_overrides": {"widths": [8, 16, 16, 32]}, "image_size": 16,
              "projector_hidden": 32, "projection_dim": 16, "base_lr": 1.0, "tau_base": 0.9, "warmup_steps": 2}
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, root: Path, steps: int, devices: int, callbacks: list[dict] | None = None,
                 num_nodes: int = 1) -> Path:
    """A tiny BYOL DDP config (gloo on CPU) writing to ``root``."""
    cfg = {"seed_everything": 0,
           "trainer": {"max_steps": steps, "limit_val_batches": 0, "enable_progress_bar": False,
                       "enable_model_summary": False, "accelerator": "cpu", "devices": devices,
                       "num_nodes": num_nodes, "strategy": "ddp" if devices * num_nodes > 1 else "auto",
                       "default_root_dir": str(root), "log_every_n_steps": 1, "callbacks": callbacks or []},
           "model": {"class_path": "byol.BYOL", "init_args": TINY_MODEL},
           "data": {"class_path": "zoo.data.ImageDataModule",
                    "init_args": {"dataset": "digits", "image_size": 16, "batch_size": 8, "num_workers": 0}}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cfg{len(list(folder.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def base_env(tmp_path: Path) -> dict[str, str]:
    """This environment without any launcher's variables, our sources first, and a fake ``scontrol`` on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith(("SLURM_", "LSB_"))}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    fake.chmod(0o755)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return env


def srun(tmp_path: Path, cfg: Path, *extra: str, ntasks: int = 2, job: str = "4242", port: int | None = None,
         env_extra: dict[str, str] | None = None, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """What ``srun --ntasks 2 zoo fit --config cfg ...`` starts on one node: one process per task with SLURM's
    variables (no RANK / LOCAL_RANK), all on 127.0.0.1."""
    port = port or free_port()
    procs = []
    for task in range(ntasks):
        env = {**base_env(tmp_path), "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(task),
               "SLURM_LOCALID": str(task), "SLURM_NODEID": "0", "SLURM_JOB_ID": job, "SLURM_NNODES": "1",
               "SLURM_NTASKS_PER_NODE": str(ntasks), "SLURM_JOB_NAME": "byol", "SLURM_NODELIST": "localhost",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env_extra or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "zoo.cli", "fit", "--config", str(cfg), *extra],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a task hung: " + "\n".join(q.communicate()[1][-2000:] for q in procs))
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def last(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def test_two_slurm_tasks_train_requeue_on_usr1_and_resume_with_ckpt_path_auto(tmp_path):
    run = tmp_path / "run"
    signal_cb = [{"class_path": "fault_callbacks.SignalAt", "init_args": {"step": 3, "signum": "SIGUSR1"}}]
    cfg = write_config(tmp_path, run, steps=6, devices=2, callbacks=signal_cb)
    first = srun(tmp_path, cfg, "--ckpt_path", "auto")
    for task in first:  # both tasks ran (neither was refused by the other's lock) and exited as USR1 asks
        assert task.returncode == 128 + signal.SIGUSR1, task.stderr[-3000:]
    assert last(run)["global_step"] == 3  # saved at the batch end after the signal
    assert (tmp_path / "scontrol.log").read_text().split("\n")[:-1] == ["requeue 4242"]  # once, by rank 0
    assert "SLURM job 4242 requeued" in first[0].stderr
    assert not (run / ".zoo-run.lock").exists() and not list(run.glob("hpc_ckpt_*"))
    # the requeued job runs the very same command line (without the signal this time) and finishes
    cfg.write_text(cfg.read_text().replace("fault_callbacks.SignalAt", "fault_callbacks.SigtermAt")
                   .replace("signum: SIGUSR1", "").replace("step: 3", "step: 99"))
    second = srun(tmp_path, cfg, "--ckpt_path", "auto")
    for task in second:
        assert task.returncode == 0, task.stderr[-3000:]
    assert last(run)["global_step"] == 6
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1


def test_usr1_on_one_rank_only_still_saves_requeues_and_exits_nonzero(tmp_path):
    run = tmp_path / "run"
    cb = [{"class_path": "fault_callbacks.SignalAt", "init_args": {"step": 2, "signum": "SIGUSR1", "rank": 1}}]
    cfg = write_config(tmp_path, run, steps=6, devices=2, callbacks=cb)
    tasks = srun(tmp_path, cfg, "--ckpt_path", "auto", job="77")
    assert [t.returncode for t in tasks] == [128 + signal.SIGUSR1] * 2, tasks[0].stderr[-3000:]
    assert last(run)["global_step"] == 2
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 77"


def test_slurm_tasks_that_contradict_the_devices_flag_are_refused_in_one_line(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "run", steps=2, devices=2)
    tasks = srun(tmp_path, cfg, ntasks=1, env_extra={"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4"})
    err = tasks[0].stderr.strip()
    assert tasks[0].returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("zoo fit: error: the scheduler started 4 processes (SLURM_NTASKS=4) but "
                                           "--trainer.devices 2 x --trainer.num_nodes 1 = 2"), err
    assert not (tmp_path / "run").exists()


def test_torchrun_two_nodes_of_one_process_on_localhost(tmp_path):
    """The README's multi-node torchrun line (c10d rendezvous, ``$(which zoo)``), as 2 'nodes' of 1 process each on
    127.0.0.1."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path, run, steps=3, devices=1, num_nodes=2)
    port = free_port()
    zoo = shutil.which("zoo", path=os.path.dirname(sys.executable))
    script = [zoo] if zoo else ["-m", "zoo.cli"]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "byol-test",
               *script, "fit", "--config", str(cfg), "--ckpt_path", "auto"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=base_env(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert last(run)["global_step"] == 3
    assert not (run / ".zoo-run.lock").exists()


def test_a_stray_rank_variable_does_not_switch_off_the_lock_or_the_rerun_guard(tmp_path, monkeypatch):
    from test_faults import fit

    from zoo.train.trainer import UsageError

    fit(tmp_path, steps=1)
    for var, value in (("RANK", "1"), ("NODE_RANK", "3"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(var, value)
        with pytest.raises(UsageError, match="already holds a run"):
            fit(tmp_path, steps=2)
        monkeypatch.delenv(var)


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    from zoo.files import LOCK_NAME, LockRefused, RunLock

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).symlink_to(target)
    with pytest.raises(LockRefused, match="is a symbolic link; remove it"):
        RunLock(tmp_path / "run").acquire()
    assert target.read_text() == "keep me"
    (tmp_path / "run" / LOCK_NAME).unlink()
    (tmp_path / "run" / LOCK_NAME).symlink_to(tmp_path / "missing")  # dangling: not created through the link
    with pytest.raises(LockRefused):
        RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "missing").exists()


def test_a_lock_from_another_host_is_live_while_fresh_and_taken_over_when_stale(tmp_path, monkeypatch):
    from zoo.files import LOCK_NAME, LOCK_STALE_SECONDS, LockRefused, RunLock

    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text("4321\nhost=node-elsewhere-17\njob=SLURM_JOB_ID=99\nstarted=2026-12-05T08:00:00\n")
    with pytest.raises(LockRefused, match=r"another run \(pid 4321 on host node-elsewhere-17, SLURM_JOB_ID=99\) .* "
                                          rf"If that job is gone, delete {lock_file}"):
        RunLock(tmp_path).acquire()
    assert "4321" in lock_file.read_text()  # a refused start changes nothing
    # the same scheduler job started again (a requeue onto another node): its earlier lock is its own
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    RunLock(tmp_path).acquire().release()
    monkeypatch.delenv("SLURM_JOB_ID")
    lock_file.write_text("4321\nhost=node-elsewhere-17\njob=\n")
    old = time.time() - LOCK_STALE_SECONDS - 5
    os.utime(lock_file, (old, old))  # not refreshed for longer than the staleness limit: the holder is gone
    lock = RunLock(tmp_path).acquire()
    assert lock_file.read_text().split("\n")[0] == str(os.getpid())
    lock.release()
    assert not lock_file.exists()


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path):
    from test_resume import zoo_fit

    cli = zoo_fit(tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "auto")  # nothing there: a fresh start
    assert cli.trainer.global_step == 2 and last(tmp_path)["global_step"] == 2
    cli = zoo_fit(tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "auto")  # the same line again: resumes
    assert cli.trainer.global_step == 4 and last(tmp_path)["global_step"] == 4


@pytest.mark.parametrize("args, key", [
    (["--trainer.accelerator", "gpu"], "trainer.accelerator"),
    (["--trainer.devices", "0"], "trainer.devices"),
    (["--trainer.strategy", "fsdp"], "trainer.strategy"),
    (["--trainer.num_nodes", "0"], "trainer.num_nodes"),
    (["--trainer.max_steps", "-5"], "trainer.max_steps"),
    (["--trainer.limit_train_batches", "-1"], "trainer.limit_train_batches"),
    (["--trainer.checkpoint_every_minutes", "-1"], "trainer.checkpoint_every_minutes"),
    (["--trainer.requeue_signals", "[SIGFOO]"], "trainer.requeue_signals"),
])
def test_lightning_refusals_of_a_trainer_flag_are_one_line_naming_the_key(tmp_path, capsys, args, key):
    from test_resume import zoo_fit

    from zoo.cli import main

    if args[1] == "gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is there: accelerator gpu is valid")
    zoo_fit(tmp_path / "cfg", "--trainer.max_steps", "0", "--trainer.enable_checkpointing", "false")
    code = main(["fit", "--config", str(tmp_path / "cfg" / "config0.yaml"), "--trainer.default_root_dir",
                 str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()  # (the first run's Lightning log lines come first)
    assert code == 2 and "Exception" not in err and err.splitlines()[-1].startswith(f"zoo fit: error: {key}"), err
    assert not (tmp_path / "run").exists()


def test_resuming_with_max_epochs_below_the_saved_epoch_is_one_line_and_leaves_no_version_folder(tmp_path, capsys):
    from test_resume import zoo_fit

    from zoo.cli import main

    zoo_fit(tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2")
    before = sorted(p.name for p in (tmp_path / "logs").iterdir()), sorted(p.name for p in (tmp_path / "tb").iterdir())
    code = main(["fit", "--config", str(tmp_path / "config0.yaml"), "--trainer.max_steps", "-1",
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--ckpt_path", "last"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("zoo fit: error: trainer.max_epochs=1 is below the epoch the checkpoint "
                                            "was saved in"), err
    after = sorted(p.name for p in (tmp_path / "logs").iterdir()), sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert after == before  # no empty logs/version_1, tb/version_1


def test_overwrite_replaces_a_sharded_run_folder_and_killed_sharded_saves_are_cleaned(tmp_path):
    from test_faults import TINY

    from byol import BYOL
    from zoo.data import ImageDataModule
    from zoo.train.trainer import build_trainer

    ckpts = tmp_path / "checkpoints"
    (ckpts / "last.ckpt").mkdir(parents=True)  # what an fsdp2 run leaves: a folder of shards
    (ckpts / "last.ckpt" / "__0_0.distcp").write_bytes(b"shard")
    (ckpts / ".last.ckpt.0123456789ab.tmp").mkdir()  # a sharded save killed before its rename
    (ckpts / ".last.ckpt.0123456789ab.tmp" / "__0_0.distcp").write_bytes(b"partial")
    trainer = build_trainer(default_root_dir=str(tmp_path), max_steps=1, enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, accelerator="cpu")
    trainer.fit(BYOL(**TINY), ImageDataModule("digits", batch_size=16, num_workers=0, image_size=16), overwrite=True)
    assert (ckpts / "last.ckpt").is_file() and not list(ckpts.glob(".last.ckpt.*"))


def test_a_sharded_save_killed_between_its_renames_gets_the_previous_checkpoint_back(tmp_path):
    from zoo.train.checkpointing import restore_interrupted_renames

    ckpts = tmp_path / "checkpoints"
    (ckpts / ".last.ckpt.0123456789ab.old").mkdir(parents=True)  # last.ckpt moved aside, the new one not yet in
    (ckpts / ".last.ckpt.0123456789ab.old" / "__0_0.distcp").write_bytes(b"previous")
    (ckpts / ".last.ckpt.0123456789ab.tmp").mkdir()
    restore_interrupted_renames(str(ckpts))
    assert (ckpts / "last.ckpt" / "__0_0.distcp").read_bytes() == b"previous"


def test_a_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from zoo.train.checkpointing import failed_sharded_save
    from zoo.train.errors import RunError

    tmp = tmp_path / ".last.ckpt.0123456789ab.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"half")
    full = CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})
    err = failed_sharded_save(full, tmp, tmp_path / "last.ckpt", rank0=True)
    assert isinstance(err, RunError) and str(err).startswith(f"no space left on device writing {tmp_path / 'last.ckpt'}"
                                                             "; the previous checkpoint is kept")
    assert not tmp.exists()
    other = CheckpointException("save failed", {0: (ValueError("a bug"), None)})
    assert failed_sharded_save(other, tmp, tmp_path / "last.ckpt", rank0=True) is other  # not a disk problem


def test_a_requeue_with_another_model_is_one_line_naming_what_differs(tmp_path, capsys):
    from test_resume import zoo_fit

    from zoo.cli import main

    zoo_fit(tmp_path, "--trainer.max_steps", "2")
    code = main(["fit", "--config", str(tmp_path / "config0.yaml"), "--model.init_args.projection_dim", "24",
                 "--ckpt_path", "auto"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"zoo fit: error: the checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} "
                                        "holds another model than this config builds: projection_dim=24 "
                                        "(checkpoint: 16)"), err
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["version_0"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


_ARMED_RANK = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import time
from zoo.train.cluster import die_with_launcher
die_with_launcher()
print("armed", flush=True)
time.sleep(120)
'''], env={**os.environ, "LOCAL_RANK": "1", "ZOO_LAUNCHER_PID": str(os.getpid())}, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_lightning_started_dies_with_the_process_that_started_it():
    """kill -9 of rank 0 (the OOM killer's way) takes the local rank it launched with it, instead of leaving it in
    the rendezvous; a rank whose launcher is already gone stops in one line; other processes record their pid."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "ZOO_LAUNCHER_PID")}
    parent = subprocess.Popen([sys.executable, "-c", _ARMED_RANK], stdout=subprocess.PIPE, text=True, env=env)
    try:
        rank = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    for _ in range(200):
        try:
            os.kill(rank, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(rank, signal.SIGKILL)
        raise AssertionError("the local rank outlived the process that started it")
    late = subprocess.run([sys.executable, "-c", "from zoo.train.cluster import die_with_launcher; die_with_launcher()"],
                          env={**env, "LOCAL_RANK": "1", "ZOO_LAUNCHER_PID": "999999999"}, capture_output=True, text=True)
    assert late.returncode != 0 and "local rank 1: the process that started it (pid 999999999) is gone" in late.stderr
    own = subprocess.run([sys.executable, "-c", "import os; from zoo.train.cluster import die_with_launcher; "
                          "die_with_launcher(); print(os.environ['ZOO_LAUNCHER_PID'] == str(os.getpid()))"],
                         env=env, capture_output=True, text=True)
    assert own.stdout.strip() == "True", own.stderr
