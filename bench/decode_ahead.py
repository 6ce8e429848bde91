"""``decode: device`` step time: bytes moved then decoded in the step (before) vs decoded one step ahead (now).

    python bench/decode_ahead.py --device cuda --images 512 --batch 128 --out decode_ahead.json
    python bench/decode_ahead.py --device cpu --images 16 --batch 4 --size 32 --steps 2 --model tiny  (plumbing)

A synthetic folder of real JPEGs (``bench/loader.py``'s, 300-500 px) is read by the project's loader
(``ImageFolderDataset(decode="device")``, ``collate_with_paths``, pinned on a GPU). Each step is a fixed stand-in for
training: a ResNet-50 forward + backward at ``--size`` on the batch, which also reads every decoded image, and one
host sync per step (``loss.item()``, as the NaN guard does). Per step, three ways:

* ``step only``: the step on data already on the device (the floor);
* ``before``: what ``decode: device`` did: the byte tensors moved to the device (Lightning's transfer), then
  ``decode_batch`` in the training stream, which copies each one back to the host before nvjpeg reads it;
* ``ahead``: ``zoo.data.prefetch.DevicePrefetcher``: bytes pinned once, nvjpeg in a side stream one batch ahead.

The peer column of the BENCHMARKS.md row is ``before``; the ratio is before / ahead step time (higher is better).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, report, sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224, help="side of the step's input")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per way (default: one pass over the images, less the untimed first batch)")
    ap.add_argument("--model", choices=["resnet50", "tiny"], default="resnet50",
                    help="the step's network (tiny: one conv, for the CPU smoke run)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default 8 on a GPU, 0 on CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from torch.utils.data import DataLoader
    from torchvision.models import resnet50

    from augment.decode import decode_batch
    from bench.loader import make_folder
    from zoo.data.images import ImageFolderDataset
    from zoo.data.loaders import collate_with_paths
    from zoo.data.prefetch import DevicePrefetcher

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    workers = args.workers if args.workers is not None else (8 if gpu else 0)
    tmp = tempfile.TemporaryDirectory()
    make_folder(Path(tmp.name) / "train", args.images)
    ds = ImageFolderDataset(tmp.name, "train", decode="device")
    model = resnet50(num_classes=10) if args.model == "resnet50" else torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)

    def step(images: list[torch.Tensor] | None) -> None:
        touch = sum(im.float().mean() for im in images) * 0 if images else 0.0  # the step reads every image
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(x).float().logsumexp(-1).mean() + touch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # one host sync per step, as the training loop's NaN guard does

    def batches():
        return iter(DataLoader(ds, batch_size=args.batch, shuffle=False, num_workers=workers, drop_last=True,
                               collate_fn=collate_with_paths, pin_memory=gpu, persistent_workers=False))

    def before(batch):
        moved = [b.to(device, non_blocking=True) for b in batch["image"]]  # Lightning's transfer of the byte list
        return decode_batch(moved, device)[0]

    steps = args.steps or max(1, args.images // args.batch - 1)  # one pass: no worker start-up inside the timing

    def timed(way: str) -> float:
        it = DevicePrefetcher(batches(), device) if way == "ahead" else batches()
        done, t0 = 0, None
        while done < steps + 1:  # the first step (workers starting, cudnn picking) is not timed
            try:
                batch = next(it)
            except StopIteration:
                it = DevicePrefetcher(batches(), device) if way == "ahead" else batches()
                continue
            step(batch["image"] if way == "ahead" else before(batch) if way == "before" else None)
            done += 1
            if done == 1:
                sync(device)
                t0 = time.perf_counter()
        sync(device)
        if way == "ahead":
            it.close()
        return (time.perf_counter() - t0) / steps

    t_floor = timed("step only")
    t_before = timed("before")
    t_ahead = timed("ahead")
    t_before = min(t_before, timed("before"))  # best of two each: the order of the ways does not favour one
    t_ahead = min(t_ahead, timed("ahead"))
    card = machine(str(device))
    rows = [("step only (floor)", 1e3 * t_floor, "ms/step"), ("before: moved, decoded in step", 1e3 * t_before,
            "ms/step"), ("ahead: pinned, side stream", 1e3 * t_ahead, "ms/step")]
    result = {"bench": "decode_ahead", "device": str(device), "card": card, "images": args.images, "model": args.model,
              "batch": args.batch, "size": args.size, "workers": workers, "steps": steps,
              "floor_ms": 1e3 * t_floor, "before_ms": 1e3 * t_before, "ahead_ms": 1e3 * t_ahead,
              "before_overhead": (t_before - t_floor) / t_before, "ahead_overhead": (t_ahead - t_floor) / t_ahead,
              "ratio": t_before / t_ahead}
    report(f"decode: device, {args.images} JPEGs, batch {args.batch}, {card}", rows, result, args.out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
