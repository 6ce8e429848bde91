"""Fault tolerance: preemption and Ctrl-C save, atomic checkpoint writes, NaN/Inf losses and weights, corrupt
images, and untrusted pickles. Tiny BYOL runs through the shared ``zoo.train.trainer.build_trainer``."""
from __future__ import annotations

import builtins
import os
import pickle
import re
import signal
import subprocess
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from byol import BYOL
from fault_callbacks import BreakBufferAt, InterruptAt, PoisonAt, SigtermAt
from zoo.data import ImageDataModule
from zoo.train.trainer import AtomicCheckpointIO, RootCheckpoint, build_trainer

TINY = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=16, projector_hidden=32,
            projection_dim=16, base_lr=1.0, tau_base=0.9, warmup_steps=2)
ROOT = Path(__file__).resolve().parents[1]


def fit(root: Path, steps: int = 6, callbacks=(), ckpt_path=None, data=None, every_n: int | None = 1, **model_kw):
    """A tiny BYOL fit on digits; a checkpoint every ``every_n`` steps (``last.ckpt``)."""
    model = BYOL(**{**TINY, **model_kw})
    cbs = list(callbacks) + ([RootCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=every_n)]
                             if every_n else [])
    trainer = build_trainer(default_root_dir=str(root), max_steps=steps, callbacks=cbs, enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    trainer.fit(model, data or ImageDataModule("digits", batch_size=16, num_workers=0, image_size=16),
                ckpt_path=ckpt_path)
    return model, trainer


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def all_finite(ckpt: dict) -> bool:
    tensors = list(ckpt["state_dict"].values())
    for opt in ckpt["optimizer_states"]:
        tensors += [v for st in opt["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------------------------------------------- preemption
def test_sigterm_writes_a_resumable_checkpoint_and_exits(tmp_path):
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:  # Lightning's SIGTERMException, after our save
        fit(tmp_path, steps=6, callbacks=[SigtermAt(3)], every_n=None)  # no periodic checkpoints at all
    assert exit_info.value.code == 128 + signal.SIGTERM  # non-zero, so a scheduler requeues the job
    assert signal.getsignal(signal.SIGTERM) == handler_before  # Lightning's handler is removed again
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    model, trainer = fit(tmp_path, steps=6, ckpt_path="last", every_n=None)
    assert trainer.global_step == 6


@pytest.mark.slow
def test_zoo_fit_process_killed_by_an_outside_sigterm_resumes(tmp_path):
    """The real thing: ``python -m zoo.cli fit`` in its own process gets SIGTERM from outside at step 3, saves, exits
    non-zero (so a scheduler requeues it), and ``--ckpt_path last`` finishes the run. Covered fast, in-process, by
    ``test_sigterm_writes_a_resumable_checkpoint_and_exits`` and tests/test_resume.py."""
    import subprocess
    import sys
    import time

    import yaml

    ready = tmp_path / "ready"
    cfg = {"seed_everything": 0,
           "trainer": {"max_steps": 6, "limit_val_batches": 0, "enable_progress_bar": False, "accelerator": "cpu",
                       "default_root_dir": str(tmp_path / "run"), "callbacks": [
                           {"class_path": "fault_callbacks.WaitForSignalAt",
                            "init_args": {"step": 3, "ready_file": str(ready)}}]},
           "model": {"class_path": "byol.BYOL", "init_args": {k: v for k, v in TINY.items()}},
           "data": {"class_path": "zoo.data.ImageDataModule",
                    "init_args": {"dataset": "digits", "image_size": 16, "batch_size": 16, "num_workers": 0}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "zoo.cli", "fit", "--config", str(tmp_path / "cfg.yaml")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "a preempted run must not report success"
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    cfg["trainer"]["callbacks"] = []
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run(cmd + ["--ckpt_path", "last"], cwd=tmp_path, env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_ctrl_c_mid_step_writes_a_resumable_checkpoint(tmp_path):
    with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into a graceful exit(1)
        fit(tmp_path, steps=6, callbacks=[InterruptAt(2)], every_n=None)
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2  # the interrupted step never updated anything
    _, trainer = fit(tmp_path, steps=6, ckpt_path="last", every_n=None)
    assert trainer.global_step == 6


def test_checkpoint_write_killed_midway_leaves_the_old_file_intact(tmp_path):
    """A real SIGKILL in the middle of ``torch.save`` (forked child): no cleanup code runs, yet last.ckpt survives."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(10.0)}, "global_step": 1}, path)
    good = path.read_bytes()
    pid = os.fork()
    if pid == 0:  # child: write a big checkpoint, die after the first megabyte
        real_save = torch.save

        def dying_save(obj, f, *args, **kwargs):
            class Killer:
                def __init__(self, f):
                    self.f, self.n = f, 0

                def write(self, b):
                    self.n += self.f.write(b)
                    if self.n > 1 << 20:
                        self.f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    return len(b)

                def flush(self):
                    self.f.flush()
            real_save(obj, Killer(f), *args, **kwargs)

        torch.save = dying_save
        try:
            io.save_checkpoint({"state_dict": {"w": torch.randn(4 << 20)}, "global_step": 2}, path)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == good
    assert load(path)["global_step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in leftovers)  # the partial temp file


def test_checkpoint_write_error_cleans_up_and_keeps_the_old_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match=rf"^no space left on device writing {path}; the previous checkpoint is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_disk_full_in_torch_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, capsys):
    """What a full disk looks like through ``torch.save``'s zip writer, through ``zoo fit``: one line, exit 1."""
    from test_resume import zoo_fit
    from zoo.cli import main

    zoo_fit(tmp_path, "--trainer.max_steps", "2")
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    assert main(["fit", "--config", str(tmp_path / "config0.yaml"), "--trainer.max_steps", "4", "--ckpt_path",
                 "last"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"zoo fit: error: no space left on device writing {tmp_path / 'checkpoints' / 'last.ckpt'}; "
                       "the previous checkpoint is kept. Free some space and resume with --ckpt_path last"), err[-5:]
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]


def test_leftovers_of_killed_writers_are_removed_at_the_next_start(tmp_path):
    from zoo.data.text import remove_dead_tmp_dirs

    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")
    fit(tmp_path, steps=1)
    assert not stale.exists()
    dead = _dead_pid()
    cache = tmp_path / "cache"
    (cache / f"key.tmp{dead}").mkdir(parents=True)
    (cache / f"key.tmp{os.getpid()}").mkdir()  # a live writer's folder stays
    remove_dead_tmp_dirs(cache)
    assert sorted(p.name for p in cache.iterdir()) == [f"key.tmp{os.getpid()}"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, value):
    poison = PoisonAt(3, value=value)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 3\b"):
        fit(tmp_path, steps=6, callbacks=[poison])
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and all_finite(ckpt)
    name = next(k for k in ckpt["state_dict"] if k.startswith("online_encoder"))
    assert torch.equal(ckpt["state_dict"][name], poison.saved)  # the weights from before the fault


class Snapshot(pl.Callback):
    """Everything the skipped step could have touched, at the start of steps ``step`` and ``step + 1``."""

    def __init__(self, step: int) -> None:
        self.step, self.states = step, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step in (self.step, self.step + 1):
            opt = trainer.optimizers[0].state_dict()["state"]
            self.states.append(({k: v.clone() for k, v in module.state_dict().items()},
                                {i: {k: v.clone() for k, v in st.items()} for i, st in opt.items()}))


def test_nonfinite_loss_skip_policy_counts_and_trains_on(tmp_path):
    poison, snap = PoisonAt(2, restore=True), Snapshot(2)
    model, trainer = fit(tmp_path, steps=5, callbacks=[snap, poison], nan_policy="skip")
    assert trainer.global_step == 5 and model.nonfinite_steps == 1
    (before, opt_before), (after, opt_after) = snap.states
    for name in before:  # weights, EMA target, batch-norm statistics and LARS momentum: untouched by the skip
        assert torch.equal(before[name], after[name]), name
    assert all(torch.equal(opt_before[i][k], opt_after[i][k]) for i in opt_before for k in opt_before[i])
    assert trainer.logged_metrics["train/nonfinite_steps"] == 1.0
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert all_finite(ckpt)
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/nonfinite_steps" in logged


def test_skip_policy_rolls_back_a_finite_loss_step_that_broke_a_buffer(tmp_path):
    """Finite loss, but the step leaves a batch-norm variance at Inf: the whole step (weights, EMA target, buffers,
    LARS state) is rolled back and counted, and every checkpoint after it is written."""
    snap = Snapshot(2)
    model, trainer = fit(tmp_path, steps=5, callbacks=[snap, BreakBufferAt(2)], nan_policy="skip")
    assert trainer.global_step == 5 and model.nonfinite_steps == 1
    (before, opt_before), (after, opt_after) = snap.states
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert opt_before.keys() == opt_after.keys()
    assert all(torch.equal(opt_before[i][k], opt_after[i][k]) for i in opt_before for k in opt_before[i])
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 5 and all_finite(ckpt)


def test_skip_policy_trains_on_through_a_huge_learning_rate(tmp_path):
    """base_lr 1e6: finite losses whose updates blow batch-norm statistics up; every such step is skipped."""
    model, trainer = fit(tmp_path, steps=4, nan_policy="skip", base_lr=1e6)
    assert trainer.global_step == 4 and model.nonfinite_steps >= 1
    assert trainer.logged_metrics["train/nonfinite_steps"] == float(model.nonfinite_steps)
    assert all_finite(load(tmp_path / "checkpoints" / "last.ckpt"))


def test_nan_weights_never_overwrite_the_last_good_checkpoint(tmp_path):
    """Weights that turn NaN after an update (finite loss on that step) are refused by the checkpoint writer."""
    with pytest.raises(FloatingPointError, match=r"refusing to write checkpoint .*online_encoder"):
        fit(tmp_path, steps=6, callbacks=[PoisonAt(4, at="end")])
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and all_finite(ckpt)


# ---------------------------------------------------------------------------------------------------- bad images
def _faulty_folder(root: Path) -> tuple[Path, list[str]]:
    """ImageNet layout of real digit JPEGs plus one of each fault; returns (root, names that must be skipped)."""
    from PIL import Image

    from conftest import WNIDS, make_imagefolder

    make_imagefolder(root, per_class=10, size=24)
    folder = root / "train" / WNIDS[0]
    good = next(folder.glob("*.JPEG"))
    rgb = Image.open(good).convert("RGB")
    (folder / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    (folder / "truncated.JPEG").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    rgb.convert("L").save(root / "train" / WNIDS[1] / "gray.JPEG", format="JPEG")
    rgb.convert("CMYK").save(root / "train" / WNIDS[1] / "cmyk.JPEG", format="JPEG")
    rgb.save(root / "train" / WNIDS[2] / "png_named.JPEG", format="PNG")
    return root, ["corrupt.JPEG", "empty.JPEG", "truncated.JPEG"]


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_corrupt_images_are_skipped_counted_and_logged_once_per_epoch(tmp_path, decode):
    root, bad = _faulty_folder(tmp_path / "imgs")
    # 30 good + 6 odd files = 36 = 3 batches of 12 with nothing dropped, so every file is met in every epoch
    data = ImageDataModule(f"imagefolder:{root}", batch_size=12, num_workers=0, decode=decode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, trainer = fit(tmp_path / "run", steps=6, data=data, every_n=None)
    assert trainer.global_step == 6 and trainer.current_epoch == 2  # trained to the end: 2 epochs of 3 steps
    reports = [str(w.message) for w in caught if "undecodable" in str(w.message)]
    assert len(reports) == 2, reports  # once per epoch
    for epoch, msg in enumerate(reports):
        assert msg.startswith(f"epoch {epoch}: skipped 3 undecodable images")
        named = sorted(Path(p.strip().rstrip(".")).name for p in msg.split(": ", 2)[2].split(","))
        assert named == bad  # each bad file named by its path; grayscale, CMYK and PNG-as-JPEG were decoded
    assert trainer.logged_metrics["data/skipped_images"] == 3.0


# ---------------------------------------------------------------------------------------------------- untrusted
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates a file (our proof that code ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _evil_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    marker = tmp_path / "pwned"
    sd = {"online_encoder.features.0.weight": torch.zeros(2)}
    files = {}
    for name in ("evil.ckpt", "evil.pth", "evil.pt"):
        torch.save({"state_dict": sd, "hyper_parameters": {"encoder": _Payload(marker)},
                    "pytorch-lightning_version": "2"}, tmp_path / name)
        files[name] = tmp_path / name
    with open(tmp_path / "evil.pkl", "wb") as f:  # an "official BYOL release" that is really a payload
        pickle.dump({"experiment_state": _Payload(marker)}, f, protocol=2)
    files["evil.pkl"] = tmp_path / "evil.pkl"
    assert not marker.exists()
    return marker, files


def test_every_loader_refuses_a_pickle_that_would_run_code(tmp_path):
    import zoo
    from zoo.weights.safe_load import load_state_dict_file, safe_torch_load

    marker, files = _evil_files(tmp_path)
    attempts = [
        lambda: AtomicCheckpointIO().load_checkpoint(files["evil.ckpt"]),  # the resume path (--ckpt_path)
        lambda: zoo.load_backbone(files["evil.ckpt"]),
        lambda: zoo.load_backbone(files["evil.pth"]),
        lambda: zoo.load_backbone(files["evil.pkl"]),  # restricted official-release unpickler
        lambda: safe_torch_load(files["evil.pt"]),
        lambda: load_state_dict_file(files["evil.pt"]),
    ]
    try:
        from lm.modules.causal_lm import load_lm

        attempts.append(lambda: load_lm(str(files["evil.ckpt"])))
    except ImportError:  # pragma: no cover - lm is optional for this test
        pass
    for attempt in attempts:
        with pytest.raises((pickle.UnpicklingError, ValueError)) as err:
            attempt()
        assert re.search(r"builtins|open|not allowed|weights_only|refus", str(err.value), re.I), str(err.value)
        assert not marker.exists(), "a loader executed pickled code"


def test_resume_from_an_untrusted_checkpoint_is_refused_before_training(tmp_path):
    marker, files = _evil_files(tmp_path)
    with pytest.raises(ValueError, match=r"references io\.open, which is not allowed"):
        fit(tmp_path / "run", steps=2, ckpt_path=str(files["evil.ckpt"]))
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_source():
    """Every ``torch.load`` passes ``weights_only=True``; every unpickler is a restricted subclass."""
    offenders = []
    for path in [*ROOT.glob("zoo/**/*.py"), *ROOT.glob("byol/**/*.py"), *ROOT.glob("lm/**/*.py"),
                 *ROOT.glob("augment/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth:  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[m.start(): end]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
        for m in re.finditer(r"pickle\.loads?\(|pickle\.Unpickler\((?!\))", text):
            offenders.append(f"{path.relative_to(ROOT)}: {text[m.start(): m.start() + 60]}")
        for m in re.finditer(r"class (\w+)\(pickle\.Unpickler\)", text):
            assert "def find_class" in text[m.end(): m.end() + 2000], f"{path}: {m.group(1)} lacks find_class"
    assert not offenders, offenders


def test_checkpoints_get_the_umask_permissions_not_owner_only(tmp_path):
    # mkstemp makes owner-only (0600) files; a checkpoint others in the group should read gets the umask's mode.
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644


def test_a_worker_death_raised_outside_the_loaders_next_names_the_file(tmp_path, tiny_imagefolder):
    """torch's SIGCHLD handler raises "DataLoader worker (pid(s) N) exited unexpectedly" wherever the main thread is
    (here: a callback after a step), not inside the loader's ``next()``: the trainer still names the file the dead
    worker was reading."""
    import lightning.pytorch as pl

    from zoo.data import ImageDataModule

    class WorkerDiesDuringTheStep(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            ds = trainer.datamodule.train_set
            while not hasattr(ds, "busy"):
                ds = ds.dataset
            ds.busy.table[5] = torch.tensor([4242, 2])  # worker 5 (pid 4242) was reading sample 2
            self.victim = ds.where(2)
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    dies = WorkerDiesDuringTheStep()
    data = ImageDataModule(f"imagefolder:{tiny_imagefolder}", batch_size=4, num_workers=0)
    with pytest.raises(RuntimeError, match="exited unexpectedly while reading") as err:
        fit(tmp_path, steps=2, callbacks=[dies], data=data, every_n=None)
    assert dies.victim in str(err.value) and "OOM killer" in str(err.value)
