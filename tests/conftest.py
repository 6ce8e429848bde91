"""Shared fixtures: tiny ImageNet-layout folders of real JPEG files made from scikit-learn's digits."""
from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported: the DDP tests fork processes, and a fork after MKL/OpenMP started worker threads can
# deadlock the child. One thread per process also keeps the 2-core CI machine from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n01484850"]  # real ImageNet wnids, used as class folder names


def make_imagefolder(root: Path, per_class: int = 6, size: int = 40, val_per_class: int = 3) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` from real digit images (digit i -> class i)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(d.target == c)[(0 if split == "train" else per_class):][:n]
            for j, k in enumerate(idx):
                g = (d.images[k] / 16 * 255).astype(np.uint8)
                rgb = np.stack([g, np.roll(g, 1, 0), 255 - g], -1)  # colourful, so colour ops matter
                w = size + 4 * j  # varying sizes, as in ImageNet
                Image.fromarray(rgb).resize((w, size), Image.BICUBIC).save(folder / f"{wnid}_{j}.JPEG", quality=90)
    return root


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """A 3-class ImageNet-layout folder of real JPEGs (6 train / 3 val per class, varying widths)."""
    return make_imagefolder(tmp_path / "imagenet")
