"""The probe at scale, on small data: features on disk (sharded, memory-mapped, resumable, keyed by content), every
lr of the grid in one pass, kNN in one chunked pass for every k, `--out DIR` resume / refusal / `--overwrite`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import zoo
from zoo.data.images import digits_dataset
from zoo.eval.features import ImagePrepare, collate_indexed, extract_to_store
from zoo.eval.knn import knn_evaluate, knn_evaluate_store
from zoo.eval.linear import evaluate_heads, train_heads
from zoo.eval.probe import ProbeConfig, evaluate
from zoo.eval.probe_cli import main
from zoo.eval.store import Features, FeatureStore, dataset_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **kw) -> ProbeConfig:
    base = dict(epochs=3, batch_size=64, lr_grid=(0.4,), image_size=16, resize=16, num_workers=0,
                extract_batch_size=32, cache_dir=str(tmp_path / "cache"), progress=False)
    return ProbeConfig(**{**base, **kw})


def _features(n: int, d: int, seed: int, classes: int = 4) -> Features:
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g), torch.arange(n))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_store_round_trips_shards_in_each_dtype_memory_mapped(tmp_path, dtype):
    x = torch.randn(10, 3)
    store = FeatureStore(tmp_path / dtype, {"k": 1}, n=10, dtype=dtype, shard_rows=4)
    store.create(3)
    assert store.num_shards() == 3 and store.done() == []
    for i in range(3):
        a, b = store.shard_range(i)
        read = torch.ones(b - a, dtype=torch.bool)
        read[0] = i != 1  # row 4 was not read
        store.write_shard(i, x[a:b], torch.arange(a, b), read, [] if i != 1 else ["bad.jpg"])
    f = FeatureStore(tmp_path / dtype, {"k": 1}, n=10, dtype=dtype).load()
    want = x.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    assert f.feats.dtype == want.dtype and torch.equal(f.feats[f.rows], want[f.rows])  # exact: stored as cast
    assert f.rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9] and f.skipped == ["bad.jpg"]
    assert f.labels.tolist() == f.rows.tolist()
    # another key in the same folder: stale, never read as these features
    assert FeatureStore(tmp_path / dtype, {"k": 2}, n=10, dtype=dtype).stale is not None


class _Killable(nn.Module):
    """An encoder that raises after ``limit`` forward passes (a killed extraction)."""

    def __init__(self, inner: nn.Module, limit: int | None = None) -> None:
        super().__init__()
        self.inner, self.limit, self.calls, self.num_features = inner, limit, 0, inner.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise KeyboardInterrupt("killed")
        return self.inner(x)


def test_extraction_resumes_at_the_first_missing_shard_and_equals_one_pass(tmp_path):
    torch.manual_seed(0)
    ds = Subset(digits_dataset("train", 16), range(100))
    prepare = ImagePrepare(16, 16)
    loader = lambda d: torch.utils.data.DataLoader(  # noqa: E731
        zoo.eval.features.IndexedDataset(d), batch_size=10, collate_fn=collate_indexed)
    inner = zoo.create("convnet_tiny", widths=[8, 16, 16, 32])
    whole = FeatureStore(tmp_path / "whole", {"k": 0}, 100, "float32", shard_rows=30)
    extract_to_store(inner, ds, loader, prepare, torch.device("cpu"), whole, "x", progress=False)
    killed = _Killable(inner, limit=7)  # 7 batches of 10: shards 0 and 1 (rows 0-59) finished, shard 2 half done
    part = FeatureStore(tmp_path / "part", {"k": 0}, 100, "float32", shard_rows=30)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(killed, ds, loader, prepare, torch.device("cpu"), part, "x", progress=False)
    assert part.done() == [0, 1]
    again = _Killable(inner)
    part = FeatureStore(tmp_path / "part", {"k": 0}, 100, "float32", shard_rows=30)
    assert extract_to_store(again, ds, loader, prepare, torch.device("cpu"), part, "x", progress=False) == 2
    assert again.calls == 4  # only rows 60-99: four batches of 10
    a, b = whole.load(), part.load()
    assert torch.equal(a.feats, b.feats) and torch.equal(a.labels, b.labels)  # same batches, same kernels: bit-exact


def test_cache_is_keyed_by_content_swapped_class_folders_miss(tiny_imagefolder, tmp_path):
    from zoo.data.images import build_dataset

    enc = zoo.weights.load_backbone("random:convnet_tiny")
    cfg = _cfg(tmp_path, image_size=32, resize=36, epochs=2, batch_size=8, lr_grid=(0.4,))
    spec = f"imagefolder:{tiny_imagefolder}"
    r1 = evaluate(enc, build_dataset(spec, "train"), build_dataset(spec, "val"), "knn", cfg)
    r2 = evaluate(enc, build_dataset(spec, "train"), build_dataset(spec, "val"), "knn", cfg)
    assert not r1["counts"]["cache_hit"] and r2["counts"]["cache_hit"] and r1["top1"] == r2["top1"]
    val = tiny_imagefolder / "val"
    a, b = sorted(val.iterdir())[:2]
    a.rename(val / "tmp")
    b.rename(a)
    (val / "tmp").rename(b)  # same paths, same count, same bytes: only the labels of the files changed
    before = dataset_fingerprint(build_dataset(spec, "val"))
    r3 = evaluate(enc, build_dataset(spec, "train"), build_dataset(spec, "val"), "knn", cfg)
    assert not r3["counts"]["cache_hit"] and dataset_fingerprint(build_dataset(spec, "val")) == before
    with torch.no_grad():
        next(enc.parameters()).mul_(1.5)  # another encoder: another entry
    assert not evaluate(enc, build_dataset(spec, "train"), build_dataset(spec, "val"), "knn", cfg)["counts"][
        "cache_hit"]
    other = _cfg(tmp_path, image_size=24, resize=28, epochs=2, batch_size=8, lr_grid=(0.4,))  # another view
    assert not evaluate(enc, build_dataset(spec, "train"), build_dataset(spec, "val"), "knn", other)["counts"][
        "cache_hit"]


def test_heads_of_the_grid_in_one_pass_equal_separate_runs_exactly():
    train = _features(300, 12, 0)
    lrs = [0.05, 0.4, 3.2]
    together = train_heads(train, 4, lrs, epochs=3, batch_size=32, seed=5, feature_norm="batchnorm")
    for lr, head in zip(lrs, together):
        (alone,) = train_heads(train, 4, [lr], epochs=3, batch_size=32, seed=5, feature_norm="batchnorm")
        # each head runs the same ops on the same batch, in its own optimiser: bit-identical, not merely close
        assert all(torch.equal(p, q) for p, q in zip(head.state_dict().values(), alone.state_dict().values()))
    accs = evaluate_heads(together, _features(50, 12, 1))
    assert len(accs) == 3 and all(0 <= a[1] <= a[5] <= 100 for a in accs)


def test_knn_store_one_pass_for_every_k_equals_bruteforce():
    train, test = _features(230, 8, 2), _features(41, 8, 3)
    got = knn_evaluate_store(train, test, 4, ks=(1, 5, 20, 500), bank_chunk=37, query_chunk=16)
    want = knn_evaluate(train.feats, train.labels, test.feats, test.labels, 4, ks=(1, 5, 20, 500))
    assert got == want


def test_out_dir_resumes_refuses_another_probe_and_overwrites(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--backbone", "random:convnet_tiny", "--data", "digits", "--max_train", "200", "--max_test", "60",
            "--epochs", "2", "--lr_grid", "[0.1,0.4]", "--cache_dir", "null", "--progress", "false",
            "--shard_rows", "64", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "metrics.json").read_text())
    md = (out / "metrics.md").read_text()
    assert first["encoder_sha256"][:16] in md and "digits_linear.yaml" in md and "top-1 %" in md
    assert sorted(json.loads((out / "grid.json").read_text())["points"]) == ["0.1", "0.4"]
    capsys.readouterr()
    assert main(args) == 0  # the same probe again: resumed, nothing recomputed but the final head
    err = capsys.readouterr().err
    assert "resuming the probe in" in err and "2 point(s) already scored" in err
    assert json.loads((out / "metrics.json").read_text())["top1"] == first["top1"]
    assert main([*args, "--epochs", "3"]) == 2  # another probe into the same folder: refused in one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another probe" in err and "epochs" in err and "--overwrite" in err
    assert main([*args, "--epochs", "3", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["epochs"] == 3


def test_a_full_disk_keeps_finished_shards_and_says_so_in_one_line(tmp_path, monkeypatch):
    from zoo.eval import store as store_mod

    real = store_mod.os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(store_mod.os, "pwrite", pwrite)
    ds = Subset(digits_dataset("train", 16), range(100))
    cfg = _cfg(tmp_path, shard_rows=30, cache_dir=None)
    with pytest.raises(ValueError, match=r"No space left on device.*2 finished shards are kept.*rerun to resume"):
        evaluate(zoo.create("convnet_tiny", widths=[8, 16, 16, 32]), ds, ds, "knn", cfg, out=tmp_path / "o")
    assert FeatureStore(tmp_path / "o" / "features" / "train", {}, 100).done() == []  # other key: not read as ours
    assert sorted(p.name for p in (tmp_path / "o" / "features" / "train").glob("shard_*.json")) == [
        "shard_00000.json", "shard_00001.json"]


def test_fast_probe_peak_memory_stays_near_one_copy_of_the_features(tmp_path):
    """Measured in a fresh process: the fast probe's peak RSS over the model's baseline stays below 1.6 copies of
    the float32 features (the old in-RAM path peaked at ~2.1 copies: features cloned, subsets copied)."""
    code = f"""
import resource, sys, torch
from torch.utils.data import Dataset
sys.path.insert(0, {str(REPO)!r})
from zoo.eval.probe import ProbeConfig, evaluate
class Big(Dataset):
    classes = list(range(10))
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return torch.full((3, 8, 8), i % 251, dtype=torch.uint8), i % 10
class Wide(torch.nn.Module):
    num_features = 4096
    def __init__(self):
        super().__init__(); self.proj = torch.nn.Linear(3, 4096)
    def forward(self, x): return self.proj(x.mean((2, 3)))
cfg = ProbeConfig(epochs=1, batch_size=512, lr_grid=(0.1, 0.4), image_size=8, resize=8, num_workers=0,
                  extract_batch_size=500, cache_dir=None, progress=False, shard_rows=1000)
prep = lambda b, g: b["image"].float()
evaluate(Wide(), Big(200), Big(200), "fast", cfg, prepare_test=prep, out={str(tmp_path / "w")!r})  # imports, warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
evaluate(Wide(), Big(4000), Big(4000), "fast", cfg, prepare_test=prep, out={str(tmp_path / "m")!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024 / (2 * 4000 * 4096 * 4))
"""
    ratio = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 timeout=600).stdout.split()[-1])
    assert ratio < 1.6, ratio


@pytest.mark.parametrize("flag,value,named", [("--feature_dtype", "int8", "feature_dtype='int8'"),
                                              ("--grid_extensions", "-1", "grid_extensions=-1"),
                                              ("--shard_rows", "-3", "shard_rows=-3")])
def test_new_probe_settings_are_checked_in_one_line(flag, value, named, capsys):
    assert main(["--backbone", "random:convnet_tiny", "--data", "digits", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_a_best_lr_at_the_grid_edge_extends_the_grid_or_says_so(tmp_path):
    train, test = digits_dataset("train", 16), Subset(digits_dataset("val", 16), range(100))
    enc = zoo.create("convnet_tiny", widths=[8, 16, 16, 32])
    cfg = _cfg(tmp_path, lr_grid=(0.1, 0.4, 1.6), heldout=0.1, epochs=3, batch_size=256, feature_norm="batchnorm")
    said = evaluate(enc, train, test, "fast", cfg)
    grid = {float(k): v for k, v in said["heldout_top1"].items()}
    best = said["base_lr"]
    assert best in (0.1, 1.6), grid  # this setting puts the optimum at an edge (random features, short cosine)
    assert any("edge" in n or "at the top" in n or "at the bottom" in n for n in said["notices"])
    ext = evaluate(enc, train, test, "fast", _cfg(tmp_path, **{**cfg.__dict__, "grid_extensions": 2}))
    assert ext["grid_extended"] and ext["grid_extended"][0] == best * (2.0 if best == 1.6 else 0.5)
    assert set(ext["heldout_top1"]) == {str(x) for x in (0.1, 0.4, 1.6, *ext["grid_extended"])}
    assert any("extended it with" in n for n in ext["notices"])
