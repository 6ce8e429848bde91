"""Fast mode vs protocol mode of the linear probe on the same data: wall time and top-1 (ratio last).

Both run the centre-crop-only probe (train view = test view), the case where fast mode must match protocol mode:
same encoder, same held-out lr pick, same batches (EpochShuffleSampler), same schedule. Fast mode runs cold (no
feature cache), so its time includes the one feature-extraction pass.

    OMP_NUM_THREADS=1 python bench/probe.py                       # embedded digits, random convnet_tiny, CPU
    python bench/probe.py --data imagefolder:/data/imagenet100 --backbone ckpt.ckpt --image-size 224 --resize 256

``--scale N`` measures the probe at scale on N synthetic images instead: extraction img/s into the memory-mapped
store with 1 and with ``--devices`` processes (``zoo.eval.distributed``), the fast probe's peak RSS against the bytes
of its features, the wall time of a k-lr grid of heads on features trained in one pass (one read of each batch, shared
by every head) against k separate passes, and the same for protocol mode on ``--protocol-n`` images: one pass of
the frozen encoder for the k grid heads and the k final heads against k one-lr passes (each its own frozen forward).

    python bench/probe.py --scale 20000 --backbone random:resnet18 --image-size 32 --resize 32 --lr 0.1 0.2 0.4 0.8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# `python bench/probe.py` puts bench/ first on sys.path, where bench/augment.py would shadow the augment package:
# the repository goes first, bench/ last (for bench/common.py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]


def _device_name(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def main(argv: list[str] | None = None) -> int:
    """Run both modes and print a table and one JSON line; the speed ratio is the last field."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="random:convnet_tiny")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.4])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--resize", type=int, default=32)
    ap.add_argument("--feature-norm", default="batchnorm", choices=("none", "batchnorm"))
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="also write the JSON line to this file")
    ap.add_argument("--scale", type=int, default=0, help="measure the probe at scale on this many synthetic images")
    ap.add_argument("--devices", type=int, default=2, help="--scale: extraction processes (or GPUs) to compare with 1")
    ap.add_argument("--protocol-n", type=int, default=1000, help="--scale: images of the protocol one-pass timing")
    ap.add_argument("--protocol-epochs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.scale:
        return scale(a)

    from zoo.data.images import build_dataset
    from zoo.eval.probe import ProbeConfig, evaluate
    from zoo.weights import load_backbone

    enc = load_backbone(a.backbone)
    train = build_dataset(a.data, "train", image_size=a.image_size)
    test = build_dataset(a.data, "val", image_size=a.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ProbeConfig(epochs=a.epochs, batch_size=a.batch_size, lr_grid=tuple(a.lr), heldout=0.1,
                          image_size=a.image_size, resize=a.resize, train_augment="center_crop",
                          feature_norm=a.feature_norm, num_workers=a.num_workers, cache_dir=None, progress=False,
                          device=a.device, data_image_size=a.image_size)
        t0 = time.perf_counter()
        fast = evaluate(enc, train, test, "fast", cfg, data_id=a.data)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        proto = evaluate(enc, train, test, "protocol", cfg, out=tmp)
        t_proto = time.perf_counter() - t0
    from common import machine, report

    device = machine(_device_name(a.device))
    diff = abs(fast["top1"] - proto["top1"])
    title = (f"probe bench: {a.backbone} on {a.data} ({len(train)} train / {len(test)} test images), "
             f"{a.epochs} epochs, batch {a.batch_size}, lr grid {a.lr}, centre-crop probe, {device}")
    rows = [("fast mode: seconds (features once + linear on features)", t_fast, "s"),
            ("protocol mode: seconds (Lightning, encoder every step)", t_proto, "s"),
            ("fast mode: top-1", fast["top1"], "%"),
            ("protocol mode: top-1", proto["top1"], "%"),
            ("top-1 difference", diff, "points"),
            ("protocol / fast time", t_proto / t_fast, "x")]
    report(title, rows, {"bench": "probe", "backbone": a.backbone, "data": a.data, "epochs": a.epochs,
                         "lr_grid": a.lr, "device": device, "fast_s": round(t_fast, 3), "protocol_s": round(t_proto, 3),
                         "fast_top1": fast["top1"], "protocol_top1": proto["top1"], "top1_diff": diff,
                         "ratio": round(t_proto / t_fast, 2)}, a.out)
    return 0


class _Synthetic(torch.utils.data.Dataset):
    """``n`` deterministic random uint8 images of 10 classes (content derived from the index: no RAM held)."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.seed, self.classes = n, size, seed, list(range(10))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 10_000_019 + i)
        return torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=g), i % 10


def scale(a: argparse.Namespace) -> int:
    """Extraction rate, peak RSS / feature bytes and one-pass vs k-pass grid time on ``a.scale`` synthetic images."""
    import resource

    from zoo.eval.linear import train_heads
    from zoo.eval.probe import ProbeConfig, evaluate
    from zoo.eval.store import FeatureStore
    from zoo.weights import load_backbone

    enc = load_backbone(a.backbone)
    n_test = max(a.scale // 5, 10)
    train, test = _Synthetic(a.scale, a.image_size, 0), _Synthetic(n_test, a.image_size, 1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ProbeConfig(epochs=a.epochs, batch_size=a.batch_size, lr_grid=tuple(a.lr), image_size=a.image_size,
                          resize=a.resize, num_workers=a.num_workers, cache_dir=None, progress=False,
                          device=a.device, feature_dtype="float32")
        small = ProbeConfig(**{**cfg.__dict__, "epochs": 1})
        evaluate(enc, _Synthetic(64, a.image_size, 2), _Synthetic(16, a.image_size, 3), "fast", small,
                 out=f"{tmp}/warm")  # imports and allocator warm-up, outside the peak
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        res = evaluate(enc, train, test, "fast", cfg, out=f"{tmp}/run")
        t_fast = time.perf_counter() - t0
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        store = FeatureStore(f"{tmp}/run/features/train", {}, a.scale)
        feats = FeatureStore(store.root, __import__("json").loads((store.root / "key.json").read_text())["key"],
                             a.scale).load()
        dim = feats.dim
        feat_mib = (a.scale + n_test) * dim * 4 / 2**20
        t0 = time.perf_counter()
        train_heads(feats, 10, list(a.lr), a.epochs, a.batch_size)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        for lr in a.lr:
            train_heads(feats, 10, [lr], a.epochs, a.batch_size)
        t_sep = time.perf_counter() - t0
        del feats
        split = ProbeConfig(**{**cfg.__dict__, "devices": a.devices, "cache_dir": f"{tmp}/split"})
        one = ProbeConfig(**{**cfg.__dict__, "cache_dir": f"{tmp}/one"})
        rates = {}
        for name, c in (("1", one), (str(a.devices), split))[:2 if a.devices > 1 else 1]:  # kNN: extraction, then a cheap pass over the bank
            r = evaluate(enc, train, test, "knn", c)
            rates[name] = (a.scale + n_test) / r["seconds"]["features"]
        t_proto_one, t_proto_sep = _protocol_passes(enc, a, cfg, tmp)
    from common import machine, report

    device = machine(_device_name(a.device))
    extract_rate = (a.scale + n_test) / res["seconds"]["features"]
    title = (f"probe at scale: {a.backbone}, {a.scale} + {n_test} synthetic {a.image_size}px images, {dim}-d float32 "
             f"features, {a.epochs} epochs, batch {a.batch_size}, {len(a.lr)}-lr grid, {device}")
    rows = [("extraction (1 process): images / s", extract_rate, "img/s"),
            ("extraction, 1 process (kNN run): images / s", rates["1"], "img/s"),
            *([(f"extraction, {a.devices} processes (kNN run): images / s", rates[str(a.devices)], "img/s")]
              if a.devices > 1 else []),
            (f"protocol, {a.protocol_n} images x {a.protocol_epochs} epochs: {len(a.lr)} grid + {len(a.lr)} final "
             "heads, one pass", t_proto_one, "s"),
            (f"protocol: {len(a.lr)} one-lr passes (a forward each)", t_proto_sep, "s"),
            ("protocol: k passes / one pass", t_proto_sep / t_proto_one, "x"),
            ("fast probe wall time (extraction + grid + final head)", t_fast, "s"),
            ("fast probe peak RSS over baseline", peak_mib, "MiB"),
            ("features on disk (train + test, float32)", feat_mib, "MiB"),
            (f"{len(a.lr)}-lr grid of heads, one pass", t_one, "s"),
            (f"{len(a.lr)}-lr grid of heads, {len(a.lr)} passes", t_sep, "s"),
            ("peak RSS / feature bytes", peak_mib / feat_mib, "x"),
            ("k passes / one pass", t_sep / t_one, "x")]
    report(title, rows, {"bench": "probe_scale", "backbone": a.backbone, "n": a.scale, "dim": dim,
                         "device": device, "extract_img_s": round(extract_rate, 1), "fast_s": round(t_fast, 2),
                         "peak_rss_mib": round(peak_mib, 1), "feature_mib": round(feat_mib, 1),
                         "grid_one_pass_s": round(t_one, 2), "grid_k_passes_s": round(t_sep, 2),
                         "rss_over_features": round(peak_mib / feat_mib, 2), "extract_img_s_1proc": round(rates["1"], 1),
                         f"extract_img_s_{a.devices}proc": round(rates[str(a.devices)], 1),  # same key at 1
                         "extract_devices": a.devices, "protocol_n": a.protocol_n,
                         "protocol_one_pass_s": round(t_proto_one, 2), "protocol_k_passes_s": round(t_proto_sep, 2),
                         "protocol_ratio": round(t_proto_sep / t_proto_one, 2),
                         "ratio": round(t_sep / t_one, 2)}, a.out)
    return 0


def _protocol_passes(enc, a: argparse.Namespace, cfg, tmp: str) -> tuple[float, float]:
    """Wall time of protocol mode's one pass for the k-lr grid (k grid + k final heads behind one frozen forward per
    batch) against k one-lr passes, on ``a.protocol_n`` synthetic images (random-resized-crop train view)."""
    from zoo.eval.probe import ProbeConfig, evaluate

    train, test = _Synthetic(a.protocol_n, a.image_size, 4), _Synthetic(max(a.protocol_n // 10, 10), a.image_size, 5)
    base = {**cfg.__dict__, "epochs": a.protocol_epochs, "heldout": 0.1}
    t0 = time.perf_counter()
    evaluate(enc, train, test, "protocol", ProbeConfig(**{**base, "lr_grid": tuple(a.lr)}), out=f"{tmp}/proto_one")
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lr in a.lr:
        evaluate(enc, train, test, "protocol", ProbeConfig(**{**base, "lr_grid": (lr,)}), out=f"{tmp}/proto_{lr}")
    return t_one, time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
