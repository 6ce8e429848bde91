"""decode: device without the round trip (augment.device_decode, zoo.data.prefetch): the same images, labels and
skipped files as the path it replaces (bytes moved, then ``ImagePretraining.on_after_batch_transfer``), the
pinned/stream path only with CUDA, a decoder failure on one image skipped and counted, errors and early stops."""
from __future__ import annotations

import io
import itertools
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import augment.decode
import zoo.data.prefetch as prefetch
from augment.device_decode import DeviceDecoder, cuda_decode_available
from zoo.data.images import build_dataset
from zoo.data.loaders import collate_with_paths, resumable_loader
from zoo.data.prefetch import DevicePrefetcher, drop_undecodable, use_device_prefetch
from zoo.train.ssl import ImagePretraining


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))


def _jpeg(seed: int, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (14, 18, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def folder(tiny_imagefolder, tmp_path):
    """The tiny ImageNet folder plus a grey JPEG, a PNG named .JPEG and two files that do not decode."""
    root = tmp_path / "mixed"
    shutil.copytree(tiny_imagefolder, root)
    cls = sorted(p for p in (root / "train").iterdir())[0]
    (cls / "grey.JPEG").write_bytes(_jpeg(1, "L"))
    Image.new("RGB", (9, 7), (10, 200, 30)).save(cls / "png.JPEG", format="PNG")
    (cls / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (cls / "empty.JPEG").write_bytes(b"")
    return root


def _old_path(batch: dict) -> tuple[dict, list]:
    """What a training module did with a raw-byte batch: ImagePretraining.on_after_batch_transfer (CPU here)."""
    module = types.SimpleNamespace(skipped_images=[], device=torch.device("cpu"))
    out = ImagePretraining.on_after_batch_transfer(module, batch, 0)
    return out, module.skipped_images


def _loader(ds, **kw):
    dm = types.SimpleNamespace(trainer=None)
    return resumable_loader(dm, ds, 4, train=False, collate_fn=collate_with_paths, **kw)


def test_prefetched_batches_equal_the_old_path_bit_exact(folder):
    ds = build_dataset(f"imagefolder:{folder}", "train", decode="device")
    old = [_old_path(b) for b in _loader(ds)]
    new = list(DevicePrefetcher(iter(_loader(ds)), "cpu"))
    assert len(old) == len(new) == -(-len(ds) // 4)
    skipped_new = []
    for (ob, oskip), nb in zip(old, new):
        module = types.SimpleNamespace(skipped_images=[], device=torch.device("cpu"))
        nb = ImagePretraining.on_after_batch_transfer(module, nb, 0)  # the module leaves decoded batches alone
        skipped_new += module.skipped_images
        assert torch.equal(ob["label"], nb["label"]) and len(ob["image"]) == len(nb["image"])
        assert all(a.dtype == torch.uint8 and torch.equal(a, b) for a, b in zip(ob["image"], nb["image"]))
        assert nb["path"] == [p for p in ob["path"] if p not in oskip]
    assert sorted(skipped_new) == sorted(s for _, skip in old for s in skip)
    assert sorted(s.rsplit("/", 1)[1] for s in skipped_new) == ["broken.JPEG", "empty.JPEG"]


def test_the_pinned_stream_path_is_taken_only_with_cuda(folder, monkeypatch):
    dev_ds = build_dataset(f"imagefolder:{folder}", "train", decode="device")
    cpu_ds = build_dataset(f"imagefolder:{folder}", "train", decode="worker")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_device_prefetch(dev_ds, torch.device("cuda", 0)) and not cuda_decode_available("cuda")
    loader = _loader(dev_ds, decode_device=torch.device("cuda", 0))
    batch = next(iter(loader))
    assert loader._prefetcher is None and batch["image"][0].dim() == 1  # raw bytes: the module decodes on the CPU
    assert not DeviceDecoder("cuda").cuda  # a decoder asked for CUDA without it decodes on the CPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_device_prefetch(dev_ds, "cuda") and not use_device_prefetch(dev_ds, "cpu")
    assert not use_device_prefetch(cpu_ds, "cuda") and not use_device_prefetch(dev_ds, None)
    made = []
    monkeypatch.setattr(prefetch, "DeviceDecoder", lambda device, buffers: made.append(device) or DeviceDecoder("cpu"))
    loader = _loader(dev_ds, decode_device=torch.device("cuda", 0))
    batches = list(loader)
    assert isinstance(loader._prefetcher, DevicePrefetcher) and made == [torch.device("cuda", 0)]
    assert all(img.dim() == 3 for b in batches for img in b["image"])
    first = iter(loader)
    next(first)  # an iteration left after one batch (a sanity check, max_steps) ...
    abandoned = loader._prefetcher
    again = [b["label"] for b in loader]  # ... is stopped before the next one starts on the loader's iterator
    assert not abandoned._thread.is_alive() and loader._prefetcher is not abandoned
    assert all(torch.equal(a, b["label"]) for a, b in zip(again, batches))
    loader = _loader(cpu_ds, decode_device=torch.device("cuda", 0))
    next(iter(loader))
    assert loader._prefetcher is None  # decode: worker batches are decoded already


def test_a_decoder_failure_on_one_image_falls_back_or_is_skipped_and_counted(folder, monkeypatch):
    """The batched nvjpeg call failing on one image: the others still decode in the batch; that one goes to the CPU
    decoders, and is skipped, counted and named when they fail too (as a corrupt file)."""
    import torchvision.io

    ds = build_dataset(f"imagefolder:{folder}", "train", decode="device")
    victim = next(i for i in range(len(ds)) if ds[i][2].endswith("_0.JPEG"))
    victim_bytes = bytes(ds[victim][0].tolist())
    real = torchvision.io.decode_jpeg

    def flaky(data, *a, **k):
        items = data if isinstance(data, list) else [data]
        if any(bytes(d.tolist()) == victim_bytes for d in items):
            raise RuntimeError("nvjpeg: simulated failure")
        return real(data, *a, **k)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", flaky)
    batch = collate_with_paths([ds[i] for i in range(len(ds))])
    expected, _ = _old_path(collate_with_paths([ds[i] for i in range(len(ds))]))
    got = next(DevicePrefetcher(iter([batch]), "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(got["image"], expected["image"]))  # PIL fallback: same pixels
    assert ds[victim][2] not in got["skipped"]

    real_pil = augment.decode._pil_decode
    monkeypatch.setattr(augment.decode, "_pil_decode",
                        lambda d: (_ for _ in ()).throw(OSError("bad")) if bytes(d.tolist()) == victim_bytes
                        else real_pil(d))
    batch = collate_with_paths([ds[i] for i in range(len(ds))])
    n = len(batch["label"])
    got = next(DevicePrefetcher(iter([batch]), "cpu"))
    assert ds[victim][2] in got["skipped"] and len(got["image"]) == len(got["label"]) == n - 3
    assert ds[victim][2] not in got["path"]


def test_errors_reach_the_consumer_and_close_frees_the_loader():
    def batches():
        yield {"image": [torch.tensor([1, 2], dtype=torch.uint8)], "label": torch.tensor([0])}
        raise RuntimeError("DataLoader worker (pid 1) exited unexpectedly")

    it = DevicePrefetcher(batches(), "cpu")
    first = next(it)
    assert first["image"] == [] and first["skipped"] == ["<batch item 0>"] and len(first["label"]) == 0
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    pulled = []
    endless = ({"label": torch.tensor([k])} for k in itertools.count() if not pulled.append(k))
    it = DevicePrefetcher(endless, "cpu", ahead=2)
    assert next(it)["label"].item() == 0
    it.close()  # returns: the thread stops after the batch it was fetching
    assert not it._thread.is_alive() and len(pulled) <= 5


def test_drop_undecodable_keeps_labels_and_paths_aligned():
    batch = {"label": torch.tensor([5, 6, 7]), "path": ["a", "b", "c"], "skipped": ["z"]}
    out = drop_undecodable(batch, [1])
    assert out["label"].tolist() == [5, 7] and out["path"] == ["a", "c"] and out["skipped"] == ["z", "b"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg); the CPU path is tested above")
def test_gpu_prefetch_equals_the_moved_bytes_path(folder):
    ds = build_dataset(f"imagefolder:{folder}", "train", decode="device")
    old = []
    for b in _loader(ds):
        b["image"] = [x.cuda() for x in b["image"]]  # what Lightning's transfer did before the module decoded
        module = types.SimpleNamespace(skipped_images=[], device=torch.device("cuda"))
        old.append(ImagePretraining.on_after_batch_transfer(module, b, 0))
    loader = _loader(ds, decode_device=torch.device("cuda", 0), pin_memory=True)
    new = list(loader)
    assert isinstance(loader._prefetcher, DevicePrefetcher) and loader._prefetcher.decoder.stream is not None
    for ob, nb in zip(old, new):
        assert torch.equal(ob["label"].cpu(), nb["label"]) and len(ob["image"]) == len(nb["image"])
        assert all(a.is_cuda and torch.equal(a, b) for a, b in zip(ob["image"], nb["image"]))


def test_training_through_the_prefetcher_counts_what_the_old_path_counted(tiny_imagefolder, tmp_path, monkeypatch):
    """BYOL fit with decode: device through the decode-ahead loader (its CPU stand-in): a 16-bit PNG trains, a file
    deleted after listing is skipped, counted and named exactly as on the path without it."""
    from test_byol_imagefolder import test_byol_survives_16bit_png_and_a_file_that_vanishes as same_checks

    made = []
    monkeypatch.setattr(prefetch, "cuda_decode_available", lambda device: True)
    monkeypatch.setattr(prefetch, "DeviceDecoder", lambda device, buffers: made.append(device) or DeviceDecoder("cpu"))
    same_checks(tiny_imagefolder, tmp_path, "device")
    assert made  # the training loader did go through the prefetcher
