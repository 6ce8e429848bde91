"""Image datasets: embedded digits, ImageFolder (sorted and flat val), CIFAR folders, bad paths and bad files."""
import re
import pickle

import numpy as np
import pytest
import torch

from zoo.data import ImageDataModule, build_dataset, collate_images
from zoo.data.images import ImageFolderDataset


def test_digits_split_is_real_disjoint_and_uint8():
    tr, va = build_dataset("digits", "train", image_size=32), build_dataset("digits", "val", image_size=32)
    assert len(tr) + len(va) == 1797 and abs(len(va) - 0.2 * 1797) < 12
    x, y = tr[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and 0 <= y < 10
    # disjoint: no validation image equals a training image bit for bit
    tr_set = {bytes(t.numpy()) for t in tr.images[:, 0]}
    assert sum(bytes(v.numpy()) in tr_set for v in va.images[:, 0]) < 5  # a few real duplicates exist in digits
    assert len(set(tr.labels.tolist())) == 10


def test_imagefolder_train_and_val(tiny_imagefolder):
    ds = build_dataset(f"imagefolder:{tiny_imagefolder}", "train")
    assert ds.classes == sorted(ds.classes) and len(ds) == 18
    batch = collate_images([ds[i] for i in range(4)])
    assert isinstance(batch["image"], list) and batch["image"][0].dtype == torch.uint8  # sizes differ -> list
    assert batch["label"].tolist() == [0, 0, 0, 0] and batch["skipped"] == []
    raw = ImageFolderDataset(tiny_imagefolder, "val", decode="device")
    data, label, path = raw[0]
    assert data.dim() == 1 and data[:2].tolist() == [0xFF, 0xD8]  # JPEG magic: bytes, not decoded


def test_flat_val_with_kaggle_solution_and_devkit(tiny_imagefolder, tmp_path):
    import shutil

    from scipy.io import savemat

    src = sorted((tiny_imagefolder / "val").rglob("*.JPEG"))
    truth = [p.parent.name for p in src]
    blobs = [p.read_bytes() for p in src]
    shutil.rmtree(tiny_imagefolder / "val")
    (tiny_imagefolder / "val").mkdir()
    for i, blob in enumerate(blobs):  # official flat names
        (tiny_imagefolder / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(blob)
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageFolderDataset(tiny_imagefolder, "val")
    csv = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4" for i, w in enumerate(truth)]
    (tiny_imagefolder / "LOC_val_solution.csv").write_text("\n".join(csv))
    ds = ImageFolderDataset(tiny_imagefolder, "val")
    classes = ds.classes
    assert [classes[y] for _, y in ds.samples] == truth
    # devkit: ILSVRC ids are NOT sorted-wnid order; map through meta.mat
    (tiny_imagefolder / "LOC_val_solution.csv").unlink()
    ilsvrc_id = {"n01440764": 449, "n01443537": 450, "n01484850": 12}
    dk = tiny_imagefolder / "devkit" / "data"
    dk.mkdir(parents=True)
    (dk / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(ilsvrc_id[w]) for w in truth))
    synsets = np.zeros(3, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (w, k) in enumerate(ilsvrc_id.items()):
        synsets[i] = (k, w, 0)
    savemat(str(dk / "meta.mat"), {"synsets": synsets})
    ds = ImageFolderDataset(tiny_imagefolder, "val")
    assert [classes[y] for _, y in ds.samples] == truth


def test_missing_paths_say_where_they_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "train")):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}", "train")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        build_dataset(f"cifar10:{tmp_path}", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist", "train")


def _write_cifar(folder, n=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(range(10)) * (n // 10)}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)


def test_cifar_folder_reads_and_refuses_code(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = build_dataset(f"cifar10:{tmp_path}", "train")
    assert len(ds) == 100 and ds[0][0].shape == (3, 32, 32) and ds.classes[3] == "c3"

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        build_dataset(f"cifar10:{tmp_path}", "val")
    assert not (tmp_path / "pwned").exists()


def test_corrupt_files_are_skipped_and_named(tiny_imagefolder):
    bad = tiny_imagefolder / "train" / "n01440764" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tiny_imagefolder / "train" / "n01440764" / "empty.JPEG").write_bytes(b"")
    ds = build_dataset(f"imagefolder:{tiny_imagefolder}", "train")
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert sorted(p.rsplit("/", 1)[-1] for p in batch["skipped"]) == ["broken.JPEG", "empty.JPEG"]
    assert len(batch["label"]) == len(ds) - 2


def test_datamodule_checks_batch_size():
    dm = ImageDataModule("digits", batch_size=4096, num_workers=0)
    with pytest.raises(ValueError, match="batch_size 4096"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule("digits", batch_size=0)
    dm = ImageDataModule("digits", batch_size=32, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 10
    first = next(iter(dm.train_dataloader()))
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(first["label"], again["label"])  # same epoch -> same order
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["label"], first["label"])


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_files_that_vanish_or_become_unreadable_after_listing_are_skipped_and_named(tiny_imagefolder, monkeypatch,
                                                                                     decode):
    from pathlib import Path

    ds = build_dataset(f"imagefolder:{tiny_imagefolder}", "train", decode=decode)
    gone, folder, locked = (ds.samples[k][0] for k in (1, 7, 13))
    gone.unlink()  # deleted after the folder was listed
    folder.unlink()
    folder.mkdir()  # replaced by a directory: IsADirectoryError
    real_read = Path.read_bytes

    def read_bytes(self):  # chmod 000 cannot lock root out, so the permission error is simulated
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert sorted(batch["skipped"]) == sorted(str(p) for p in (gone, folder, locked))
    assert len(batch["label"]) == len(ds) - 3


def test_empty_class_folder_is_refused_by_name(tiny_imagefolder):
    import shutil

    empty = tiny_imagefolder / "train" / "n09999999"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"empty class folder .*n09999999.*add its images or remove the folder"):
        build_dataset(f"imagefolder:{tiny_imagefolder}", "train")
    # an empty val class folder is allowed: the class list is the training folder's, so labels stay aligned
    shutil.rmtree(empty)
    for p in (tiny_imagefolder / "val" / "n01484850").iterdir():
        p.unlink()
    val = build_dataset(f"imagefolder:{tiny_imagefolder}", "val")
    assert val.classes == build_dataset(f"imagefolder:{tiny_imagefolder}", "train").classes and len(val) == 6


@pytest.mark.parametrize("kwargs, key", [
    ({"dataset": "cifar10:/data/cifar", "image_size": 64}, "data.image_size=64"),
    ({"dataset": "imagefolder:/data/imagenet", "image_size": 224}, "data.image_size=224"),
    ({"dataset": "digits", "decode": "device"}, "data.decode='device'"),
    ({"dataset": "cifar10:/data/cifar", "decode": "device"}, "data.decode='device'"),
])
def test_data_knobs_that_would_do_nothing_are_refused(kwargs, key):
    from zoo.data import ImageDataModule
    from zoo.train.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(key) + ".*remove it"):
        ImageDataModule(**kwargs)
    # the same knobs where they act are accepted
    ImageDataModule("digits", image_size=16)
    ImageDataModule("imagefolder:/data/imagenet", decode="device")


def _py2_batch(n: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """A batch as Python 2's cPickle (protocol 2) wrote CIFAR: array data and texts as BINSTRING (read as latin1)."""
    import struct

    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)

    def s(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    dtype = b"cnumpy\ndtype\n(" + s(b"u1") + b"K\x00K\x01tR(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00t" + s(b"b") + b"tR(K\x01(J"
           + struct.pack("<i", n) + b"M\x00\x0ct" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    labels = b"(" + b"".join(b"K" + bytes([i % 10]) for i in range(n)) + b"l"
    body = b"}(" + s(b"data") + arr + s(b"labels") + labels + s(b"batch_label") + s(b"testing batch 1 of 1") + b"u"
    return b"\x80\x02" + body + b".", data


def test_cifar_python2_layout_and_bad_batches_are_one_line(tmp_path):
    """The original (Python 2) CIFAR-10 files load; wrong shapes, labels, dtypes or class lists name the file."""
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    raw, data = _py2_batch(20, np.random.default_rng(1))
    (folder / "test_batch").write_bytes(raw)
    ds = build_dataset(f"cifar10:{tmp_path}", "val")
    assert len(ds) == 20 and torch.equal(ds.images[3].reshape(-1), torch.from_numpy(data[3]))
    bad = {
        "data_shape": {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4},
        "data_dtype": {"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4},
        "label_range": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},
        "label_count": {"data": np.zeros((2, 3072), np.uint8), "labels": [0]},
        "labels_text": {"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]},
        "no_labels": {"data": np.zeros((2, 3072), np.uint8)},
        "not_dict": [1, 2],
    }
    for name, obj in bad.items():
        with open(folder / "test_batch", "wb") as f:
            pickle.dump(obj, f, protocol=2)
        with pytest.raises(ValueError) as err:
            build_dataset(f"cifar10:{tmp_path}", "val")
        assert "test_batch" in str(err.value) and "\n" not in str(err.value), name
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["only", "three", "names"]}, f, protocol=2)
    with pytest.raises(ValueError, match="batches.meta"):
        build_dataset(f"cifar10:{tmp_path}", "val")
