"""DDP equivalence on CPU: 2 gloo processes with per-process batch B == 1 process with batch 2B (SyncBatchNorm),
to 1e-5 after k steps; the EMA target is identical on both ranks; the data shards and their resume are exact.

The equivalence holds with BYOL's random views too: every rank seeds the augmentation generator alike and draws its
rows of the global batch (``rows=(offset, total)``), so two processes draw the very views one process draws for the
same images. The other tests keep deterministic views (full-image crop, every random op off) through the public
``augment_overrides``, isolating what they check.
"""
from __future__ import annotations

import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from byol import BYOL
from fault_callbacks import PoisonAt
from zoo.data import ImageDataModule
from zoo.data.loaders import EpochShuffleSampler
from zoo.train.trainer import GlobalBatchNorm, build_trainer

STEPS, B = 3, 8
DETERMINISTIC_VIEWS = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0,
                       "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
TINY = dict(encoder="convnet_tiny", encoder_overrides={"widths": [8, 16, 16, 32]}, image_size=16, projector_hidden=32,
            projection_dim=16, base_lr=1.0, tau_base=0.9, warmup_steps=1, augment_overrides=DETERMINISTIC_VIEWS,
            num_classes=10)  # classifier built in __init__: a DDP child re-seeds the global RNG before setup()


class Dump(pl.Callback):
    """Each rank writes its losses (per step) and final state to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.losses = folder, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]) - float(trainer.callback_metrics["train/cls_loss"]))

    def on_train_end(self, trainer, module) -> None:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save({"losses": self.losses, "state": state, "nonfinite": getattr(module, "nonfinite_steps", 0),
                    "sync_bn": any(
            isinstance(m, (torch.nn.SyncBatchNorm, GlobalBatchNorm)) for m in module.modules())},
                   Path(self.folder) / f"rank{trainer.global_rank}.pt")


def _run(folder: Path, devices: int, batch: int, callbacks=(), steps: int = STEPS, ckpt_path=None, trainer_kw=None,
         **model_kw) -> None:
    folder.mkdir(exist_ok=True)
    pl.seed_everything(0)
    kw = {"enable_checkpointing": False, **(trainer_kw or {})}
    trainer = build_trainer(default_root_dir=str(folder), accelerator="cpu", devices=devices,
                            strategy="ddp_spawn" if devices > 1 else "auto", max_steps=steps, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[Dump(str(folder)), *callbacks], **kw)
    trainer.fit(BYOL(**{**TINY, **model_kw}), ImageDataModule("digits", batch_size=batch, num_workers=0, image_size=16),
                ckpt_path=ckpt_path)


@pytest.mark.parametrize("views", ["random", "deterministic"])
def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path, views):
    """``random``: BYOL's own views (crop, flip, colour, blur, solarize at 16 px), drawn as rows of the global batch."""
    kw = {"augment_overrides": {}} if views == "random" else {}
    _run(tmp_path / "one", devices=1, batch=2 * B, **kw)
    _run(tmp_path / "two", devices=2, batch=B, **kw)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["sync_bn"] and r1["sync_bn"] and not one["sync_bn"]  # DDP really ran with SyncBatchNorm
    # the global loss (mean of the two equal halves) equals the single-process loss, step by step
    global_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert len(global_loss) == STEPS
    assert global_loss == pytest.approx(one["losses"], abs=1e-5)
    for name, ref in one["state"].items():
        if not ref.is_floating_point():
            assert torch.equal(ref, r0["state"][name]), name
            continue
        # same weights (online, target, classifier) and batch-norm statistics as one process with batch 2B
        torch.testing.assert_close(r0["state"][name], ref, atol=1e-5, rtol=0, msg=name)
        # both ranks hold the very same model, the EMA target included
        assert torch.equal(r0["state"][name], r1["state"][name]), f"ranks disagree on {name}"
    assert any(not torch.equal(one["state"][k], BYOL(**TINY).state_dict()[k]) for k in one["state"]
               if k.startswith("target_"))  # the EMA did move the target


def test_ddp_resume_mid_epoch_is_exact_on_every_rank(tmp_path):
    """A 2-process run resumed from its step-5 checkpoint (mid-epoch: 4 batches per epoch) ends bit-identical to the
    same run left alone: each rank skips exactly the batches of its own shard that were already trained on."""
    from zoo.train.trainer import RootCheckpoint

    periodic = RootCheckpoint(every_n_train_steps=5, save_top_k=-1, filename="{step}")
    common = dict(devices=2, batch=B, steps=10, trainer_kw={"limit_train_batches": 4, "enable_checkpointing": True},
                  augment_overrides=None)  # real random views: the per-rank generators are restored too
    _run(tmp_path / "ref", callbacks=[periodic], **common)
    ckpt = tmp_path / "ref" / "checkpoints" / "step=5.ckpt"
    assert torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "samples": 2 * B, "global_batch": 2 * B}]
    _run(tmp_path / "resumed", ckpt_path=str(ckpt), **common)
    for rank in (0, 1):
        ref, got = (torch.load(tmp_path / d / f"rank{rank}.pt", weights_only=True) for d in ("ref", "resumed"))
        assert got["losses"] == ref["losses"][5:]  # rank-local losses of steps 6..10: same shard, same views
        for name, value in ref["state"].items():
            assert torch.equal(value, got["state"][name]), f"rank {rank}: {name}"


class PoisonOnRank1(PoisonAt):
    """A non-finite loss on one rank only (a bad batch there)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """``nan_policy: skip`` must skip on all ranks together: a rank skipping backward alone would hang the others."""
    def hang(signum, frame):
        raise TimeoutError("the ranks hung on a one-sided skip")

    previous = signal.signal(signal.SIGALRM, hang)  # a hang fails the test instead of blocking the suite
    signal.alarm(120)
    try:
        _run(tmp_path / "two", devices=2, batch=B, callbacks=[PoisonOnRank1(1, restore=True)], nan_policy="skip")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["nonfinite"] == r1["nonfinite"] == 1
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
        assert not value.is_floating_point() or bool(torch.isfinite(value).all()), name


def test_shards_partition_each_global_batch_and_resume_per_rank():
    n, batch, world = 103, 4, 2
    single = EpochShuffleSampler(n, seed=5, shuffle=True)
    shards = [EpochShuffleSampler(n, seed=5, shuffle=True, num_replicas=world, rank=r) for r in range(world)]
    for s in (single, *shards):
        s.set_epoch(3)
    one = list(single)
    per_rank = [list(s) for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(shards[0]) == 52  # padded to a multiple of the world size
    for k in range(n // (batch * world)):
        got = sorted(i for part in per_rank for i in part[k * batch:(k + 1) * batch])
        assert got == sorted(one[k * batch * world:(k + 1) * batch * world])  # step k sees the same images
    # resuming after 5 batches: each rank continues its own shard exactly where it stopped
    for s, full in zip(shards, per_rank):
        s.skip_next(5 * batch)
        assert list(s) == full[5 * batch:]
        assert list(s) == full  # the skip applies to one iteration only
    other = EpochShuffleSampler(n, seed=5, shuffle=True)
    other.set_epoch(4)
    assert list(other) != one  # a new permutation each epoch, which Lightning selects through set_epoch


def test_lightning_keeps_our_sampler_under_ddp(tmp_path):
    """Lightning would wrap a non-distributed sampler in its own (reshuffling, never forwarding set_epoch)."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
    from torch.utils.data import DataLoader, RandomSampler

    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=2, strategy="ddp_fork",
                            logger=False)
    connector = _DataConnector(trainer)
    assert connector._requires_distributed_sampler(DataLoader(range(10), sampler=RandomSampler(range(10))))
    assert not connector._requires_distributed_sampler(DataLoader(range(10), sampler=EpochShuffleSampler(10)))


def test_each_global_step_is_the_same_block_of_the_order_on_any_world_size():
    """Step k of any (world W, per-device batch b) with W*b = G sees exactly order[k*G:(k+1)*G] (ranks in order), and
    skipping S global samples continues every rank at global sample S: the position a checkpoint keeps."""
    n, G = 103, 8
    single = EpochShuffleSampler(n, seed=2, batch_size=G, drop_last=True)
    single.set_epoch(1)
    order = single.global_order()
    for world in (1, 2, 4, 8):
        b = G // world
        shards = [EpochShuffleSampler(n, seed=2, num_replicas=world, rank=r, batch_size=b, drop_last=True)
                  for r in range(world)]
        for s in shards:
            s.set_epoch(1)
        parts = [list(s) for s in shards]
        assert all(len(p) == n // G * b == len(s) for p, s in zip(parts, shards))  # the same steps on every world
        for k in range(n // G):
            assert [i for p in parts for i in p[k * b:(k + 1) * b]] == order[k * G:(k + 1) * G]
        for s in shards:
            s.skip_samples(5 * G)
        assert sorted(i for s in shards for i in s) == sorted(order[5 * G:n // G * G])
        with pytest.raises(ValueError, match="not a whole number of global batches"):
            shards[0].skip_samples(G + 1)
    # without drop_last the partial last global batch is split evenly (padded by wrapping, at most world - 1 repeats)
    tail = [EpochShuffleSampler(n, seed=2, num_replicas=2, rank=r, batch_size=4) for r in range(2)]
    for s in tail:
        s.set_epoch(1)
    got = [i for s in tail for i in s]
    assert sorted(set(got)) == sorted(order) and len(got) == n + 1
    # mark_padding: the repeats are PAD places instead, dropped by the probe's collate: each image exactly once,
    # and every rank still has as many batches as the others (a share may end in an empty batch)
    from zoo.eval.features import IndexedDataset, collate_indexed

    for world, b in ((2, 4), (3, 4), (4, 1)):
        marked = [EpochShuffleSampler(n, seed=2, num_replicas=world, rank=r, batch_size=b, mark_padding=True)
                  for r in range(world)]
        shares = [list(s) for s in marked]
        assert len({len(x) for x in shares}) == 1
        assert sorted(i for x in shares for i in x if i >= 0) == list(range(n))
        data = IndexedDataset([(torch.zeros(3, 2, 2), 7, f"f{i}") for i in range(n)])
        last = collate_indexed([data[i] for i in shares[-1][-b:]])
        assert last["index"].tolist() == [i for i in shares[-1][-b:] if i >= 0] and last["skipped"] == []


def _elastic_run(folder: Path, devices: int, steps_folder: Path, ckpt_path=None) -> None:
    from fault_callbacks import IndexedDigits, SeenSamples
    from zoo.train.trainer import RootCheckpoint

    pl.seed_everything(0)
    trainer = build_trainer(default_root_dir=str(folder), accelerator="cpu", devices=devices,
                            strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=2, logger=False,
                            limit_train_batches=4, limit_val_batches=0, enable_progress_bar=False,
                            enable_model_summary=False,
                            callbacks=[SeenSamples(str(steps_folder)),
                                       RootCheckpoint(every_n_train_steps=5, save_top_k=-1, filename="{step}")])
    trainer.fit(BYOL(**TINY),
                IndexedDigits("digits", batch_size=2 * B // devices, num_workers=0, image_size=16),
                ckpt_path=ckpt_path)


def _steps(folder: Path) -> dict[int, list[int]]:
    """global step -> the sample indices all ranks trained on at that step, in rank order."""
    import json

    out: dict[int, list[int]] = {}
    for f in sorted(folder.glob("seen_rank*.json")):
        for step, ids in json.loads(f.read_text()):
            out.setdefault(step, []).extend(ids)
    return out


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_mid_epoch_checkpoint_resumes_on_another_device_count_from_the_same_global_sample(tmp_path, before, after):
    """An epoch-based run saved after step 5 (global batch 16, 4 steps an epoch: 1 step into epoch 1) on ``before``
    processes resumes on ``after`` with the same global batch, and each of its steps trains on exactly the global
    samples the uninterrupted run trains on at that step: none skipped, none seen twice."""
    from zoo.data.loaders import EpochShuffleSampler

    G = 2 * B
    _elastic_run(tmp_path / "ref", before, tmp_path / "ref_seen")
    _elastic_run(tmp_path / "resumed", after, tmp_path / "resumed_seen",
                 ckpt_path=str(tmp_path / "ref" / "checkpoints" / "step=5.ckpt"))
    ref, resumed = _steps(tmp_path / "ref_seen"), _steps(tmp_path / "resumed_seen")
    n = len(_train_set())
    order = EpochShuffleSampler(n, seed=0, batch_size=G, drop_last=True)
    for step in range(1, 9):
        epoch, k = divmod(step - 1, 4)
        order.set_epoch(epoch)
        assert ref[step] == order.global_order()[k * G:(k + 1) * G], step  # the global batch, in rank order
    assert sorted(resumed) == [6, 7, 8]
    assert all(resumed[s] == ref[s] for s in resumed)
    epoch1 = [i for s in range(5, 9) for i in (ref[5] if s == 5 else resumed[s])]
    assert len(set(epoch1)) == len(epoch1) == 4 * G  # no sample of epoch 1 twice


def _train_set():
    """The digits training split (the sampler permutes its indices)."""
    from fault_callbacks import IndexedDigits

    dm = IndexedDigits("digits", batch_size=B, num_workers=0, image_size=16)
    dm.check_data()
    return dm.train_set
