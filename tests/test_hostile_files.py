"""Every hostile file (tests/hostile_files.py) against every loader entry point, each loader in a child process
with an address-space limit: one-line refusal or a counted skip, never a crash, a MemoryError, a traceback type
outside ValueError/OSError, code execution (a marker file) or memory growth."""
from __future__ import annotations

import io
import logging
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hostile_files  # noqa: E402
from hostile_files import LOADERS, PIXEL_BOMBS, hostile_files as make_files, run_harness  # noqa: E402

# Files that are not hostile to that loader: a valid PNG under a .pkl name decodes; the official reader returns the
# pickled data of a nested-list leaf (bounded: shared lists are converted once) and load_backbone refuses it.
BENIGN = {("decode_device", "png_named.pkl"), ("imagefolder", "png_named.pkl"), ("official", "pkl_dag_leaf.pkl")}
RSS_GROWTH_MB = 64  # the largest honest allocation here is a few MB; every bomb asks for >= 1.3 GB


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "pwned"
    return marker, dict(make_files(folder / "files", marker))


@pytest.fixture(scope="module")
def harness(files):
    """One child process runs every loader over every file (the imports dominate the time)."""
    marker, paths = files
    return run_harness(",".join(LOADERS), marker, list(paths.values()))


def _problems(loader: str, name: str, r: dict | None) -> list[str]:
    if r is None:
        return ["no result: the child crashed or stopped"]
    out = []
    if r["outcome"] == "memoryerror" or "more memory than this machine has" in (r.get("message") or ""):
        out.append("an allocation was attempted (MemoryError) instead of being refused first")
    if r["outcome"] == "loaded" and (loader, name) not in BENIGN:
        out.append("loaded without a word")
    if r["outcome"] == "refused":
        msg = r["message"]
        if not r.get("value_error"):
            out.append(f"{r['type']} is not a one-line user error (ValueError/OSError)")
        if "\n" in msg or not msg or len(msg) > 600:
            out.append(f"message is not one bounded line: {msg[:200]!r}")
        if r["path"] not in msg:
            out.append(f"message does not name the file: {msg[:200]!r}")
    if r["rss_growth_mb"] > RSS_GROWTH_MB:
        out.append(f"peak memory grew by {r['rss_growth_mb']} MB")
    if name in PIXEL_BOMBS and loader in ("decode_device", "imagefolder") and (r["decoders"] or r["outcome"] != "skipped"):
        out.append(f"pixel bomb reached a decoder {r['decoders']} time(s) / outcome {r['outcome']}")
    return out


@pytest.mark.parametrize("loader", LOADERS)
def test_every_hostile_file_against_every_loader(files, harness, loader):
    marker, paths = files
    results, trail = harness
    assert not marker.exists(), "a file ran code (marker created)"
    failures = {}
    for name in paths:
        problems = _problems(loader, name, results.get((loader, name)))
        if problems:
            failures[name] = problems
    assert not failures, f"{loader}: {failures}\n{trail}"


def test_fixture_set_is_what_it_claims(files):
    """The bombs really declare huge sizes (PNG decodes to zeros when small); every crafted group is present."""
    from PIL import Image

    from augment.decode import image_size

    _, paths = files
    small = hostile_files._png_bomb(2000, 2000)
    with Image.open(io.BytesIO(small)) as im:
        im.load()
        assert im.size == (2000, 2000) and np.asarray(im).max() == 0
    assert len(paths["png_bomb_16000.png"].read_bytes()) < 300_000
    assert image_size(paths["png_bomb_16000.png"].read_bytes()) == (16000, 16000)
    assert image_size(paths["jpeg_bomb_65500.jpg"].read_bytes()) == (65500, 65500)
    assert set(PIXEL_BOMBS) <= set(paths) and sum(n.startswith("pkl_") for n in paths) >= 40
    assert sum(n.startswith("torch_") for n in paths) >= 15


def test_pixel_limit_is_one_setting_and_counted_as_skipped(files, monkeypatch, tmp_path, caplog):
    """ZOO_MAX_IMAGE_PIXELS moves the limit for every path; over it an image is skipped without decoding."""
    from augment.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_batch, max_image_pixels
    from zoo.data.images import ImageFolderDataset, collate_images

    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    png = hostile_files._png_bomb(1000, 1000)  # 1,000,000 pixels
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((1000, 1000, 3), np.uint8)).save(buf, "JPEG")
    jpeg, gif = buf.getvalue(), hostile_files._small("GIF")
    imgs, bad = decode_batch([png, jpeg, gif])
    assert bad == [] and imgs[0].shape == (3, 1000, 1000)
    monkeypatch.setenv("ZOO_MAX_IMAGE_PIXELS", "999_999")
    with caplog.at_level(logging.WARNING, logger="augment.decode"):
        imgs, bad = decode_batch([png, jpeg, gif])
    assert bad == [0, 1] and len(imgs) == 1 and imgs[0].shape == (3, 16, 16)
    assert "1000x1000" in caplog.text and "ZOO_MAX_IMAGE_PIXELS" in caplog.text
    monkeypatch.undo()
    root = tmp_path / "folder"
    (root / "train" / "c0").mkdir(parents=True)
    (root / "train" / "c0" / "bomb.png").write_bytes(files[1]["png_bomb_16000.png"].read_bytes())
    (root / "train" / "c0" / "ok.jpg").write_bytes(jpeg)
    ds = ImageFolderDataset(root, "train")
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert [p.rsplit("/", 1)[-1] for p in batch["skipped"]] == ["bomb.png"] and len(batch["label"]) == 1
    for bad_value in ("0", "-5", "lots"):
        monkeypatch.setenv("ZOO_MAX_IMAGE_PIXELS", bad_value)
        with pytest.raises(ValueError, match="ZOO_MAX_IMAGE_PIXELS") as err:
            ImageFolderDataset(root, "train")
        assert "\n" not in str(err.value)


def test_device_decode_path_skips_bombs_on_cpu(files):
    """The ``decode: device`` path (raw bytes decoded after transfer) on a CPU: the bomb is reported by index."""
    from augment.decode import decode_batch

    _, paths = files
    ok = hostile_files._small("JPEG")
    data = [torch.frombuffer(bytearray(paths[n].read_bytes()), dtype=torch.uint8) for n in PIXEL_BOMBS]
    imgs, bad = decode_batch([ok, *data, ok], device="cpu")
    assert bad == list(range(1, len(PIXEL_BOMBS) + 1)) and len(imgs) == 2


def test_honest_torch_files_still_load(tmp_path):
    """The dry run refuses only what cannot be a checkpoint: zip and legacy formats, bytes, sets, tied and shared
    tensors, OrderedDict metadata, nested hyper-parameters and an in-memory item all load unchanged."""
    from collections import OrderedDict

    from zoo.weights.safe_load import safe_torch_load, safe_torch_load_bytes

    w = torch.randn(3, 4)
    sd = OrderedDict(a=w, b=w, c=torch.arange(5))
    sd._metadata = OrderedDict({"": {"version": 1}})
    obj = {"state_dict": sd, "blob": b"\x00\xff" * 5000, "ba": bytearray(b"xyz"), "tags": {1, 2},
           "hp": {"lr": 0.1, "layers": [[1, 2], [3, [4, 5]]], "name": "ü" * 100}, "z": complex(1, 2)}
    for legacy in (False, True):
        path = tmp_path / f"ok_{legacy}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        got = safe_torch_load(path)
        assert torch.equal(got["state_dict"]["a"], w) and got["state_dict"]["b"] is got["state_dict"]["a"]
        assert got["blob"] == obj["blob"] and got["tags"] == {1, 2} and got["hp"] == obj["hp"]
        assert got["state_dict"]._metadata == sd._metadata
    buf = io.BytesIO()
    torch.save({"step": 3, "t": w}, buf)
    assert safe_torch_load_bytes(io.BytesIO(buf.getvalue()), "item 'x'")["step"] == 3
