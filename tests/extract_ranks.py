"""Driver of ``test_probe_devices``' preemption test: a kNN probe whose feature extraction is spread over 2 spawned
CPU ranks and slowed down (each image takes ``DELAY`` seconds to read), so that a signal lands mid-extraction.

``python tests/extract_ranks.py CACHE_DIR`` prints ``done`` when the probe finishes.
"""
from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import Dataset, Subset

import zoo
import zoo.eval.distributed as distributed
from zoo.data.images import digits_dataset
from zoo.eval.probe import ProbeConfig, evaluate

DELAY = 0.02


class SlowImages(Dataset):
    """``dataset`` with every read taking ``DELAY`` seconds more (a slow file system)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        time.sleep(DELAY)
        return self.dataset[i]


def main() -> None:
    cpus = distributed.cpu_count()
    distributed.cpu_count = lambda: max(cpus, 2)  # a 1-CPU runner still runs the two processes
    cfg = ProbeConfig(knn_k=(5,), image_size=16, resize=16, num_workers=0, extract_batch_size=8, shard_rows=8,
                      cache_dir=sys.argv[1], progress=False, feature_dtype="float32", devices=2)
    train = SlowImages(Subset(digits_dataset("train", 16), range(240)))
    test = SlowImages(Subset(digits_dataset("val", 16), range(40)))
    torch.manual_seed(0)  # the same encoder in every run: the feature cache is keyed by its weights
    evaluate(zoo.create("convnet_tiny", widths=[8, 16, 16, 32]), train, test, "knn", cfg)
    print("done", flush=True)


if __name__ == "__main__":
    main()
