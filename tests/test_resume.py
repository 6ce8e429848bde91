"""Exact resume: a run interrupted at step N and resumed with ``--ckpt_path last`` ends bit-identical (CPU) to the
same run left alone for 2N steps: online and target weights, batch-norm statistics, optimizer and lr-scheduler
state, tau schedule position, augmentation draws, data order and the logged loss trace.

Every run goes through ``zoo.cli.run_cli`` (the real ``zoo fit``), with 4 batches per epoch and N = 5, so the
interruption lands in the middle of the second epoch and the resumed run crosses an epoch boundary.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import yaml

from zoo.cli import run_cli

STEPS, PER_EPOCH = 10, 4

CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": STEPS, "limit_train_batches": PER_EPOCH, "limit_val_batches": 0, "log_every_n_steps": 1,
                "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", "devices": 1},
    "model": {"class_path": "byol.BYOL", "init_args": {
        "encoder": "convnet_tiny", "encoder_overrides": {"widths": [8, 16, 16, 32]}, "image_size": 16,
        "projector_hidden": 32, "projection_dim": 16, "base_lr": 1.0, "tau_base": 0.9, "warmup_steps": 2}},
    "data": {"class_path": "zoo.data.ImageDataModule", "init_args": {
        "dataset": "digits", "image_size": 16, "batch_size": 16, "num_workers": 0}},
}


def zoo_fit(root: Path, *extra: str, callbacks: list[dict] | None = None):
    """``zoo fit --config <tiny BYOL> --trainer.default_root_dir root ...``; returns the CLI (model, trainer)."""
    cfg = {**CONFIG, "trainer": {**CONFIG["trainer"], "default_root_dir": str(root)}}
    if callbacks:
        cfg["trainer"]["callbacks"] = callbacks
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"config{len(list(root.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_cli(["fit", "--config", str(path), *extra])


def loss_trace(root: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (train/loss, train/tau, lr) from every CSV log version under ``root`` (a resumed run adds one)."""
    out: dict[int, dict[str, float]] = {}
    for f in sorted((root / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            step = int(row["step"])
            for k, v in row.items():
                if v not in ("", None) and k != "step":
                    out.setdefault(step, {})[k] = float(v)
    lr_key = next(k for k in next(iter(out.values())) if k.startswith("lr-"))
    return {s: (r["train/loss"], r["train/tau"], r[lr_key]) for s, r in out.items() if "train/loss" in r}


def last(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def assert_same_tree(a, b, where="checkpoint"):
    """Bit-exact equality of nested checkpoint content (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2N-step run: (final model state, last.ckpt, loss trace)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = zoo_fit(root)
    assert cli.trainer.global_step == STEPS
    state = {k: v.clone() for k, v in cli.model.state_dict().items()}
    return state, last(root), loss_trace(root)


def check_same_as_reference(reference, cli, root: Path) -> None:
    state, ckpt, trace = reference
    assert cli.trainer.global_step == STEPS
    # online, target, classifier weights and every batch-norm statistic, bit for bit
    assert_same_tree(state, cli.model.state_dict(), "model")
    resumed = last(root)
    assert_same_tree(ckpt["state_dict"], resumed["state_dict"], "state_dict")
    assert_same_tree(ckpt["optimizer_states"], resumed["optimizer_states"], "optimizer")  # LARS momentum buffers
    assert_same_tree(ckpt["lr_schedulers"], resumed["lr_schedulers"], "lr_scheduler")
    assert ckpt["global_step"] == resumed["global_step"] and ckpt["epoch"] == resumed["epoch"]
    # tau position: the schedule length and the step agree, so the next tau would too
    assert cli.model.total_steps == STEPS
    # the logged trace (loss, tau, lr) of interrupted + resumed equals the uninterrupted one, step by step
    got = loss_trace(root)
    assert sorted(got) == sorted(trace) and len(trace) == STEPS
    assert got == trace


def test_sigterm_mid_epoch_then_ckpt_path_last_is_bit_exact(reference, tmp_path):
    root = tmp_path / "preempted"
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException after our preemption checkpoint
        zoo_fit(root, callbacks=[{"class_path": "fault_callbacks.SigtermAt", "init_args": {"step": 5}}])
    saved = last(root)
    assert saved["global_step"] == 5
    # step 5 is batch 1 of epoch 1: the loader state says so, and the resume must skip exactly that batch
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "samples": 16, "global_batch": 16}]
    cli = zoo_fit(root, "--ckpt_path", "last")
    check_same_as_reference(reference, cli, root)


def test_sigterm_on_last_batch_of_an_epoch_resumes_at_next_epoch(reference, tmp_path):
    root = tmp_path / "preempted_at_epoch_end"
    with pytest.raises(SystemExit):
        zoo_fit(root, callbacks=[{"class_path": "fault_callbacks.SigtermAt", "init_args": {"step": PER_EPOCH}}])
    assert last(root)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "samples": 0, "global_batch": 16}]
    check_same_as_reference(reference, zoo_fit(root, "--ckpt_path", "last"), root)


def test_periodic_checkpoint_then_hard_crash_resumes_exactly(reference, tmp_path):
    """No graceful save: the run dies at step 7; the periodic checkpoint of step 6 (mid-epoch) is resumed.

    This is the path where the EMA used to be lost: periodic checkpoints are written in callbacks' batch-end hooks,
    which Lightning runs before the module's; BYOL now updates the target inside ``optimizer_step``.
    """
    root = tmp_path / "crashed"
    periodic = {"class_path": "zoo.train.trainer.RootCheckpoint", "init_args": {"save_last": True, "save_top_k": 0,
                                                                         "every_n_train_steps": 3}}
    with pytest.raises(ConnectionAbortedError):
        zoo_fit(root, callbacks=[{"class_path": "fault_callbacks.CrashAt", "init_args": {"step": 7}}, periodic])
    saved = last(root)
    assert saved["global_step"] == 6
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "samples": 32, "global_batch": 16}]
    cli = zoo_fit(root, "--ckpt_path", "last", callbacks=[periodic])
    state, ckpt, trace = reference
    assert_same_tree(state, cli.model.state_dict(), "model")
    # (this run's last.ckpt is from step 9, the last multiple of 3: compare the live optimizer with the reference's)
    assert_same_tree(ckpt["optimizer_states"][0], cli.trainer.optimizers[0].state_dict(), "optimizer")
    assert_same_tree(ckpt["lr_schedulers"][0], cli.trainer.lr_scheduler_configs[0].scheduler.state_dict(), "lr")
    # the crashed run never logged step 7; every step both runs logged agrees
    got = loss_trace(root)
    assert set(got) == set(trace) and all(got[s] == trace[s] for s in trace)


def test_sigterm_during_validation_then_resume_is_bit_exact(tmp_path):
    """Preempted while validating at the end of epoch 1: validation finishes, and the checkpoint is written at the
    end of the next training batch (not from ``on_exception`` in the middle of the loop)."""
    extra = ("--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0")
    ref = zoo_fit(tmp_path / "ref", *extra)
    root = tmp_path / "cut"
    with pytest.raises(SystemExit):
        zoo_fit(root, *extra, callbacks=[{"class_path": "fault_callbacks.SigtermInValidationAt",
                                          "init_args": {"step": 2 * PER_EPOCH}}])
    assert last(root)["global_step"] == 2 * PER_EPOCH + 1  # validation ends, the next training batch end saves
    cli = zoo_fit(root, *extra, "--ckpt_path", "last")
    assert cli.trainer.global_step == STEPS
    assert_same_tree(ref.model.state_dict(), cli.model.state_dict(), "model")
    assert loss_trace(root) == loss_trace(tmp_path / "ref")


@pytest.mark.parametrize("hook, step, saved_at", [
    ("on_train_batch_end", 5, 6),  # from a callback whose batch end runs after PreemptionCheckpoint's
    ("on_train_batch_start", 5, 6),  # between steps
    ("on_before_backward", 5, 6),  # inside a step
    ("on_before_optimizer_step", 4, 5),  # inside a step, on the last batch of an epoch
    ("on_train_start", 0, 1),  # before the first step
])
def test_sigterm_wherever_it_lands_resumes_bit_exact(reference, tmp_path, hook, step, saved_at):
    """The signal handler only records the signal; the checkpoint is written at the end of the next training batch,
    in PreemptionCheckpoint's hook, so the resumed run equals the uninterrupted one wherever the signal landed."""
    root = tmp_path / "cut"
    with pytest.raises(SystemExit) as exit_info:
        zoo_fit(root, callbacks=[{"class_path": "zoo.train.trainer.PreemptionCheckpoint"},
                                 {"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": hook, "step": step}}])
    assert exit_info.value.code == 143
    assert last(root)["global_step"] == saved_at
    check_same_as_reference(reference, zoo_fit(root, "--ckpt_path", "last"), root)


def test_sigterm_after_the_last_step_is_saved_at_the_end_of_training(reference, tmp_path):
    """Signalled during the last batch end, after PreemptionCheckpoint's hook: no training batch follows, the
    checkpoint is written at the end of training, and the run still exits 143; resuming it ends at once."""
    root = tmp_path / "cut"
    with pytest.raises(SystemExit) as exit_info:
        zoo_fit(root, callbacks=[{"class_path": "zoo.train.trainer.PreemptionCheckpoint"},
                                 {"class_path": "fault_callbacks.SigtermIn",
                                  "init_args": {"hook": "on_train_batch_end", "step": STEPS}}])
    assert exit_info.value.code == 143
    check_same_as_reference(reference, zoo_fit(root, "--ckpt_path", "last"), root)


# ---------------------------------------------------------------------------------------------------- lm.CausalLM
@pytest.mark.parametrize("budget", [{"max_steps": STEPS}, {"max_epochs": 3, "max_steps": -1}], ids=["steps", "epochs"])
def test_causal_lm_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path, budget):
    """Same guarantee for ``lm.CausalLM`` (AdamW state, warmup + cosine position, REINFORCE baseline buffers),
    through ``TextDataModule``'s shared resumable loader, with a step budget (the LM configs) and an epoch-based one
    (whose schedule length makes Lightning build the loader before the checkpoint is restored)."""
    total = budget.get("max_epochs", 0) * PER_EPOCH or STEPS
    lm_testutil = pytest.importorskip("lm_testutil")
    from lm.modules.causal_lm import CausalLM
    from zoo.data.text import TextDataModule

    import fault_callbacks

    corpus = lm_testutil.tiny_corpus(tmp_path / "corpus")

    def fit(root: Path, ckpt_path=None, callbacks=()):
        from zoo.train.trainer import build_trainer

        torch.manual_seed(0)
        data = TextDataModule(paths=str(corpus), seq_len=32, batch_size=8, val_fraction=0.25,
                             cache_dir=str(tmp_path / "cache"), progress=False)
        module = CausalLM(model_overrides=lm_testutil.TINY, lr=3e-3, warmup_steps=2, throughput_every=100)
        trainer = build_trainer(default_root_dir=str(root), accelerator="cpu", **budget,
                                limit_train_batches=PER_EPOCH, limit_val_batches=0, log_every_n_steps=1,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, trainer

    ref, _ = fit(tmp_path / "ref")
    ref_ckpt = last(tmp_path / "ref")
    with pytest.raises(SystemExit):
        fit(tmp_path / "cut", callbacks=[fault_callbacks.SigtermAt(5)])
    assert last(tmp_path / "cut")["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "samples": 8, "global_batch": 8}]
    resumed, trainer = fit(tmp_path / "cut", ckpt_path="last")
    assert trainer.global_step == total
    assert_same_tree(ref.state_dict(), resumed.state_dict(), "model")
    got = last(tmp_path / "cut")
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tree(ref_ckpt[key], got[key], key)

    def losses(root: Path) -> dict[int, float]:
        rows = [r for f in sorted((root / "logs").glob("version_*/metrics.csv")) for r in csv.DictReader(f.open())]
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    assert losses(tmp_path / "cut") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == total


# ---------------------------------------------------------------------------------------------------- changed geometry
@pytest.mark.parametrize("extra, message", [
    (("--data.init_args.batch_size", "8"), r"data\.batch_size is 8 but the checkpoint was saved with 16\. Its "
                                             r"position is 1 batches of 16 images on 1 device\(s\)"),
])
def test_resume_mid_epoch_with_another_batch_size_is_refused(tmp_path, capsys, extra, message):
    from zoo.cli import main

    root = tmp_path / "cut"
    with pytest.raises(SystemExit):
        zoo_fit(root, callbacks=[{"class_path": "fault_callbacks.SigtermAt", "init_args": {"step": 5}}])
    cfg = str(root / "config0.yaml")
    assert main(["fit", "--config", cfg, "--ckpt_path", "last", *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(r"zoo fit: error: cannot resume in the middle of epoch 1: " + message, err), err[-2000:]
    assert last(root)["global_step"] == 5  # nothing trained, nothing overwritten


def test_resume_with_another_device_count_is_refused(tmp_path):
    from zoo.train.trainer import ResumeGuard, UsageError

    class T:
        world_size = 2
        datamodule = type("DM", (), {"batch_size": 16})()

    ckpt = {ResumeGuard.KEY: {"batch_size": 16, "world_size": 1},
            "loops": {"fit_loop": {"state_dict": {"combined_loader": [{"epoch": 1, "batches": 3}]}}}}
    with pytest.raises(UsageError, match=r"this run has 2 device\(s\) but the checkpoint was saved with 1\. Its "
                                         r"position is 3 batches of 16 images on 1 device\(s\)"):
        ResumeGuard().on_load_checkpoint(T(), None, ckpt)
    ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"epoch": 2, "batches": 0}]
    ResumeGuard().on_load_checkpoint(T(), None, ckpt)  # at an epoch boundary: allowed


# ---------------------------------------------------------------------------------------------------- shipped configs
# The shipped digits configs AS THEY ARE (epoch-based: max_epochs, warmup in epochs), cut only through flags that keep
# the schedule kind: 2 epochs of 4 steps, 16 px, batch 16, validation every epoch (2 batches). The end-of-fit probe
# report is left out: it reads the trained weights after training and changes nothing in them (it takes ~30 s).
# An epoch-based schedule makes Lightning build the training loader (estimated_stepping_batches) BEFORE it restores
# the checkpoint's loop state: the case where the saved position used to be ignored (issue 27, item 7).
ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FLAGS = ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", str(PER_EPOCH),
                 "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "2",
                 "--data.init_args.image_size", "16", "--model.init_args.image_size", "16",
                 "--data.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false")
STEP_BUDGET = ("--trainer.max_epochs", "-1", "--trainer.max_steps", str(2 * PER_EPOCH))  # warmup stays in epochs


def shipped_fit(config: str, root: Path, *extra: str, callbacks=()):
    """``zoo fit --config configs/<config>`` with ``SHIPPED_FLAGS`` (the config's callbacks replaced by ``callbacks``)."""
    import json

    return run_cli(["fit", "--config", str(ROOT / "configs" / config), "--trainer.default_root_dir", str(root),
                    *SHIPPED_FLAGS, "--trainer.callbacks", json.dumps(list(callbacks)), *extra])


def live_state(cli) -> dict:
    """Everything training carries on: weights and buffers, optimizer state, lr-scheduler state, step and epoch."""
    t = cli.trainer
    return {"model": {k: v.detach().clone() for k, v in cli.model.state_dict().items()},
            "optimizers": [o.state_dict() for o in t.optimizers],
            "schedulers": [c.scheduler.state_dict() for c in t.lr_scheduler_configs],
            "step": t.global_step, "epoch": t.current_epoch}


@pytest.fixture(scope="module")
def shipped_refs(tmp_path_factory):
    """Uninterrupted runs, one per (config, schedule kind), made on first use."""
    cache: dict = {}

    def get(config: str, *extra: str) -> dict:
        key = (config, extra)
        if key not in cache:
            cli = shipped_fit(config, tmp_path_factory.mktemp("ref"), *extra)
            assert cli.trainer.global_step == 2 * PER_EPOCH
            cache[key] = live_state(cli)
        return cache[key]
    return get


SIGTERM_AT = "fault_callbacks.SigtermAt"
PLACEMENTS = [  # (callbacks of the preempted run, the step its checkpoint is saved at)
    ([{"class_path": SIGTERM_AT, "init_args": {"step": 6}}], 6),  # the case: mid-epoch
    ([{"class_path": SIGTERM_AT, "init_args": {"step": 5}}], 5),  # first batch of an epoch
    ([{"class_path": SIGTERM_AT, "init_args": {"step": 4}}], 4),  # last batch of an epoch
    ([{"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": "on_train_epoch_start", "step": 4}}], 5),
    ([{"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": "on_train_epoch_end", "step": 4}}], 5),
    ([{"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": "on_validation_batch_end", "step": 4}}], 5),
    ([{"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": "on_before_backward", "step": 5}}], 6),
    ([{"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": "on_save_checkpoint", "step": 3}},  # mid-save
      {"class_path": "zoo.train.trainer.RootCheckpoint", "init_args": {"save_last": True, "save_top_k": 0,
                                                                       "every_n_train_steps": 3}}], 4),
    ([{"class_path": "fault_callbacks.SigtermIn", "init_args": {"hook": "on_train_batch_end", "step": 8}}], 8),
]


@pytest.mark.parametrize("callbacks, saved_at", PLACEMENTS,
                         ids=["mid_epoch", "first_batch", "last_batch", "epoch_start", "epoch_end", "validation",
                              "inside_step", "during_checkpointing", "after_last_step"])
def test_shipped_byol_digits_config_resumes_bit_exact_wherever_sigterm_lands(shipped_refs, tmp_path, callbacks,
                                                                             saved_at):
    root = tmp_path / "cut"
    with pytest.raises(SystemExit) as exit_info:
        shipped_fit("byol/digits.yaml", root, callbacks=callbacks)
    assert exit_info.value.code == 143
    saved = last(root)
    assert saved["global_step"] == saved_at
    epoch, batches = divmod(saved_at, PER_EPOCH)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": epoch, "samples": batches * 16, "global_batch": 16}]
    cli = shipped_fit("byol/digits.yaml", root, "--ckpt_path", "last")
    assert cli.trainer.max_epochs == 2 and cli.trainer.max_steps == -1 and cli.model.hparams.warmup_epochs == 3
    assert_same_tree(shipped_refs("byol/digits.yaml"), live_state(cli), "resumed")


@pytest.mark.parametrize("config, extra", [("simsiam/digits.yaml", ()), ("byol/digits.yaml", STEP_BUDGET)],
                         ids=["simsiam_epochs", "byol_step_budget_warmup_epochs"])
def test_shipped_configs_resume_mid_epoch_bit_exact_for_every_schedule_kind(shipped_refs, tmp_path, config, extra):
    root = tmp_path / "cut"
    with pytest.raises(SystemExit):
        shipped_fit(config, root, *extra, callbacks=[{"class_path": SIGTERM_AT, "init_args": {"step": 6}}])
    assert last(root)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "samples": 32, "global_batch": 16}]
    cli = shipped_fit(config, root, *extra, "--ckpt_path", "last")
    assert_same_tree(shipped_refs(config, *extra), live_state(cli), "resumed")


def test_checkpoint_with_per_device_batch_position_still_resumes_exactly(shipped_refs, tmp_path):
    """A checkpoint written before positions counted global samples (``{"epoch", "batches"}``) is converted."""
    root = tmp_path / "cut"
    with pytest.raises(SystemExit):
        shipped_fit("byol/digits.yaml", root, callbacks=[{"class_path": SIGTERM_AT, "init_args": {"step": 6}}])
    ckpt = last(root)
    ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"epoch": 1, "batches": 2}]
    ckpt["zoo_data_geometry"] = {"batch_size": 16, "world_size": 1}
    torch.save(ckpt, root / "checkpoints" / "last.ckpt")
    cli = shipped_fit("byol/digits.yaml", root, "--ckpt_path", "last")
    assert_same_tree(shipped_refs("byol/digits.yaml"), live_state(cli), "resumed")


def test_another_global_batch_skips_to_the_next_epoch_only_when_asked(tmp_path, monkeypatch, capsys):
    """Another global batch cannot continue the epoch: refused in one line; with ZOO_RESUME_AT_NEXT_EPOCH=1 the rest
    of the epoch is skipped (said in one line) and training goes on from the first global batch of the next one."""
    import json

    from zoo.cli import main
    from zoo.data.loaders import EpochShuffleSampler

    root = tmp_path / "cut"
    data = ("--data", "fault_callbacks.IndexedDigits", "--trainer.max_epochs", "3")
    with pytest.raises(SystemExit):
        shipped_fit("byol/digits.yaml", root, *data, callbacks=[{"class_path": SIGTERM_AT, "init_args": {"step": 6}}])
    seen = {"class_path": "fault_callbacks.SeenSamples", "init_args": {"folder": str(tmp_path / "seen")}}
    argv = ["fit", "--config", str(ROOT / "configs" / "byol/digits.yaml"), "--trainer.default_root_dir", str(root),
            *SHIPPED_FLAGS, *data, "--trainer.callbacks", json.dumps([seen]), "--data.init_args.batch_size", "8",
            "--ckpt_path", "last"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume in the middle of epoch 1: data.batch_size is 8 but the checkpoint was saved with 16" in err
    assert "ZOO_RESUME_AT_NEXT_EPOCH=1" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("ZOO_RESUME_AT_NEXT_EPOCH", "1")
    with pytest.warns(UserWarning, match=r"epoch 1 cannot continue exactly.*start of epoch 2"):
        cli = run_cli(argv)
    assert cli.trainer.global_step == 6 + PER_EPOCH and cli.trainer.current_epoch == 3
    steps = json.loads((tmp_path / "seen" / "seen_rank0.json").read_text())
    order = EpochShuffleSampler(len(cli.datamodule.train_set), seed=0)
    order.set_epoch(2)
    expected = order.global_order()
    assert [s for s, _ in steps] == list(range(7, 7 + PER_EPOCH))
    assert [i for _, ids in steps for i in ids] == expected[:PER_EPOCH * 8]
