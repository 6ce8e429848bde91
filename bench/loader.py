"""Decode + two-view BYOL augmentation throughput from a folder of JPEGs.

Ours: raw file bytes -> ``augment.decode.decode_batch`` (nvjpeg batched on GPU, libjpeg on CPU) -> ``byol_views`` on
the variable-size list. Peer: the usual per-image PyTorch data-loader path on one core - PIL decode + torchvision
``transforms.v2`` BYOL pipeline (same preset numbers) for both views. Without ``--folder`` a synthetic folder of
real JPEG files (ImageNet-like sizes, 300-500 px) is written to a temporary directory.

    OMP_NUM_THREADS=1 python bench/loader.py
    python bench/loader.py --device cuda --images 1024 --batch 256 --out gpu_loader.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import augment  # noqa: E402
from augment.decode import decode_batch  # noqa: E402
from bench.common import sync  # noqa: E402


def make_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` real JPEG files with ImageNet-like sizes and natural-ish content (gradients + texture)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(300, 501)), int(rng.integers(300, 501))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w, y / h, (x + y) / (h + w)], -1) * 200 + rng.normal(0, 20, (h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        path = root / f"n{i // 50:08d}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def peer_pipeline(preset: augment.ViewPreset):
    """torchvision.transforms.v2 with the same preset numbers (per image; multiplicative brightness)."""
    from torchvision.transforms import v2

    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(preset.size, scale=preset.crop_scale, ratio=preset.crop_ratio,
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=False),
        v2.RandomHorizontalFlip(preset.flip_p),
        v2.RandomApply([v2.ColorJitter(preset.brightness, preset.contrast, preset.saturation, preset.hue)],
                       p=preset.jitter_p),
        v2.RandomGrayscale(preset.gray_p),
        v2.RandomApply([v2.GaussianBlur(preset.kernel_size, preset.blur_sigma)], p=preset.blur_p),
        v2.RandomSolarize(128, p=preset.solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preset.mean), list(preset.std)),
    ]
    return v2.Compose(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=None, help="folder of JPEGs (searched recursively); default: synthetic")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=None, help="images to use (default 64 CPU, 1024 GPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 256 on GPU")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the images; the best is reported")
    ap.add_argument("--bf16", action="store_true", help="our resampling/blur matmuls in bfloat16 (GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    gpu = device.type == "cuda"
    n = args.images or (1024 if gpu else 64)
    batch = args.batch or (256 if gpu else 32)
    tmp = None
    if args.folder:
        paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
        if not paths:
            raise SystemExit(f"no .jpg/.jpeg files under {args.folder}")
    else:
        tmp = tempfile.TemporaryDirectory()
        paths = make_folder(Path(tmp.name), n)
    n = len(paths)
    v1, v2 = augment.byol_views(args.size, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    g = torch.Generator(device=device).manual_seed(0)

    def ours_pass() -> tuple[float, int]:
        bad_total = 0
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths[s:s + batch]]
            imgs, bad = decode_batch(data, device)
            bad_total += len(bad)
            v1(imgs, g), v2(imgs, g)
        sync(device)
        return time.perf_counter() - t0, bad_total

    from PIL import Image

    p1, p2 = peer_pipeline(v1.preset), peer_pipeline(v2.preset)
    n_peer = min(n, 64)

    def peer_pass() -> float:
        t0 = time.perf_counter()
        for p in paths[:n_peer]:
            with Image.open(p) as im:
                img = im.convert("RGB")
            p1(img), p2(img)
        return time.perf_counter() - t0

    ours_pass()  # warm-up (CUDA context, nvjpeg handles, page cache)
    t_ours, bad = min(ours_pass() for _ in range(args.repeats))
    torch.manual_seed(0)
    peer_pass()
    t_peer = min(peer_pass() for _ in range(args.repeats))
    ours_ips, peer_ips = n / t_ours, n_peer / t_peer
    card = torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu"
    print(f"decode + two BYOL views at {args.size} px, {n} JPEGs ({'given folder' if args.folder else 'synthetic'}), "
          f"{device} ({card}), threads={torch.get_num_threads()}")
    print(f"{'pipeline':<48} {'img/s':>8}")
    print(f"{'ours: decode_batch + byol_views (' + str(device) + ')':<48} {ours_ips:>8.1f}")
    print(f"{'peer: PIL + torchvision.transforms.v2 (1 core)':<48} {peer_ips:>8.1f}")
    result = {"bench": "loader", "device": str(device), "card": card, "threads": torch.get_num_threads(),
              "images": n, "batch": batch, "size": args.size, "bad": bad, "ours_img_s": ours_ips,
              "peer_img_s": peer_ips, "ratio": ours_ips / peer_ips if math.isfinite(peer_ips) else None}
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
