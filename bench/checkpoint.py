"""Cost of the default periodic checkpoint: save time and size of a ResNet-50 BYOL checkpoint (online and target
networks, LARS momentum, through the same ``AtomicCheckpointIO`` every run uses: torch.save, fsync, rename) and its
share of the default 30-minute interval.

    python -m bench.checkpoint [--repeats 3] [--out /tmp/bench_ckpt]

The digits-run overhead (default checkpointing on vs off) is measured with ``zoo fit`` itself (see BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def build_checkpoint() -> dict:
    """A checkpoint shaped like a real ``zoo fit`` one for the ImageNet ResNet-50 config (heads 4096 -> 256)."""
    from byol import BYOL
    from zoo.train.optim import LARS, lars_param_groups

    model = BYOL(encoder="resnet50", image_size=224, projector_hidden=4096, projection_dim=256, num_classes=1000)
    model.configure_model() if hasattr(model, "configure_model") else None
    opt = LARS(lars_param_groups(model.named_parameters()), lr=0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # populates the momentum buffers
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1, "epoch": 0}


def main() -> None:
    """Print the save time (median of --repeats), the file size and the share of a 30-minute interval."""
    from zoo.train.checkpointing import CHECKPOINT_EVERY_MINUTES, AtomicCheckpointIO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder to write into (default: a temporary folder)")
    args = ap.parse_args()
    ckpt = build_checkpoint()
    n_params = sum(t.numel() for t in ckpt["state_dict"].values() if t.is_floating_point())
    io = AtomicCheckpointIO()
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        path = os.path.join(folder, "last.ckpt")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            io.save_checkpoint(ckpt, path)
            times.append(time.perf_counter() - t0)
        size = os.path.getsize(path)
    med = statistics.median(times)
    share = med / (60 * CHECKPOINT_EVERY_MINUTES)
    print(f"ResNet-50 BYOL checkpoint: {n_params / 1e6:.1f}M float values in state_dict, file {size / 2**20:.0f} MiB; "
          f"save {med:.2f} s (median of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)}); "
          f"{100 * share:.3f}% of a {CHECKPOINT_EVERY_MINUTES:.0f}-minute interval; torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
