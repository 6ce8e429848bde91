"""The evaluator: kNN maths, fast == protocol on a centre-crop probe, CLI on a real-JPEG ImageFolder with corrupt
files and a flat official val folder, feature cache, language-model encoders, the pretraining kNN callback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

import zoo
from zoo.data.images import digits_dataset
from zoo.eval.probe import KNNProbeCallback, ProbeConfig, evaluate, heldout_split, load_config
from zoo.eval.probe_cli import main
from zoo.eval.features import MeanPooledLM, TokenPrepare
from zoo.eval.knn import knn_scores, topk_accuracy

REPO = Path(__file__).resolve().parents[1]
TINY = {"widths": [8, 16, 16, 32]}


def _cfg(tmp_path: Path, **kw) -> ProbeConfig:
    base = dict(epochs=3, batch_size=64, lr_grid=(0.4,), image_size=16, resize=16, num_workers=0,
                extract_batch_size=128, cache_dir=str(tmp_path / "cache"), progress=False, feature_norm="batchnorm")
    return ProbeConfig(**{**base, **kw})


def test_knn_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(50, 6, generator=g), torch.randn(7, 6, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    got = knn_scores(tr, y, te, 4, k=5, temperature=0.07, chunk=3)
    for i in range(7):
        sims = [float(F.cosine_similarity(te[i], tr[j], dim=0)) for j in range(50)]
        top = sorted(range(50), key=lambda j: -sims[j])[:5]
        want = torch.zeros(4)
        for j in top:
            want[y[j]] += torch.tensor(sims[j] / 0.07).exp()
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-3)
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2, 5)) == {1: 100 / 3, 2: 200 / 3, 5: 100.0}


def test_heldout_split_is_disjoint_and_seeded():
    tr, ho = heldout_split(100, 0.1, seed=3)
    assert len(ho) == 10 and len(tr) == 90 and not set(tr.tolist()) & set(ho.tolist())
    assert torch.equal(ho, heldout_split(100, 0.1, seed=3)[1]) and len(heldout_split(100, 30)[1]) == 30
    assert len(heldout_split(10, 10000)[1]) == 5  # never more than half
    # default: the paper's 10k images on ImageNet-sized sets, 10 % on small ones
    assert len(heldout_split(1000, None)[1]) == 100 and len(heldout_split(200_000, None)[1]) == 10000


def test_fast_matches_protocol_on_centre_crop_probe(tmp_path):
    """Same encoder, data, batches and schedule: fast mode's top-1 is within 0.5 points of protocol mode's."""
    enc = zoo.weights.load_backbone("random:convnet_tiny")
    train, test = Subset(digits_dataset("train", 16), range(256)), Subset(digits_dataset("val", 16), range(128))
    cfg = _cfg(tmp_path, train_augment="center_crop", lr_grid=(0.2, 0.8), heldout=0.25)
    fast = evaluate(enc, train, test, "fast", cfg, data_id="digits16")
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    proto = evaluate(enc, train, test, "protocol", cfg, out=tmp_path / "proto")
    assert abs(fast["top1"] - proto["top1"]) <= 0.5 and fast["top1"] > 40  # 10 classes: chance is 10
    assert fast["base_lr"] == proto["base_lr"] and fast["heldout_top1"].keys() == {"0.2", "0.8"}
    assert fast["counts"]["heldout"] == proto["counts"]["heldout"] == 64
    # frozen encoder, batch norm in inference mode: not one weight or running statistic moved
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def _corrupt(root: Path) -> tuple[Path, Path]:
    """A garbage file in train and a truncated JPEG in val."""
    cls = sorted((root / "train").iterdir())[0]
    garbage = cls / "broken.JPEG"
    garbage.write_bytes(b"not a jpeg at all" * 10)
    val_cls = sorted((root / "val").iterdir())[1]
    good = sorted(val_cls.iterdir())[0]
    cut = val_cls / "truncated.JPEG"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return garbage, cut


def _flat_val(root: Path, dest: Path) -> Path:
    """Same images with the official flat validation folder + Kaggle's LOC_val_solution.csv."""
    shutil.copytree(root / "train", dest / "train")
    (dest / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    files = sorted(p for d in sorted((root / "val").iterdir()) for p in sorted(d.iterdir()))
    for i, p in enumerate(files, 1):
        name = f"ILSVRC2012_val_{i:08d}"
        shutil.copy(p, dest / "val" / f"{name}.JPEG")
        rows.append(f"{name},{p.parent.name} 1 2 3 4")
    (dest / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return dest


def test_cli_imagefolder_counts_corrupt_files_and_reads_flat_val(tiny_imagefolder, tmp_path, capsys):
    garbage, cut = _corrupt(tiny_imagefolder)
    ckpt = tmp_path / "enc.safetensors"
    from zoo.weights.export import export_backbone

    export_backbone("random:convnet_tiny", ckpt)
    common = ["--backbone", str(ckpt), "--image-size", "32", "--resize", "36", "--num-workers", "0",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--epochs", "5", "--batch-size", "8",
              "--lr", "0.5", "--feature-norm", "batchnorm"]
    out = tmp_path / "knn"
    assert main(common + ["--data", f"imagefolder:{tiny_imagefolder}", "--mode", "knn", "--k", "3", "5",
                          "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "knn" and m["backbone"] == str(ckpt) and m["dataset"].startswith("imagefolder:")
    assert m["counts"]["train"] == 19 and m["counts"]["skipped_train"] == 1 and m["counts"]["skipped_test"] == 1
    assert {Path(p).name for p in m["counts"]["skipped_files"]} == {garbage.name, cut.name}
    assert set(m["knn"]) == {"3", "5"} and m["top1"] == m["knn"]["3"]["top1"] and 0 <= m["top1"] <= 100
    assert "top-1" in capsys.readouterr().out  # the rich summary table
    cut.unlink()
    flat = _flat_val(tiny_imagefolder, tmp_path / "flat")
    folder = f"imagefolder:{tiny_imagefolder}"
    assert main(common + ["--data", folder, "--mode", "fast", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--data", f"imagefolder:{flat}", "--mode", "fast", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert a["counts"]["test"] == b["counts"]["test"] == 9 and a["top1"] == b["top1"]  # labels via the wnid
    assert main(["--backbone", str(tmp_path / "none.ckpt"), "--data", "digits"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_protocol_with_augmentation_on_jpegs_counts_skips(tiny_imagefolder, tmp_path):
    garbage, cut = _corrupt(tiny_imagefolder)
    cfg = _cfg(tmp_path, image_size=32, resize=36, epochs=2, batch_size=8, feature_norm="none")
    from zoo.data.images import build_dataset

    enc = zoo.weights.load_backbone("random:convnet_tiny")
    res = evaluate(enc, build_dataset(f"imagefolder:{tiny_imagefolder}", "train"),
                   build_dataset(f"imagefolder:{tiny_imagefolder}", "val"), "protocol", cfg, out=tmp_path / "p")
    assert res["counts"]["skipped_train"] == 1 and res["counts"]["skipped_test"] == 1
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["num_classes"] == 3


class _CountingEncoder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.num_features = inner, 0, inner.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_feature_cache_is_reused_across_runs_and_lrs(tmp_path):
    enc = _CountingEncoder(zoo.create("convnet_tiny", **TINY))
    train, test = Subset(digits_dataset("train", 16), range(64)), Subset(digits_dataset("val", 16), range(32))
    r1 = evaluate(enc, train, test, "fast", _cfg(tmp_path, lr_grid=(0.1,)), data_id="d")
    calls = enc.calls
    r2 = evaluate(enc, train, test, "fast", _cfg(tmp_path, lr_grid=(0.1, 0.3)), data_id="d")
    r3 = evaluate(enc, train, test, "knn", _cfg(tmp_path, knn_k=(5,)), data_id="d")
    assert calls > 0 and enc.calls == calls and r2["counts"]["cache_hit"] and r3["counts"]["cache_hit"]
    assert not r1["counts"]["cache_hit"]
    with torch.no_grad():
        enc.inner.features[0].weight.mul_(2)  # new weights -> new cache entry
    evaluate(enc, train, test, "knn", _cfg(tmp_path, knn_k=(5,)), data_id="d")
    assert enc.calls > calls


class _TokenSet(Dataset):
    """Two classes of token sequences: class c uses tokens from its own half of a 40-token vocabulary."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        self.x = torch.randint(1, 20, (n, 12), generator=g) + 20 * self.y[:, None]
        self.x[:, 9:] = 0  # padding
        self.classes = ["a", "b"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_language_model_through_the_same_evaluator(tmp_path):
    from zoo.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    lm = Transformer(TransformerConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16))
    enc = MeanPooledLM(lm, pad_id=0)
    x = _TokenSet(4, 0).x
    with torch.no_grad():
        h = lm(x, return_hidden=True)[1]
        torch.testing.assert_close(enc(x), h[:, :9].mean(1))  # padding left out of the mean
    assert enc.num_features == 32
    cfg = _cfg(tmp_path, knn_k=(5,), epochs=10, lr_grid=(1.0,))
    for mode in ("knn", "fast", "protocol"):
        res = evaluate(enc, _TokenSet(64, 1), _TokenSet(32, 2), mode, cfg, prepare_train=TokenPrepare(),
                       prepare_test=TokenPrepare(), data_id="tokens", out=tmp_path / mode)
        assert res["top1"] >= 90, (mode, res["top1"])  # the two vocabularies are trivially separable


class _TinySSL(pl.LightningModule):
    """Stands in for byol.BYOL: an ``online_encoder`` trained by some loss."""

    def __init__(self) -> None:
        super().__init__()
        self.online_encoder = zoo.create("convnet_tiny", **TINY)

    def training_step(self, batch, i):
        x = batch[0].float() / 255
        return self.online_encoder(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_knn_callback_during_pretraining(tmp_path):
    train, val = digits_dataset("train", 16), digits_dataset("val", 16)
    cb = KNNProbeCallback(every_n_epochs=2, k=(5, 20), train_dataset=train, val_dataset=val, size=16, resize=16,
                          max_train=200, max_val=60)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train.images[:32]), batch_size=16)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=str(tmp_path))
    trainer.fit(_TinySSL(), loader)
    assert [h["epoch"] for h in cb.history] == [1, 3]  # every 2nd epoch
    assert 30 < float(trainer.callback_metrics["knn/top1"]) <= 100  # real digits: far above chance (10 %)
    assert "knn/top1_k20" in trainer.callback_metrics
    with pytest.raises(ValueError, match="every_n_epochs"):
        KNNProbeCallback(every_n_epochs=0, data="digits")


def test_probe_configs_load():
    cfg = load_config(REPO / "configs" / "probe" / "imagenet_linear.yaml")
    # BYOL linear evaluation on ImageNet: 80 epochs, batch 1024, 10k held-out, 224 crop of a 256 resize
    assert (cfg.epochs, cfg.batch_size, cfg.heldout, cfg.image_size, cfg.resize) == (80, 1024, 10000, 224, 256)
    assert cfg.train_augment == "random_resized_crop" and cfg.feature_norm == "none" and cfg.knn_k == (20, 200)
    digits = load_config(REPO / "configs" / "probe" / "digits_linear.yaml")
    assert digits.image_size == 32 and digits.heldout < 1
    with pytest.raises(ValueError, match="unknown probe config keys"):
        load_config(None, learning_rate=0.1)


def test_small_data_caps_workers_batch_and_heldout_and_says_so(tmp_path, monkeypatch, capsys):
    import zoo.eval.probe as probe

    monkeypatch.setattr(probe, "cpu_count", lambda: 1)
    train, test = Subset(digits_dataset("train", 16), range(40)), Subset(digits_dataset("val", 16), range(20))
    cfg = _cfg(tmp_path, num_workers=4, batch_size=1024, heldout=10000, lr_grid=(0.1, 0.4), epochs=2)
    res = evaluate(zoo.create("convnet_tiny", **TINY), train, test, "fast", cfg)
    err = capsys.readouterr().err
    for line in ("num_workers: 4 -> 1 (this process may use 1 CPUs)", "heldout: 10000 -> 20 (at most half of the 40",
                 "batch_size: 1024 -> 20 (only 20 training images besides the held-out ones"):
        assert f"probe: {line}" in err and any(n.startswith(line) for n in res["notices"]), line
    assert res["effective"] == {"batch_size": 20, "num_workers": 1} and res["counts"]["heldout"] == 20


def test_divergence_is_reported_with_its_likely_cause_and_the_flag(tmp_path, capsys):
    from zoo.eval.linear import divergence_advice

    train, test = Subset(digits_dataset("train", 16), range(128)), Subset(digits_dataset("val", 16), range(32))
    cfg = _cfg(tmp_path, feature_norm="none", lr_grid=(1e4, 1e5), epochs=2)
    res = evaluate(zoo.create("convnet_tiny", **TINY), train, test, "fast", cfg)
    assert set(res["diverged"]) == {"10000.0", "100000.0", "final"}
    assert "every lr of the grid and the final run diverged" in res["advice"]
    assert "--feature_norm batchnorm" in res["advice"] and "--lr_grid [" in res["advice"]
    assert f"probe: {res['advice']}" in capsys.readouterr().err
    bn = divergence_advice({"0.8": "loss 9 > 2 ln(4)"}, (0.1, 0.8), "batchnorm", 30)
    assert bn.startswith("base lr 0.8 diverged") and "--feature_norm" not in bn and "raise --epochs" in bn
    assert divergence_advice({}, (0.1,), "none", 5) is None
    healthy = divergence_advice({"1.6": "loss 5.02 > 2 ln(10)"}, (0.1, 0.4, 1.6), "batchnorm", 600, picked=0.1)
    assert "the picked base lr 0.1 did not, so the result stands" in healthy and "likely cause" not in healthy
    assert "likely cause" in divergence_advice({"0.1": "loss 9 > 2 ln(4)"}, (0.1, 0.8), "batchnorm", 600, picked=0.1)


def test_skipped_files_are_named_not_batch_indices_and_progress_lines_off_a_terminal(tiny_imagefolder, tmp_path,
                                                                                      capfd):
    garbage, cut = _corrupt(tiny_imagefolder)
    assert main(["--backbone", "random:convnet_tiny", "--data", f"imagefolder:{tiny_imagefolder}", "--image_size",
                 "32", "--resize", "36", "--num_workers", "0", "--cache_dir", "null", "--epochs", "2",
                 "--lr_grid", "[0.1,0.4]"]) == 0
    err = capfd.readouterr().err
    assert f"train features: skipped 1 undecodable images: {garbage}" in err
    assert f"test features: skipped 1 undecodable images: {cut}" in err and "batch indices" not in err
    # stderr is not a terminal here: whole progress lines with done/total and an ETA, for extraction and training
    assert "train features  1/1  100%" in err and "linear heads, base lr 0.1/0.4" in err and "ETA" in err


def test_no_file_of_the_product_refers_outside_the_repository():
    import subprocess

    hits = subprocess.run(["git", "grep", "-n", "-E", r"\.\./shared|/work/|shared/reference", "--", "configs",
                           "zoo", "augment", "byol", "simsiam", "README.md", "ARCHITECTURE.md", "bench/*.py"],
                          cwd=REPO, capture_output=True, text=True).stdout
    assert hits == "", hits
