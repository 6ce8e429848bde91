"""Full BYOL training step (augmentation included): byol-zoo vs lucidrains' byol-pytorch, same encoder and batch.

Ours runs through the real Lightning trainer (what `zoo fit` does); byol-pytorch runs its README loop.
    python bench/byol_step.py                      # CPU: resnet18, 64 px, batch 32
    python bench/byol_step.py --device cuda --encoder resnet50 --size 224 --batch 256 --compile       # per-view forward
    python bench/byol_step.py --device cuda --encoder resnet50 --size 224 --batch 256 --compile step  # whole step
Prints img/s of each and the ratio ours / byol-pytorch (last).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

# The repo root goes first: Python put bench/ on the path, and bench/augment.py must not shadow the augment package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, report, sync, time_steps  # noqa: E402


class RandomImages(Dataset):
    """uint8 images with labels; content does not matter for timing."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 10


class Data(pl.LightningDataModule):
    def __init__(self, n: int, size: int, batch_size: int) -> None:
        super().__init__()
        self.ds, self.batch_size, self.num_classes = RandomImages(n, size), batch_size, 10

    def train_dataloader(self) -> DataLoader:
        from zoo.data import collate_images

        gpu = torch.cuda.is_available()  # on a GPU box, worker processes collate while the GPU computes
        workers = min(8, os.cpu_count() or 1) if gpu else 0
        return DataLoader(self.ds, batch_size=self.batch_size, shuffle=True, drop_last=True, collate_fn=collate_images,
                          pin_memory=gpu, num_workers=workers, persistent_workers=workers > 0)


class StepTimer(pl.Callback):
    """Wall time from the start of the first timed step to the end of the last one: data loading, host-to-device
    copy and Lightning's own overhead are inside it, as in a real ``zoo fit``."""

    def __init__(self, device: str, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.t0 = self.t1 = 0.0
        self.timed = 0

    def on_train_batch_start(self, trainer, module, batch, idx) -> None:
        if idx == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, idx) -> None:
        if idx >= self.warmup:
            sync(self.device)
            self.t1, self.timed = time.perf_counter(), idx - self.warmup + 1

    def seconds_per_step(self) -> float:
        if not self.timed:
            raise RuntimeError("no timed step ran; raise --steps")
        return (self.t1 - self.t0) / self.timed


COMPILE = {None: False, "view": True, "step": "step"}  # --compile -> BYOL(compile=...) and the JSON's "compile"


def ours(args) -> float:
    from byol import BYOL

    model = BYOL(encoder=args.encoder, image_size=args.size, num_classes=10, warmup_steps=1,
                 compile=COMPILE[args.compile])
    timer = StepTimer(args.device, args.warmup)
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=args.warmup + args.steps,
                         precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[timer])
    trainer.fit(model, Data(args.batch * (args.warmup + args.steps), args.size, args.batch))
    return timer.seconds_per_step()


def peer(args) -> float:
    import byol_pytorch
    import zoo

    dev = torch.device(args.device)
    net = zoo.create(args.encoder)
    net.fc = torch.nn.Identity()  # byol-pytorch hooks a layer; ours has no classifier, so hook the pooled output
    learner = byol_pytorch.BYOL(net, image_size=args.size, hidden_layer=-1, use_simplicial_embeddings=False).to(dev)
    if args.device == "cuda":
        learner = learner.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
    data = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)

    def step() -> None:
        images = data.to(dev, non_blocking=True).float().div_(255)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = learner(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        learner.update_moving_average()

    return time_steps(step, args.steps, args.warmup, args.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", nargs="?", const="view", default=None, choices=["view", "step"],
                   help="BYOL(compile=True) (view: the per-view forward) or compile='step' (the whole step)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_peer = peer(args)
    t_ours = ours(args)
    ips_ours, ips_peer = args.batch / t_ours, args.batch / t_peer
    report(f"BYOL step, {args.encoder} {args.size}px batch {args.batch} on {machine(args.device)}"
           f"{f' (compiled: {args.compile})' if args.compile else ''}",
           [("byol-zoo (Lightning, aug included)", ips_ours, "img/s"), ("byol-pytorch 0.9.1", ips_peer, "img/s"),
            ("ratio ours / byol-pytorch", ips_ours / ips_peer, "x")],
           {"bench": "byol_step", "machine": machine(args.device), "encoder": args.encoder, "size": args.size,
            "batch": args.batch, "compile": COMPILE[args.compile], "ours_img_s": round(ips_ours, 2),
            "byol_pytorch_img_s": round(ips_peer, 2), "ratio": round(ips_ours / ips_peer, 3)}, args.out)


if __name__ == "__main__":
    main()
