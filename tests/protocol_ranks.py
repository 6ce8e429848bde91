"""Driver of ``test_probe_protocol_devices``: one protocol probe of a tiny encoder on digits, run as a script because
``--devices N`` makes Lightning start the other ranks by running this very command again.

``python tests/protocol_ranks.py OUT DEVICES BATCH [SIGNAL_AT]``: the probe with ``DEVICES`` processes of ``BATCH``
images each; with ``SIGNAL_AT``, rank 0 sends itself SIGTERM when it prepares its ``SIGNAL_AT``-th training batch
(as a scheduler's preemption would). Rank 0 prints the figures as one JSON line.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch.utils.data import Subset

import zoo
from zoo.data.images import digits_dataset
from zoo.eval.distributed import is_main_process
from zoo.eval.features import ImagePrepare
from zoo.eval.probe import ProbeConfig, evaluate

N_TRAIN, N_TEST = 199, 61  # odd: a rank's share of the last batch is padded, and must not count twice


class SignalAt:
    """The train view (rows of the global batch drawn as one device draws them), signalling rank 0 at batch ``at``."""

    def __init__(self, at: int) -> None:
        self.view, self.at, self.calls = ImagePrepare(16, 16, train=True), at, 0
        self.collate = self.view.collate

    def __call__(self, batch, generator=None, rows=None):
        self.calls += 1
        if self.calls == self.at and is_main_process():
            os.kill(os.getpid(), signal.SIGTERM)
        return self.view(batch, generator, rows=rows)


def main() -> None:
    import zoo.eval.distributed as distributed

    cpus = distributed.cpu_count()
    distributed.cpu_count = lambda: max(cpus, 2)  # a 1-CPU runner still runs the two processes (slowly)
    out, devices, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.manual_seed(0)
    encoder = zoo.create("convnet_tiny")
    cfg = ProbeConfig(epochs=4, batch_size=batch, lr_grid=(0.05, 0.2), heldout=0.25, image_size=16, resize=16,
                      num_workers=0, extract_batch_size=16, cache_dir=None, progress=False, feature_norm="batchnorm",
                      devices=devices)
    train, test = Subset(digits_dataset("train", 16), range(N_TRAIN)), Subset(digits_dataset("val", 16), range(N_TEST))
    res = evaluate(encoder, train, test, "protocol", cfg, prepare_train=SignalAt(at), out=out)
    if is_main_process():
        print(json.dumps({k: res[k] for k in ("top1", "top5", "base_lr", "heldout_top1", "counts")}), flush=True)


if __name__ == "__main__":
    main()
