"""Protocol mode at scale, on small data: every head of the lr grid (and every final head) in one pass of the frozen
encoder, equal to a pass per lr; a protocol run killed mid-epoch by a signal resumes from its checkpoint to the very
same figures; bf16 autocast of the frozen forward is chosen on CUDA only; device-side decoding names bad files."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import zoo
import zoo.eval.protocol as protocol
from zoo.data.images import digits_dataset
from zoo.eval.features import ImagePrepare, decode_on_device, frozen_autocast
from zoo.eval.probe import ProbeConfig, evaluate

TINY = {"widths": [8, 16, 16, 32]}


def _cfg(tmp_path: Path, **kw) -> ProbeConfig:
    base = dict(epochs=2, batch_size=32, lr_grid=(0.1, 0.8), heldout=0.25, image_size=16, resize=16, num_workers=0,
                extract_batch_size=64, cache_dir=None, progress=False, feature_norm="batchnorm")
    return ProbeConfig(**{**base, **kw})


def _data(n_train: int = 96, n_test: int = 40):
    return Subset(digits_dataset("train", 16), range(n_train)), Subset(digits_dataset("val", 16), range(n_test))


def test_one_pass_of_the_grid_and_finals_equals_a_pass_per_lr(tmp_path, monkeypatch):
    """One frozen forward per batch shared by 2 grid + 2 final heads: each head bit-equal to its lr trained alone
    (same batches, same augmented views, its own param group), and the frozen forward ran once per batch."""
    passes: list[dict] = []

    def capture(cfg, points, notices, run_pass):
        passes.append(run_pass([0.1, 0.8], [0.1, 0.8]))
        for lr in (0.1, 0.8):
            passes.append(run_pass([lr], [lr]))
        return {"top1": 0.0, "top5": 0.0, "base_lr": 0.1, "heldout_top1": {}, "diverged": {}, "grid_extended": []}

    monkeypatch.setattr(protocol, "search_and_final", capture)
    enc = zoo.create("convnet_tiny", **TINY)
    calls = []
    enc.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    train, test = _data()
    evaluate(enc, train, test, "protocol", _cfg(tmp_path), out=tmp_path / "p")
    together, alone = passes[0], passes[1:]
    for k, lr in enumerate((0.1, 0.8)):
        for part, idx in (("grid", k), ("final", 2 + k)):
            one = alone[k]["heads"][0 if part == "grid" else 1].state_dict()
            both = together["heads"][idx].state_dict()
            assert all(torch.equal(both[n], one[n]) for n in one), (lr, part)
        assert together["grid"][lr] == alone[k]["grid"][lr] and together["final"][lr] == alone[k]["final"][lr]
    # 96 images, batch 32, 2 epochs = 6 training forwards per pass (+ 1 held-out + 1 test batch of scoring)
    train_forwards = [c for c in calls if c == 32]
    assert len(train_forwards) == 3 * 6, calls


class _SignalAt:
    """The train view, sending this process ``signum`` when it prepares the ``at``-th training batch."""

    def __init__(self, view: ImagePrepare, at: int, signum: int) -> None:
        self.view, self.at, self.signum, self.calls = view, at, signum, 0
        self.collate = view.collate

    def __call__(self, batch, generator=None):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return self.view(batch, generator)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_protocol_run_killed_mid_epoch_resumes_to_the_same_figures(tmp_path, signum, code, capsys):
    train, test = _data()
    cfg = _cfg(tmp_path, epochs=3)
    enc = zoo.create("convnet_tiny", **TINY)
    view = ImagePrepare(16, 16, train=True)
    straight = evaluate(enc, train, test, "protocol", cfg, prepare_train=view, out=tmp_path / "straight")
    out = tmp_path / "killed"
    # batch 5 of 9 (epoch 1 of 3, mid-epoch): the signal lands inside the step, the save follows at its batch end
    with pytest.raises(SystemExit) as stopped:
        evaluate(enc, train, test, "protocol", cfg, prepare_train=_SignalAt(view, 5, signum), out=out)
    assert stopped.value.code == code
    ckpts = list(out.glob("protocol_pass_*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1
    from zoo.weights.safe_load import safe_torch_load

    saved = safe_torch_load(ckpts[0])
    assert saved["global_step"] == 5 and saved["epoch"] == 1  # mid-epoch: 5 of 3 x 3 steps
    assert not any(k.startswith("encoder.") for k in saved["state_dict"])  # the frozen encoder is not copied
    capsys.readouterr()
    resumed = evaluate(enc, train, test, "protocol", cfg, prepare_train=view, out=out)
    err = capsys.readouterr().err
    assert "resuming the protocol pass of base lr 0.1/0.8 from" in err and "epoch 1, step 5" in err
    for key in ("top1", "top5", "base_lr", "heldout_top1"):
        assert resumed[key] == straight[key], key  # bit-exact on CPU: same views, batches, heads and schedule
    assert not list(out.glob("protocol_pass_*"))  # a finished pass's checkpoints are spent


def test_bf16_autocast_of_the_frozen_forward_is_chosen_on_cuda_only():
    for precision in ("auto", "bf16-mixed", "32-true"):
        assert frozen_autocast("cpu", precision) is False  # the CPU path is fp32 whatever the setting
    assert frozen_autocast("cuda", "auto") and frozen_autocast(torch.device("cuda:0"), "bf16-mixed")
    assert not frozen_autocast("cuda", "32-true")
    with pytest.raises(ValueError, match="precision="):
        ProbeConfig(precision="fp8")


def test_raw_bytes_are_decoded_on_the_device_and_bad_files_named(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(buf, format="JPEG")
    good = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"not an image at all" * 4), dtype=torch.uint8)
    batch = {"image": [good, bad, good], "label": torch.tensor([1, 2, 3]), "index": torch.tensor([7, 8, 9]),
             "path": ["a.jpg", "b.jpg", "c.jpg"], "skipped": ["z.jpg"]}
    out = decode_on_device(batch, torch.device("cpu"))
    assert [tuple(x.shape) for x in out["image"]] == [(3, 12, 20), (3, 12, 20)] and out["image"][0].dtype == torch.uint8
    assert out["label"].tolist() == [1, 3] and out["index"].tolist() == [7, 9]
    assert out["skipped"] == ["z.jpg", "b.jpg"] and out["path"] == ["a.jpg", "c.jpg"]
    plain = {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "label": torch.tensor([0, 1])}
    assert decode_on_device(plain, torch.device("cpu")) is plain  # decoded images pass through untouched


def test_device_decoded_folders_probe_like_worker_decoded_ones(tiny_imagefolder, tmp_path):
    """The GPU path's data (raw bytes, decoded after transfer) run on the CPU: the same features and kNN figures as
    decoding in the loader, and the protocol pass trains on them, a corrupt file named once per split."""
    from zoo.data.images import build_dataset

    bad = sorted((tiny_imagefolder / "train").iterdir())[0] / "broken.JPEG"
    bad.write_bytes(b"not a jpeg" * 20)
    enc = zoo.create("convnet_tiny", **TINY)
    spec = f"imagefolder:{tiny_imagefolder}"
    cfg = _cfg(tmp_path, image_size=32, resize=36, batch_size=8, lr_grid=(0.4,), knn_k=(3,))
    res = {d: evaluate(enc, build_dataset(spec, "train", decode=d), build_dataset(spec, "val", decode=d), "knn", cfg)
           for d in ("worker", "device")}
    assert res["worker"]["knn"] == res["device"]["knn"]
    assert res["device"]["counts"]["skipped_files"] == [str(bad)] == res["worker"]["counts"]["skipped_files"]
    proto = evaluate(enc, build_dataset(spec, "train", decode="device"), build_dataset(spec, "val", decode="device"),
                     "protocol", cfg, out=tmp_path / "p")
    assert proto["counts"]["skipped_train"] == 1 and 0 <= proto["top1"] <= proto["top5"] <= 100
