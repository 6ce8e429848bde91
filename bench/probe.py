"""Fast mode vs protocol mode of the linear probe on the same data: wall time and top-1 (ratio last).

Both run the centre-crop-only probe (train view = test view), the case where fast mode must match protocol mode:
same encoder, same held-out lr pick, same batches (EpochShuffleSampler), same schedule. Fast mode runs cold (no
feature cache), so its time includes the one feature-extraction pass.

    OMP_NUM_THREADS=1 python bench/probe.py                       # embedded digits, random convnet_tiny, CPU
    python bench/probe.py --data imagefolder:/data/imagenet100 --backbone ckpt.ckpt --image-size 224 --resize 256
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
    a = ap.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
