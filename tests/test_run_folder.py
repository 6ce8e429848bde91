"""One output folder, one run: a live run holds a lock, a finished or interrupted one is resumed (``--ckpt_path last``)
or explicitly replaced (``--overwrite``), never silently overwritten; leftovers of killed writers are removed."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from test_faults import fit, load
from test_resume import last, zoo_fit
from zoo.train.trainer import LOCK_NAME, UsageError


def test_a_live_run_holds_the_folder_and_a_second_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('ok', flush=True)\n"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(UsageError, match=rf"another run \(pid {holder.pid}\) is writing to {tmp_path}; wait"):
            fit(tmp_path, steps=1)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "checkpoints").exists()
    # the holder is dead: its lock file (pid still inside) is taken over
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)
    _, trainer = fit(tmp_path, steps=1)
    assert trainer.global_step == 1 and not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_a_fresh_run_over_a_finished_one_is_refused_with_the_choices(tmp_path):
    fit(tmp_path, steps=2)
    with pytest.raises(UsageError, match=r"already holds a run .*last\.ckpt\); resume it with --ckpt_path last, or "
                                         r"start a new run with another --trainer\.default_root_dir or over this one "
                                         r"with --overwrite"):
        fit(tmp_path, steps=3)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    _, trainer = fit(tmp_path, steps=3, ckpt_path="last")  # resuming is allowed
    assert trainer.global_step == 3


def test_zoo_fit_overwrite_starts_fresh(tmp_path, capsys):
    from zoo.cli import main

    zoo_fit(tmp_path, "--trainer.max_steps", "2")
    assert last(tmp_path)["global_step"] == 2
    cfg = str(tmp_path / "config0.yaml")
    assert main(["fit", "--config", cfg, "--trainer.max_steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    cli = zoo_fit(tmp_path, "--trainer.max_steps", "1", "--overwrite")
    assert cli.trainer.global_step == 1 and last(tmp_path)["global_step"] == 1


def test_ckpt_path_last_without_a_checkpoint_says_so(tmp_path, capsys):
    from zoo.cli import main

    zoo_fit(tmp_path / "cfg", "--trainer.max_steps", "0", "--trainer.enable_checkpointing", "false")
    code = main(["fit", "--config", str(tmp_path / "cfg" / "config0.yaml"), "--trainer.default_root_dir",
                 str(tmp_path / "empty"), "--ckpt_path", "last"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"zoo fit: error: --ckpt_path last: there is no checkpoint in {tmp_path / 'empty'}"
                                 "/checkpoints to resume; to start a fresh run leave out --ckpt_path (or check "
                                 "--trainer.default_root_dir)"), err
    assert "save_last" not in err and not (tmp_path / "empty" / "logs").exists()
