"""Sharded LM training (FSDP2 through ``--trainer.strategy fsdp2``) on CPU with 2 gloo processes.

Each 2-process run is a real ``python -m zoo.cli fit`` (Lightning launches rank 1 by re-running the command, as under
``zoo fit --trainer.devices 2`` on a workstation). Sharded init draws other random numbers than a single-device
build (see lm.parallel.sharding.materialize), so the equivalence runs start both sides from the same saved weights.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lm_testutil import TINY, tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
B, STEPS = 4, 3
MODEL = {"model": "gemma2-tiny", "model_overrides": TINY, "lr": 0.01, "warmup_steps": 1, "weight_decay": 0.1}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (a collective under FSDP2; the plain state dict otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {k: v.detach().clone().cpu() for k, v in get_model_state_dict(model, options=opts).items()}


class DumpLM(pl.Callback):
    """Loads ``init`` (a full state dict) into the model before training; each rank writes its per-step losses, the
    final full weights and its local bytes of parameters, gradients and optimizer state to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str, init: str | None = None) -> None:
        self.folder, self.init = folder, init
        self.losses: list[float] = []
        self.bytes = {"params": 0, "grads": 0, "optimizer": 0}

    def on_train_start(self, trainer, module) -> None:
        # The buffers as the build made them (before any init file overwrites the persistent ones)
        self.buffers = {k: v.detach().clone().cpu() for k, v in module.model.named_buffers()}
        if self.init is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            state = torch.load(self.init, weights_only=True)
            set_model_state_dict(module.model, state, options=StateDictOptions(full_state_dict=True))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.bytes["grads"] = sum(_local(p.grad).nbytes for p in module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module) -> None:
        self.bytes["params"] = sum(_local(p).nbytes for p in module.model.parameters())
        self.bytes["optimizer"] = sum(_local(v).nbytes for s in trainer.optimizers[0].state.values()
                                      for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        dtensor = any(hasattr(p, "to_local") for p in module.model.parameters())
        torch.save({"losses": self.losses, "state": full_state(module.model), "bytes": self.bytes,
                    "sharded": dtensor, "step": trainer.global_step, "buffers": self.buffers},
                   Path(self.folder) / f"rank{trainer.global_rank}.pt")


def data_args(tmp: Path) -> dict:
    return {"paths": str(tiny_corpus(tmp / "corpus")), "seq_len": 32, "val_fraction": 0.25,
            "cache_dir": str(tmp / "cache"), "progress": False, "seed": 0}


def text_data(tmp: Path, batch: int) -> dict:
    return {"class_path": "zoo.data.text.TextDataModule", "init_args": {**data_args(tmp), "batch_size": batch}}


def run_sharded(tmp: Path, name: str, steps: int, callbacks: list[dict], model: dict | None = None,
                extra: tuple[str, ...] = (), every_n: int | None = None, expect: int = 0, devices: int = 2,
                module: str = "lm.CausalLM", data: dict | None = None, trainer_args: dict | None = None) -> Path:
    """``python -m zoo.cli fit`` on ``devices`` CPU processes with FSDP2 (per-device batch B unless ``data`` says
    otherwise); returns the run folder."""
    run = tmp / name
    run.mkdir(exist_ok=True)
    trainer = {"accelerator": "cpu", "devices": devices, "strategy": "fsdp2", "max_steps": steps,
               "limit_val_batches": 0, "enable_progress_bar": False, "logger": False, "enable_model_summary": False,
               "default_root_dir": str(run), "callbacks": callbacks, **(trainer_args or {})}
    if every_n:
        trainer["callbacks"] = callbacks + [{"class_path": "zoo.train.trainer.RootCheckpoint", "init_args": {
            "save_last": True, "save_top_k": 0, "every_n_train_steps": every_n}}]
    cfg = {"seed_everything": 0, "trainer": trainer,
           "model": {"class_path": module, "init_args": model or MODEL}, "data": data or text_data(tmp, B)}
    (run / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zoo.cli", "fit", "--config", str(run / "cfg.yaml"), *extra]
    done = subprocess.run(cmd, cwd=run, env=env, capture_output=True, timeout=600)
    assert done.returncode == expect, done.stderr.decode()[-4000:]
    return run


def dump(folder: str | Path, init: str | None = None) -> dict:
    return {"class_path": "test_fsdp.DumpLM", "init_args": {"folder": str(folder), "init": init}}


def run_single(tmp: Path, steps: int, init: Path, module: pl.LightningModule | None = None,
               datamodule: pl.LightningDataModule | None = None, **trainer_args) -> dict:
    """The reference: one process, the global batch (2 x B), same initial weights (a CausalLM on text by default)."""
    from lm import CausalLM
    from zoo.data.text import TextDataModule
    from zoo.train.trainer import build_trainer

    folder = tmp / "one"
    folder.mkdir(exist_ok=True)
    pl.seed_everything(0)
    trainer = build_trainer(default_root_dir=str(folder), accelerator="cpu", devices=1, max_steps=steps,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, enable_checkpointing=False,
                            callbacks=[DumpLM(str(folder), str(init))], **trainer_args)
    trainer.fit(module or CausalLM(**MODEL), datamodule or TextDataModule(**data_args(tmp), batch_size=2 * B))
    return torch.load(folder / "rank0.pt", weights_only=True)


def initial_weights(tmp: Path, model: dict = MODEL) -> Path:
    """A full state dict of ``model`` (MODEL's keys), written once, that every run in a comparison starts from."""
    import zoo

    torch.manual_seed(123)
    path = tmp / "init.pt"
    torch.save(zoo.create(model["model"], **model.get("model_overrides", {})).state_dict(), path)
    return path


def load_ranks(folder: Path) -> tuple[dict, dict]:
    return tuple(torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def assert_matches_one_process(one: dict, r0: dict, r1: dict, steps: int) -> None:
    """The 2-process loss trace and final weights equal one process's within 1e-5; both ranks hold the same weights."""
    assert r0["sharded"] and r1["sharded"] and not one["sharded"]  # FSDP2 really sharded the parameters
    global_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # equal token counts per rank
    assert len(global_loss) == steps
    assert global_loss == pytest.approx(one["losses"], abs=1e-5)
    for name, ref in one["state"].items():
        torch.testing.assert_close(r0["state"][name], ref, atol=1e-5, rtol=0, msg=name)
        assert torch.equal(r0["state"][name], r1["state"][name]), name


# ------------------------------------------------------------------------------------------------- fast, in-process
def test_fsdp2_strategy_is_registered_and_fsdp1_is_refused_with_the_fix():
    from lightning.pytorch.strategies import StrategyRegistry

    from lm import CausalLM
    from lm.parallel.sharding import FSDP2Strategy

    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU"):  # on CPU Lightning itself refuses FSDP1
        pl.Trainer(accelerator="cpu", devices=1, strategy="fsdp", logger=False)
    module = CausalLM(**MODEL)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())  # what a GPU run with strategy=fsdp would hand us
    with pytest.raises(ValueError, match=r"^--trainer.strategy fsdp is FSDP1.*use --trainer.strategy fsdp2"):
        module.configure_model()


def test_activation_checkpointing_keeps_names_and_gradients():
    from lm import CausalLM

    torch.manual_seed(0)
    plain = CausalLM(**MODEL)
    plain.configure_model()
    ckpt = CausalLM(**MODEL, activation_checkpointing=True)
    ckpt.configure_model()
    ckpt.model.load_state_dict(plain.model.state_dict())  # same names: checkpoints stay interchangeable
    tokens = torch.randint(0, 256, (2, 17))
    grads = []
    for m in (plain, ckpt):
        _, nll = m.run_model(tokens)
        nll.mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_consolidate_refuses_a_folder_that_is_not_a_sharded_checkpoint(tmp_path, capsys):
    from lm.cli.consolidate import main as consolidate_main
    from lm.parallel.sharding import consolidate

    with pytest.raises(ValueError, match="is not a sharded checkpoint folder"):
        consolidate(tmp_path, tmp_path / "x.ckpt")
    assert consolidate_main([str(tmp_path), "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo consolidate: error: ") and "is not a sharded checkpoint folder" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.ckpt").exists()


def test_a_buffer_without_initialiser_is_refused_not_left_as_garbage():
    import zoo
    from lm.parallel.sharding import materialize

    model = zoo.create("gemma2-tiny", device="meta", **TINY)
    model.extra = torch.nn.Module()
    model.extra.register_buffer("table", torch.empty(5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"buffer 'extra.table' \(Module\) has no initialiser.*reset_parameters"):
        materialize(model, "cpu", 0)


# ---------------------------------------------------------------------------------------------- 2 gloo processes
def test_fsdp_two_processes_match_one_process_and_checkpoint_consolidates(tmp_path, capsys):
    """3 steps of FSDP2 on 2 processes (batch B each) == 3 steps of one process (batch 2B) within 1e-5, from the
    same initial weights; the sharded last.ckpt folder consolidates into a file zoo.load_lm reads."""
    import zoo
    from lm.parallel.sharding import consolidate

    init = initial_weights(tmp_path)
    one = run_single(tmp_path, STEPS, init)  # also tokenises the corpus once, before the 2 processes read it
    run = run_sharded(tmp_path, "two", STEPS, [dump(tmp_path / "two", str(init))], every_n=STEPS)
    r0, r1 = load_ranks(run)
    assert_matches_one_process(one, r0, r1, STEPS)
    # each rank holds half of the parameters, gradients and both Adam moments
    full = sum(v.nbytes for v in one["state"].values())
    for r in (r0, r1):
        assert r["bytes"]["params"] == pytest.approx(full / 2, rel=0.02)
        assert r["bytes"]["grads"] == r["bytes"]["params"]
        assert r["bytes"]["optimizer"] == 2 * r["bytes"]["params"]
    (run / "bytes.json").write_text(json.dumps([r0["bytes"], r1["bytes"]]))

    folder = run / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    out = consolidate(folder, tmp_path / "single.ckpt")
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["zoo"]["model"] == "gemma2-tiny" and ckpt["global_step"] == STEPS
    assert ckpt["optimizer_states"][0]["state"]  # the Adam moments came along (a single-device resume needs them)
    model = zoo.load_lm(str(out))
    for name, value in model.state_dict().items():
        assert torch.equal(value, r0["state"][name]), name
    # the command line does the same and says where the file went and how to load it
    from lm.cli.consolidate import main as consolidate_main

    assert consolidate_main([str(folder), "--out", str(tmp_path / "cli.ckpt")]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said.startswith(f"wrote {tmp_path / 'cli.ckpt'} (") and "zoo.load_lm(" in said, said
    assert torch.load(tmp_path / "cli.ckpt", weights_only=True)["global_step"] == STEPS


@pytest.mark.slow
def test_fsdp_resume_after_sigterm_is_exact(tmp_path):
    """SIGTERM at step 3 of 6: the sharded preemption checkpoint resumes to the very weights and losses of the
    uninterrupted 2-process run."""
    init = initial_weights(tmp_path)
    from zoo.data.text import TextDataModule

    TextDataModule(**data_args(tmp_path), batch_size=B).prepare_data()  # tokenise once, before two readers
    ref = run_sharded(tmp_path, "ref", 6, [dump(tmp_path / "ref", str(init))])
    cut = [dump(tmp_path / "cut", str(init)), {"class_path": "fault_callbacks.SigtermAt", "init_args": {"step": 3}}]
    run = run_sharded(tmp_path, "cut", 6, cut, expect=128 + signal.SIGTERM)
    assert (run / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    (run / "cfg.yaml").unlink()
    run_sharded(tmp_path, "cut", 6, [dump(tmp_path / "cut")], extra=("--ckpt_path", "last"))
    for got, want in zip(load_ranks(run), load_ranks(ref)):
        assert got["step"] == 6
        assert got["losses"] == want["losses"][3:]
        for name, value in want["state"].items():
            assert torch.equal(got["state"][name], value), name


# lr 3e-3, not MODEL's 1e-2: an expert sees few tokens, so its small gradient carries relatively more summation-order
# noise, which Adam's normalisation turns into updates of lr x that noise (~1e-5 after 3 steps at 1e-2).
ROUTED = {**MODEL, "lr": 0.003, "model_overrides": {**TINY, "ffn": "routed", "n_experts": 4, "router": "hash"}}


def test_fsdp_trains_a_routed_model_like_one_process(tmp_path):
    """A hash-routed model (experts, token -> expert table) under FSDP2: the buffers a sharded build makes equal a
    normal build's on both ranks, and 3 steps on 2 processes == 3 steps of one process within 1e-5.

    Hash routing depends on the token alone; S-BASE balances (and RL-R samples) over each rank's own batch, so those
    match one process only in distribution, as under DDP."""
    import zoo
    from lm import CausalLM

    init = initial_weights(tmp_path, ROUTED)
    one = run_single(tmp_path, STEPS, init, module=CausalLM(**ROUTED))
    run = run_sharded(tmp_path, "two", STEPS, [dump(tmp_path / "two", str(init))], model=ROUTED)
    r0, r1 = load_ranks(run)
    built = dict(zoo.create("gemma2-tiny", **ROUTED["model_overrides"]).named_buffers())
    assert sorted(built) == ["layers.0.ffn.token_to_expert", "layers.1.ffn.token_to_expert"]
    for r in (r0, r1):
        assert r["buffers"].keys() == built.keys()
        for name, value in built.items():
            assert torch.equal(r["buffers"][name], value), name
    assert_matches_one_process(one, r0, r1, STEPS)


def resume_on_other_devices(tmp: Path, saved_on: int, resumed_on: int) -> None:
    """Save a sharded checkpoint on ``saved_on`` processes at an epoch boundary (step 3, epochs of 3 batches), resume
    it on ``resumed_on`` at the same global batch: the resumed losses and final weights equal one uninterrupted
    process's within 1e-5 (torch distributed checkpoint reshards weights and Adam state on load)."""
    from lm import CausalLM

    init = initial_weights(tmp)
    epoch, model = {"limit_train_batches": 3}, {**MODEL, "total_steps": 6}  # the first run's schedule is 6 steps too
    one = run_single(tmp, 6, init, module=CausalLM(**model), **epoch)
    batch = 2 * B
    first = run_sharded(tmp, "first", 3, [dump(tmp / "first", str(init))], model=model, devices=saved_on, every_n=3,
                        data=text_data(tmp, batch // saved_on), trainer_args=epoch)
    ckpt = first / "checkpoints" / "last.ckpt"
    assert len(list(ckpt.glob("*.distcp"))) == saved_on
    then = run_sharded(tmp, "then", 6, [dump(tmp / "then")], model=model, devices=resumed_on,
                       data=text_data(tmp, batch // resumed_on), trainer_args=epoch, extra=("--ckpt_path", str(ckpt)))
    for run, steps in ((first, slice(0, 3)), (then, slice(3, 6))):
        ranks = [torch.load(run / f"rank{r}.pt", weights_only=True) for r in range(saved_on if run is first
                                                                                  else resumed_on)]
        assert all(r["sharded"] for r in ranks)
        losses = [sum(x) / len(ranks) for x in zip(*(r["losses"] for r in ranks))]
        assert losses == pytest.approx(one["losses"][steps], abs=1e-5)
    assert ranks[0]["step"] == 6
    for name, ref in one["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], ref, atol=1e-5, rtol=0, msg=name)


def test_fsdp_checkpoint_of_two_processes_resumes_on_one(tmp_path):
    resume_on_other_devices(tmp_path, saved_on=2, resumed_on=1)


@pytest.mark.slow
def test_fsdp_checkpoint_of_one_process_resumes_on_two(tmp_path):
    resume_on_other_devices(tmp_path, saved_on=1, resumed_on=2)
