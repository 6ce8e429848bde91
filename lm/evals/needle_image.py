"""Multimodal needle in a haystack (after Gemini 1.5's multimodal retrieval): K images in one sequence, each labelled
by its index in text, then a question about image j; accuracy over K (context length) and depth (j's place).

    image 1: <image>. image 2: <image>. ... image K: <image>. which digit is image j? -> " 7"

Images come from the held-out split of an ``InterleavedDataModule`` (never seen in training). A cell (K, depth)
asks about image ``j = round(depth * (K - 1)) + 1`` in ``trials`` sequences with other images; its score is the
exact-match accuracy of greedy generation. ``image_needle`` returns one row per cell; ``write_image_needle_report``
writes needle_image.csv, needle_image.md (depth x K grid, accuracy per K) and needle_image.png (heatmap).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lm.evals.report import write_grid_report
from zoo.data.interleaved import IMAGE_MARKER, encode_interleaved, fit_image
from zoo.train.progress import track

__all__ = ["needle_prompt", "image_needle", "image_needle_for_model", "write_image_needle_report"]


def needle_prompt(k: int, j: int) -> str:
    """The text of a K-image needle sequence asking about image ``j`` (1-based)."""
    return " ".join(f"image {i + 1}: {IMAGE_MARKER}." for i in range(k)) + f" which digit is image {j}?"


def image_needle(generate: Callable[[Tensor, Tensor, int], Tensor], dm: Any, counts: Sequence[int],
                 depths: Sequence[float], trials: int = 10, seed: int = 0,
                 max_seq_len: int | None = None) -> list[dict[str, Any]]:
    """Accuracy per (K, depth) cell of ``generate(prompts [B, T], images [N, 3, S, S], max_new_tokens)`` (which
    returns prompt + new tokens) on held-out images of the set-up data module ``dm``; one row per cell."""
    counts, depths = [int(c) for c in counts], [float(d) for d in depths]
    if not counts or min(counts) < 1:
        raise ValueError(f"image counts must be >= 1, got {counts}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be in [0, 1], got {depths}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if dm.val_set is None:
        dm.setup()
    pool, labels, classes = dm.val_set.pool, dm.val_set.labels, dm.val_set.classes
    tokens, tpi = dm.image_tokens, dm.tokens_per_image
    rng = np.random.default_rng(seed)
    cells = []
    for k in counts:
        for depth in depths:
            j = int(round(depth * (k - 1))) + 1
            batch = []
            for _ in range(trials):
                idx = rng.choice(len(pool), size=k, replace=len(pool) < k).tolist()
                answer = f" {classes[labels[idx[j - 1]]]}"
                ids, n_prompt = encode_interleaved(needle_prompt(k, j), answer, k, dm.tokenizer, tokens, tpi)
                batch.append((ids, n_prompt, idx))
            length = len(batch[0][0])
            if max_seq_len is not None and length > max_seq_len:
                raise ValueError(f"K={k} images make a {length}-token sequence (tokens_per_image={tpi}) but the "
                                 f"model's max_seq_len={max_seq_len}; use image counts up to the model's length")
            cells.append((k, depth, j, length, batch))
    rows = []
    for k, depth, j, length, batch in track(cells, "image needle cells"):
        n_prompt = batch[0][1]
        prompts = torch.tensor([ids[:n_prompt] for ids, _, _ in batch], dtype=torch.long)
        images = torch.stack([fit_image(pool[i][0], dm.image_size, dm.resize, f"{i} of the pool")
                              for _, _, idx in batch for i in idx])
        want = [ids[n_prompt:] for ids, _, _ in batch]
        out = generate(prompts, images, max(len(w) for w in want)).cpu().tolist()
        correct = sum(int(o[n_prompt: n_prompt + len(w)] == w) for o, w in zip(out, want))
        rows.append({"images": k, "depth": depth, "asked": j, "length": length, "correct": correct,
                     "trials": len(batch), "accuracy": correct / len(batch)})
    return rows


def image_needle_for_model(model: Any, dm: Any, counts: Sequence[int], depths: Sequence[float], trials: int = 10,
                           seed: int = 0, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """``image_needle`` with a zoo MultimodalDecoder's greedy, cached generation on ``device``."""
    model = model.to(device).eval()

    def generate(prompts: Tensor, images: Tensor, new: int) -> Tensor:
        return model.generate(prompts.to(device), images.to(device), new)

    return image_needle(generate, dm, counts, depths, trials, seed, max_seq_len=model.config.max_seq_len)


def write_image_needle_report(rows: Sequence[dict[str, Any]], out_dir: str | Path,
                              title: str = "multimodal needle") -> dict[str, Path]:
    """Write needle_image.csv (every cell), needle_image.md (accuracy grid, depth x K) and needle_image.png."""
    if not rows:
        raise ValueError("no needle results to report (an empty image-count or depth grid)")
    counts, depths = sorted({r["images"] for r in rows}), sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(counts)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), counts.index(r["images"])] = r["accuracy"]
    lengths = {r["images"]: r["length"] for r in rows}
    lines = [f"# {title}", "", "| depth \\ images (tokens) | " + " | ".join(f"{k} ({lengths[k]})" for k in counts)
             + " |", "|---|" + "---|" * len(counts)]
    for i, d in enumerate(depths):
        lines.append(f"| {d:.0%} | " + " | ".join(f"{v:.0%}" for v in grid[i]) + " |")
    lines.append("| mean | " + " | ".join(f"{v:.0%}" for v in np.nanmean(grid, axis=0)) + " |")
    total = sum(r["trials"] for r in rows)
    lines += ["", f"overall accuracy: {sum(r['correct'] for r in rows) / total:.1%} over {total} sequences"]
    return write_grid_report(rows, out_dir, "needle_image", lines, grid, lambda v: f"{v:.0%}",
                             [f"{k}\n({lengths[k]})" for k in counts], [f"{d:.0%}" for d in depths],
                             "images in the sequence (tokens)", "depth of the asked image", title, base_width=1.4)
