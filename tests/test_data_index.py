"""The image-folder index (zoo.data.index): same files as the old per-file-stat listing, no stat per file, NumPy
arrays in loader workers, an on-disk cache reused while the folder is unchanged and rebuilt when it changes, and one
builder when several processes ask at once."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo.data.index as zindex
from call_count import counting
from zoo.data.images import IMAGE_EXTENSIONS, ImageFolderDataset, build_dataset


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))


def old_listing(split: Path) -> list[tuple[Path, str]]:
    """The listing ImageFolderDataset used before the index: a stat per file (Path.is_file), sorted Paths."""
    subs = sorted(d for d in split.iterdir() if d.is_dir())
    folders = subs or [split]
    return [(p, d.name if subs else "") for d in folders
            for p in sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)]


def backdate(root: Path, seconds: float = 60.0) -> None:
    """Move every folder's mtime into the past, as for a data set copied long before training."""
    t = time.time() - seconds
    for d, subs, _ in os.walk(root):
        os.utime(d, (t, t))


def odd_folder(root: Path) -> Path:
    """A class folder with every kind of name the listing must get right."""
    cls = root / "train" / "wnid one"
    cls.mkdir(parents=True)
    other = root / "elsewhere"
    other.mkdir()
    (other / "target.jpg").write_bytes(b"x")
    names = ["a.JPEG", "b c.jpg", "ünï cödé.png", "日本.webp", ".hidden.jpg", ".jpg", "..jpg", "noext", "notes.txt",
             "x.JPG.bak", "upper.TIFF", "trailingdot.", "z.gif"]
    for n in names:
        (cls / n).write_bytes(b"x")
    (cls / "sub.jpg").mkdir()  # a folder named like an image: not a file
    (cls / "link.jpg").symlink_to(other / "target.jpg")  # a symlinked file counts, as Path.is_file says
    (cls / "dangling.jpg").symlink_to(other / "missing.jpg")  # a broken link does not
    os.close(os.open(os.fsencode(cls) + b"/bytes\xff\xfe.jpg", os.O_CREAT | os.O_WRONLY, 0o644))  # not UTF-8
    (root / "train" / "second").mkdir()
    (root / "train" / "second" / "only.bmp").write_bytes(b"x")
    return root / "train"


def index_listing(split: Path) -> list[tuple[Path, str]]:
    idx = zindex.folder_index(split, IMAGE_EXTENSIONS)
    return [(split / idx.relpath(i), idx.folders[idx.folder_of[i]]) for i in range(len(idx))]


def test_index_equals_the_old_listing_on_the_tiny_imagefolder(tiny_imagefolder):
    for split in ("train", "val"):
        assert index_listing(tiny_imagefolder / split) == old_listing(tiny_imagefolder / split)
        ds = build_dataset(f"imagefolder:{tiny_imagefolder}", split)
        assert [(str(p), y) for p, y in ds.samples] == [(str(p), ds.classes.index(c))
                                                        for p, c in old_listing(tiny_imagefolder / split)]


def test_index_equals_the_old_listing_on_odd_names(tmp_path):
    split = odd_folder(tmp_path)
    got = index_listing(split)
    assert got == old_listing(split)
    names = {p.name for p, _ in got}
    assert {"link.jpg", ".hidden.jpg", "..jpg", "ünï cödé.png", "日本.webp", "upper.TIFF"} <= names
    assert not names & {"dangling.jpg", "sub.jpg", ".jpg", "notes.txt", "x.JPG.bak", "noext"}
    raw = [p for p, _ in got if os.fsencode(p.name).startswith(b"bytes")]
    assert len(raw) == 1 and raw[0].exists()  # an undecodable name round-trips to the same file


def test_flat_folder_is_indexed_like_the_old_listing(tmp_path):
    flat = tmp_path / "val"
    flat.mkdir()
    for n in ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG", "readme.txt"]:
        (flat / n).write_bytes(b"x")
    idx = zindex.folder_index(flat, IMAGE_EXTENSIONS)
    assert idx.folders == [""] and index_listing(flat) == old_listing(flat)


def count_stats(monkeypatch) -> dict[str, int]:
    """Count every Python-level way of asking for a file's metadata."""
    calls = {"n": 0}
    for mod, name in [(os, "stat"), (os, "lstat"), (os.path, "isfile"), (os.path, "isdir"), (os.path, "exists"),
                      (os.path, "getsize"), (Path, "stat"), (Path, "lstat"), (Path, "is_file"), (Path, "exists")]:
        monkeypatch.setattr(mod, name, counting(getattr(mod, name), calls, "n"))
    return calls


@pytest.mark.parametrize("cached", [False, True])
def test_no_stat_per_file(tmp_path, monkeypatch, cached):
    """The metadata calls of a listing do not grow with the number of files (only with the number of folders)."""
    counts = []
    for per_class in (5, 60):
        root = tmp_path / f"n{per_class}" / "train"
        for c in range(3):
            (root / f"c{c}").mkdir(parents=True)
            for j in range(per_class):
                (root / f"c{c}" / f"{j}.JPEG").write_bytes(b"x")
        backdate(root.parent)
        if cached:
            zindex.folder_index(root, IMAGE_EXTENSIONS)  # written now, read below
        with monkeypatch.context() as m:
            calls = count_stats(m)
            idx = zindex.folder_index(root, IMAGE_EXTENSIONS)
        assert len(idx) == 3 * per_class and idx.source is not None  # built (and written) or read from the cache
        counts.append(calls["n"])
    # per-file stats would give >= 180 on the larger folder; what remains is a constant (class folders, resolving the
    # cache folder, which checks each existing parent once), and the larger folder never costs more
    assert counts[1] <= counts[0] and counts[1] < 3 * 5 + 15, counts


def test_cache_is_reused_and_invalidated_when_a_class_folder_changes(tiny_imagefolder, monkeypatch):
    split = tiny_imagefolder / "train"
    backdate(tiny_imagefolder)
    first = zindex.folder_index(split, IMAGE_EXTENSIONS)
    assert first.source is not None and Path(first.source).is_file()
    real_scan = zindex.scan_folder
    scans = []
    monkeypatch.setattr(zindex, "scan_folder", lambda *a: scans.append(a) or real_scan(*a))
    again = zindex.folder_index(split, IMAGE_EXTENSIONS)
    assert scans == [] and again.source == first.source
    assert np.array_equal(again.blob, first.blob) and np.array_equal(again.folder_of, first.folder_of)

    new = split / "n01443537" / "added.JPEG"
    new.write_bytes((split / "n01443537" / "n01443537_0.JPEG").read_bytes())
    changed = zindex.folder_index(split, IMAGE_EXTENSIONS)
    assert len(scans) == 1 and len(changed) == len(first) + 1
    assert new in [split / changed.relpath(i) for i in range(len(changed))]
    # a file renamed: same count, new name
    backdate(tiny_imagefolder)
    zindex.folder_index(split, IMAGE_EXTENSIONS)
    new.rename(new.with_name("renamed.JPEG"))
    renamed = zindex.folder_index(split, IMAGE_EXTENSIONS)
    assert "n01443537/renamed.JPEG" in [renamed.relpath(i) for i in range(len(renamed))]
    # a class folder removed
    import shutil

    backdate(tiny_imagefolder)
    zindex.folder_index(split, IMAGE_EXTENSIONS)
    shutil.rmtree(split / "n01484850")
    assert zindex.folder_index(split, IMAGE_EXTENSIONS).folders == ["n01440764", "n01443537"]


def test_a_folder_changed_just_now_is_not_cached(tiny_imagefolder):
    idx = zindex.folder_index(tiny_imagefolder / "train", IMAGE_EXTENSIONS)  # the fixture was written just now
    assert idx.source is None and len(idx) == 18


def _build_in_child(split: str, log: str) -> None:
    real_scan = zindex.scan_folder

    def slow_scan(*a):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return real_scan(*a)

    zindex.scan_folder = slow_scan
    idx = zindex.folder_index(split, IMAGE_EXTENSIONS)
    assert len(idx) == 18 and idx.source is not None


def test_one_process_builds_while_the_others_wait(tiny_imagefolder, tmp_path):
    backdate(tiny_imagefolder)
    log = tmp_path / "builds.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(str(tiny_imagefolder / "train"), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1  # one build; the two others waited and mapped its file


class _Probe(torch.utils.data.Dataset):
    """Reports, from inside a loader worker, the types of what the worker's copy of the dataset holds."""

    def __init__(self, ds: ImageFolderDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        ds = self.ds
        big = {k: type(v).__name__ for k, v in vars(ds).items() if hasattr(v, "__len__") and len(v) == len(ds)}
        arrays = {k: type(v).__name__ for k, v in vars(ds.index).items() if hasattr(v, "__len__")}
        return big, arrays, ds[0][1]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_loader_workers_hold_numpy_arrays(tiny_imagefolder, method):
    backdate(tiny_imagefolder)
    ds = build_dataset(f"imagefolder:{tiny_imagefolder}", "train")
    assert isinstance(ds.index.source, str)
    loader = torch.utils.data.DataLoader(_Probe(ds), batch_size=None, num_workers=1,
                                         multiprocessing_context=method)
    big, arrays, label = next(iter(loader))
    assert big == {"labels": "ndarray", "index": "FileIndex"}  # no per-sample Python list anywhere in the dataset
    assert {arrays[k] for k in ("blob", "offsets", "folder_of", "counts")} == {"ndarray"}
    assert label == ds[0][1]
    assert len(pickle.dumps(ds.index)) < 1000  # spawn workers re-map the cache file instead of receiving a copy
