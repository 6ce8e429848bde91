"""Image datasets shared by every method: embedded digits, CIFAR-10/100 folders, ImageFolder / ImageNet.

Datasets yield ``(uint8 tensor [3, H, W], label)`` — or raw file bytes with ``decode="device"`` — and never
augment: augmentation runs on the device after transfer (``augment``). Files that cannot be decoded -- or read: a
file deleted or made unreadable after the folder was listed -- are skipped, and their paths travel with the batch
(``batch["skipped"]``) so the training module can count and log them. Every image mode that decodes becomes uint8
RGB (rules in ``augment.decode``).
"""
from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.weights.safe_load import UnsafeFileError
from zoo.weights.safe_pickle import GuardedUnpickler, brief, describe_failure, one_line
from zoo.data.index import folder_index, list_subfolders
from zoo.data.workers import BusySlots

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt")


class TensorImageDataset(Dataset):
    """In-memory uint8 images [N, 3, H, W] with integer labels (digits, CIFAR)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        self.images, self.labels, self.classes = images, labels, list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def digits_dataset(split: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> TensorImageDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled (bilinear) to ``size`` and made RGB.

    The split is a fixed stratified one (``seed``), so train and val never share an image.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0)[:, None]  # values 0..16 -> [0, 1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    rng = np.random.default_rng(seed)
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(d.target == c))[: int(round(val_fraction * (d.target == c).sum()))]
                              for c in range(10)])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    keep = torch.from_numpy(is_val if split == "val" else ~is_val)
    return TensorImageDataset(x[keep], y[keep], [str(c) for c in range(10)])


class CifarFileError(UnsafeFileError, pickle.UnpicklingError):
    """A CIFAR batch file that is not one (foreign, truncated, hostile); the message is one line naming it."""


class _CifarUnpickler(GuardedUnpickler):
    """CIFAR's python batches are pickles of dicts, lists, text and uint8/int arrays; nothing else is built."""

    dtype_kinds = "ui"

    def build_allowed_map(self) -> dict[tuple[str, str], Any]:
        return {k: v for k, v in super().build_allowed_map().items() if k[1] != "scalar"}

    def refusal_hint(self) -> str:
        return "a CIFAR batch holds only dicts, lists, text and uint8/int arrays (nothing in the file is executed)"


def _cifar_text(x: Any) -> Any:
    return x.decode("latin1") if isinstance(x, bytes) else x


def read_cifar_batch(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any]:
    """One CIFAR python batch file read with the restricted unpickler; ``keys`` must be present. One-line errors."""
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise CifarFileError(f"CIFAR batch file {str(p)!r} is empty (0 bytes); download the python version again.")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            obj = _CifarUnpickler(f, size, encoding="latin1").load()
    except UnsafeFileError as err:
        raise CifarFileError(f"refusing to load CIFAR batch file {str(p)!r}: {one_line(err)}") from None
    except MemoryError:
        raise CifarFileError(f"refusing to load CIFAR batch file {str(p)!r}: it asks for more memory than this "
                             "machine has") from None
    except Exception as err:  # noqa: BLE001 - truncated, empty or foreign: name the file, no traceback
        raise CifarFileError(f"could not read CIFAR batch file {str(p)!r} ({describe_failure(err)}); is it "
                             "truncated? Download the python version again.") from None
    if not isinstance(obj, dict):
        raise CifarFileError(f"CIFAR batch file {str(p)!r} holds a {type(obj).__name__}, not a dict; download the "
                             "python version again.")
    obj = {_cifar_text(k): v for k, v in obj.items()}  # Python 3 re-saves may use bytes keys
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CifarFileError(f"CIFAR batch file {str(p)!r} has no {missing[0]!r} entry (found "
                             f"{brief(sorted(k for k in obj if isinstance(k, str)))}); download the python version "
                             "again.")
    return obj


def _cifar_arrays(path: Path, batch: dict[str, Any], label_key: str, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images [N, 3072] uint8 and labels [N] int64, checked against each other and the class count."""
    data, labels = batch["data"], batch[label_key]
    if type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarFileError(f"CIFAR batch file {str(path)!r}: 'data' is a {what}, expected uint8 [N, 3072]")
    if type(labels) is np.ndarray and labels.dtype.kind in "ui" and labels.ndim == 1:
        y = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(v) is int for v in labels):
        y = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    else:
        raise CifarFileError(f"CIFAR batch file {str(path)!r}: {label_key!r} is not a list of integer labels")
    if len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise CifarFileError(f"CIFAR batch file {str(path)!r}: {len(y)} labels in [{y.min() if len(y) else 0}, "
                             f"{y.max() if len(y) else 0}] for {len(data)} images; expected one label in "
                             f"[0, {num_classes}) per image")
    return data, y


def cifar_dataset(root: str | os.PathLike, split: str, num_classes: int = 10) -> TensorImageDataset:
    """CIFAR-10/100 from the torchvision-format folder (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    base = Path(root)
    folder = base if (base / ("batches.meta" if num_classes == 10 else "meta")).exists() else base / sub
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    missing = [f for f in files + [meta_file] if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{num_classes} not found: looked for {', '.join(missing)} in {folder}. Download the python version "
            f"(e.g. torchvision.datasets.CIFAR{num_classes}(root={str(base)!r}, download=True) on a machine with "
            f"internet) and pass its folder as 'cifar{num_classes}:{base}'.")

    meta = read_cifar_batch(folder / meta_file, [names_key])
    classes = meta[names_key]
    if not isinstance(classes, list) or len(classes) != num_classes \
            or not all(isinstance(c, (str, bytes)) for c in classes):
        raise CifarFileError(f"CIFAR batch file {str(folder / meta_file)!r}: {names_key!r} is not a list of "
                             f"{num_classes} class names")
    parts = [_cifar_arrays(folder / f, read_cifar_batch(folder / f, ["data", label_key]), label_key, num_classes)
             for f in files]
    x = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
    y = np.concatenate([lab for _, lab in parts])
    return TensorImageDataset(torch.from_numpy(x), torch.from_numpy(y), [_cifar_text(c) for c in classes])


def _flat_val_labels(root: Path, files: list[Path], classes: list[str]) -> list[int]:
    """Labels for the flat official validation folder, always through the wnid (ILSVRC ids are not sorted-wnid order)."""
    where = [root, root / "val", root / "devkit" / "data", root / "ILSVRC2012_devkit_t12" / "data"]
    index = {c: i for i, c in enumerate(classes)}
    for d in where:
        sol = d / "LOC_val_solution.csv"
        if sol.exists():  # Kaggle copy: ImageId,PredictionString (wnid first)
            with open(sol, newline="") as f:
                by_id = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
            return [index[by_id[p.stem]] for p in files]
        gt = d / "ILSVRC2012_validation_ground_truth.txt"
        if gt.exists():  # devkit: one ILSVRC2012_ID per line in image order; meta.mat maps id -> wnid
            ids = [int(line) for line in gt.read_text().split()]
            id_to_wnid = _devkit_id_to_wnid(gt.parent)
            order = sorted(files)
            if len(ids) < len(order):
                raise ValueError(f"{gt} has {len(ids)} labels but {len(order)} images were found in the flat val folder")
            by_name = {p.name: index[id_to_wnid[ids[int(p.stem.rsplit('_', 1)[-1]) - 1]]] for p in order}
            return [by_name[p.name] for p in files]
    raise FileNotFoundError(
        f"the validation folder {root / 'val'} is flat (no class sub-folders) but no label file was found; looked for "
        f"{' or '.join(VAL_LABEL_FILES)} in {', '.join(str(d) for d in where)}. Copy the devkit's ground-truth file "
        f"(with meta.mat beside it) or Kaggle's LOC_val_solution.csv there, or sort val into wnid folders.")


def _devkit_id_to_wnid(folder: Path) -> dict[int, str]:
    meta = folder / "meta.mat"
    if meta.exists():
        from scipy.io import loadmat

        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    txt = folder / "map_clsloc.txt"  # "wnid id name" per line, shipped with some copies
    if txt.exists():
        return {int(parts[1]): parts[0] for parts in (line.split() for line in txt.read_text().splitlines()) if parts}
    raise FileNotFoundError(f"{folder} has ILSVRC2012_validation_ground_truth.txt but neither meta.mat nor map_clsloc.txt "
                            "to map ILSVRC2012 ids to wnids; copy meta.mat from the ImageNet devkit there")


class ImageFolderDataset(Dataset):
    """ImageNet-layout folder: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or a flat val + label file).

    Args:
        root: dataset root holding ``train/`` and ``val/``.
        split: "train" or "val".
        decode: "worker" decodes on the CPU in the loader workers; "device" returns raw file bytes (uint8 1-D) so
            the batch is decoded after transfer (GPU nvjpeg, see ``augment.decode``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", decode: str = "worker") -> None:
        self.root = Path(root)
        if decode not in ("worker", "device"):
            raise ValueError(f"decode must be 'worker' or 'device', got {decode!r}")
        self.decode = decode
        from augment.decode import max_image_pixels

        max_image_pixels()  # a malformed ZOO_MAX_IMAGE_PIXELS is one line now, not an error in every loader worker
        train_dir, split_dir = self.root / "train", self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"image folder split not found: {split_dir} does not exist. Expected the ImageNet layout "
                f"<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG; pass 'imagefolder:<root>'.")
        class_dir = train_dir if train_dir.is_dir() else split_dir
        self.classes = list_subfolders(class_dir)
        if not self.classes:
            raise FileNotFoundError(f"no class folders in {class_dir}; expected {class_dir}/<class>/<image files>")
        # The listing is zoo.data.index's: os.scandir without a stat per file, NumPy arrays (never a Python list:
        # forked loader workers would copy it page by page), cached on disk and built by one process.
        self.index = folder_index(split_dir, IMAGE_EXTENSIONS)
        self._dir = str(split_dir)
        if self.index.folders != [""]:
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted(d for d in self.index.folders if d not in index)
            if unknown:
                raise ValueError(f"{split_dir} has class folders missing from {class_dir}: {unknown[:5]}")
            # A class folder without images would still be a class: an output the model can never be taught, and a
            # silent shift of every later label against a copy of the data without it. Refused where the class list
            # comes from (the training folder). A val class folder may be empty: the class list is the training
            # folder's, so val labels stay aligned with it, and a validation subset need not cover every class.
            if class_dir == split_dir:
                empty = [name for name, n in zip(self.index.folders, self.index.counts) if n == 0]
                if empty:
                    raise ValueError(
                        f"empty class folder {split_dir / empty[0]}"
                        + (f" (and {len(empty) - 1} more: {', '.join(empty[1:4])})" if len(empty) > 1 else "")
                        + f": it has no images ({', '.join(IMAGE_EXTENSIONS)}) but would become a class; "
                          "add its images or remove the folder")
            self.labels = np.array([index[d] for d in self.index.folders], dtype=np.int64)[self.index.folder_of]
        else:
            files = [split_dir / self.index.relpath(i) for i in range(len(self.index))]
            self.labels = np.array(_flat_val_labels(self.root, files, self.classes), dtype=np.int64)
        if not len(self.index):
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
        self.busy = BusySlots()

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(path, label) of every file, built on demand (the dataset itself holds arrays only)."""
        return [(Path(self._dir, self.index.relpath(i)), int(y)) for i, y in enumerate(self.labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, i: int) -> str:
        """The file of sample ``i``."""
        return os.path.join(self._dir, self.index.relpath(i))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str] | tuple[None, int, str]:
        self.busy.enter(i)  # a worker killed while reading it is named by this file (zoo.data.workers)
        try:
            return self._item(i)
        finally:
            self.busy.leave()

    def _item(self, i: int) -> tuple[torch.Tensor, int, str] | tuple[None, int, str]:
        path, label = Path(self._dir, self.index.relpath(i)), int(self.labels[i])
        try:
            raw = path.read_bytes()
        except OSError:  # deleted, unreadable or replaced by a folder since listing: skipped like a corrupt file
            return None, label, str(path)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if self.decode == "device":
            return data, label, str(path)
        from augment.decode import decode_batch

        images, bad = decode_batch([data], "cpu")
        if bad:
            return None, label, str(path)
        return images[0], label, str(path)


def build_dataset(spec: str, split: str = "train", decode: str = "worker", image_size: int = 32) -> Dataset:
    """Dataset from a spec: ``digits``, ``cifar10:<root>``, ``cifar100:<root>``, ``imagefolder:<root>`` or
    ``wds:<shards>`` (WebDataset tar shards: a brace pattern, ``{split}`` for train/val, or a ``zoo data pack`` folder)."""
    name, _, path = spec.partition(":")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "digits":
        return digits_dataset(split, size=image_size)
    if name in ("cifar10", "cifar100"):
        if not path:
            raise ValueError(f"{name} needs a folder: use '{name}:/path/to/folder'")
        return cifar_dataset(path, split, num_classes=int(name[5:]))
    if name == "imagefolder":
        if not path:
            raise ValueError("imagefolder needs a root: use 'imagefolder:/path/to/imagenet'")
        return ImageFolderDataset(path, split, decode=decode)
    if name == "wds":  # WebDataset tar shards (zoo.data.shards)
        from zoo.data.shards import ShardDataset

        return ShardDataset(path, split, decode=decode)
    raise ValueError(f"unknown dataset {spec!r}: use digits, cifar10:<dir>, cifar100:<dir>, imagefolder:<dir> or "
                     "wds:<shards>")


def collate_images(batch: list[tuple]) -> dict[str, Any]:
    """Stack a batch; images of different sizes (or raw bytes) stay a list; undecodable samples are dropped and named."""
    skipped = [item[2] for item in batch if len(item) > 2 and item[0] is None]
    kept = [item for item in batch if item[0] is not None]
    images = [item[0] for item in kept]
    labels = torch.tensor([item[1] for item in kept], dtype=torch.long)
    same = len(images) > 0 and images[0].dim() == 3 and all(im.shape == images[0].shape for im in images)
    return {"image": torch.stack(images) if same else images, "label": labels, "skipped": skipped}
