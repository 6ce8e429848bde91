"""Language-model evaluations: needle in a haystack (Gemini 1.5 protocol) and held-out perplexity / bits per byte.

Command line (wired as ``zoo eval ...``)::

    zoo eval needle --model runs/lm/stdlib_gemma2_tiny --lengths 128,256,512 --depths 0,0.25,0.5,0.75,1 --out DIR
    zoo eval ppl --model runs/lm/stdlib_gemma2_tiny --config configs/lm/stdlib_gemma2_tiny.yaml

``--model`` takes a zoo model name (random weights) or a CausalLM / Distill checkpoint or run folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sysconfig
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

CITIES = ("Chicago", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Dublin", "Hanoi", "Nairobi", "Quito", "Perth",
          "Seoul", "Vienna", "Havana", "Kyoto", "Denver")
NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "\nWhat is the special magic {city} number? The special magic {city} number is: "


# ----------------------------------------------------------------------------------------------------------------
# Needle in a haystack
# ----------------------------------------------------------------------------------------------------------------
def default_haystack() -> str:
    """Offline haystack prose: the Python distribution's LICENSE text (falls back to the stdlib's os.py)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("LICENSE.txt", "os.py"):
        if (stdlib / name).is_file():
            return (stdlib / name).read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(f"no haystack text found in {stdlib}; pass --haystack PATH")


def build_needle_prompt(tokenizer: Any, haystack_ids: Sequence[int], length: int, depth: float, city: str,
                        number: int) -> tuple[list[int], int]:
    """Prompt of ``length`` tokens: haystack repeated to fill, the needle at ``depth`` (0..1), then the question.

    Returns the ids and the token offset of the needle. The needle goes at the start of the line containing the
    depth point when one begins within 200 tokens before it, so it reads as its own sentence.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be between 0 and 1")
    if not haystack_ids:
        raise ValueError("haystack text is empty; pass a haystack with some text")
    needle = tokenizer.encode(" " + NEEDLE.format(city=city, number=number) + "\n")
    question = tokenizer.encode(QUESTION.format(city=city))
    budget = length - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"context length {length} is too short for the needle and question "
                         f"({len(needle) + len(question)} tokens); use lengths >= {len(needle) + len(question)}")
    reps = budget // len(haystack_ids) + 1
    hay = (list(haystack_ids) * reps)[:budget]
    pos = round(depth * budget)
    newline = tokenizer.encode("\n")
    if len(newline) == 1 and 0 < pos < budget:
        for back in range(0, min(200, pos)):
            if hay[pos - back - 1] == newline[0]:
                pos -= back
                break
    return hay[:pos] + needle + hay[pos:] + question, pos


@torch.no_grad()
def greedy_continue(model: nn.Module, ids: list[int], max_new_tokens: int, device: torch.device | str) -> list[int]:
    """Greedy continuation (the model's own KV-cached ``generate`` when it has one)."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    if hasattr(model, "generate"):
        return model.generate(x, max_new_tokens)[0, len(ids):].tolist()
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = model(x)[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        x = torch.cat((x, nxt), dim=1)
    return out


def needle_in_haystack(model: nn.Module, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                       haystack: str | None = None, seed: int = 0, device: str | torch.device = "cpu",
                       max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """Score every (length, depth) cell: does the greedy answer contain the needle's number? One row per cell."""
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    rng = random.Random(seed)
    hay_ids = tokenizer.encode(haystack if haystack is not None else default_haystack())
    model = model.to(device).eval()
    rows = []
    for length in lengths:
        for depth in depths:
            city, number = rng.choice(CITIES), rng.randint(1_000_000, 9_999_999)  # 7 digits, as in Gemini 1.5
            new = max_new_tokens or len(tokenizer.encode(f" {number}")) + 4
            if max_len is not None and length + new > max_len:
                raise ValueError(f"context length {length} + {new} answer tokens exceeds the model's "
                                 f"max_seq_len={max_len}; use --lengths up to {max_len - new}")
            prompt, pos = build_needle_prompt(tokenizer, hay_ids, length, depth, city, number)
            answer = tokenizer.decode(greedy_continue(model, prompt, new, device))
            rows.append({"length": length, "depth": depth, "city": city, "number": number, "needle_token": pos,
                         "answer": answer, "found": int(str(number) in answer)})
    return rows


def write_needle_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "needle in a haystack"
                        ) -> dict[str, Path]:
    """Write needle.csv (every cell), needle.md (depth x length grid + recall) and needle.png (heatmap)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["found"]
    paths = {"csv": out / "needle.csv", "md": out / "needle.md", "png": out / "needle.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", "", "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for i, d in enumerate(depths):
        lines.append(f"| {d:.0%} | " + " | ".join("found" if v == 1 else "missed" for v in grid[i]) + " |")
    recall = np.nanmean(grid, axis=0)
    lines.append("| recall | " + " | ".join(f"{v:.0%}" for v in recall) + " |")
    lines += ["", f"overall recall: {np.nanmean(grid):.1%} over {len(rows)} cells"]
    paths["md"].write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, "found" if grid[i, j] == 1 else "missed", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Perplexity / bits per byte
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_perplexity(model: nn.Module, datamodule: Any, max_batches: int | None = None,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """Token-weighted loss, perplexity and bits per byte of ``model`` on the data module's held-out split."""
    from lm.causal_lm import check_data_fits, split_batch, token_nll
    from lm.metrics import bits_per_byte

    datamodule.setup("validate")
    check_data_fits(type(model).__name__, model.config, datamodule.vocab_size, datamodule.seq_len,
                    datamodule.tokenizer_spec)
    model = model.to(device).eval()
    total, n = 0.0, 0
    for i, batch in enumerate(datamodule.val_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        nll = token_nll(model, split_batch(batch)[1].to(device))
        total += float(nll.double().sum())
        n += nll.numel()
    if n == 0:
        raise ValueError("the held-out split produced no batches; lower seq_len or give a larger corpus")
    loss = total / n
    return {"loss": loss, "ppl": math.exp(loss), "bpb": float(bits_per_byte(loss, datamodule.bytes_per_token("val"))),
            "tokens": n}


def byte_unigram_baseline(datamodule: Any) -> dict[str, float]:
    """Unigram byte model of the corpus in bits per byte: train-split entropy, and its cross-entropy on val.

    Needs the byte tokenizer (ids 0..255 are the bytes; separators are not bytes and are left out). Val uses
    add-one smoothing of the train counts so an unseen byte costs finite bits.
    """
    datamodule.setup("validate")
    counts = {}
    for split, ds in (("train", datamodule.train_set), ("val", datamodule.val_set)):
        toks = np.asarray(ds.tokens())
        counts[split] = np.bincount(toks[toks < 256].astype(np.int64), minlength=256).astype(np.float64)
    if datamodule.vocab_size > 512 or counts["train"].sum() == 0:
        raise ValueError("byte_unigram_baseline needs the byte tokenizer (tokenizer: byte)")
    p = counts["train"] / counts["train"].sum()
    nz = p > 0
    q = (counts["train"] + 1) / (counts["train"].sum() + 256)
    val = counts["val"] / max(1.0, counts["val"].sum())
    return {"train_entropy_bpb": float(-(p[nz] * np.log2(p[nz])).sum()),
            "val_cross_entropy_bpb": float(-(val * np.log2(q)).sum())}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _data_args_from_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    data = cfg.get("data") or {}
    return dict(data.get("init_args") or {})


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """``zoo eval needle|ppl ...``: run one evaluation, print a table and a JSON line, return an exit code."""
    from lm.causal_lm import load_lm

    parser = argparse.ArgumentParser(prog="zoo eval", description="language-model evaluations")
    sub = parser.add_subparsers(dest="eval", required=True)
    nd = sub.add_parser("needle", help="needle in a haystack (Gemini 1.5 protocol)")
    nd.add_argument("--model", required=True, help="zoo model name, .ckpt file, or run folder")
    nd.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or a SentencePiece .model")
    nd.add_argument("--lengths", default="128,256,512", help="comma-separated context lengths in tokens")
    nd.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    nd.add_argument("--haystack", default=None, help="text file to repeat as haystack (default: Python's LICENSE)")
    nd.add_argument("--out", default="runs/eval/needle", help="folder for needle.csv / .md / .png")
    nd.add_argument("--seed", type=int, default=0)
    nd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pp = sub.add_parser("ppl", help="perplexity and bits per byte on the held-out split")
    pp.add_argument("--model", required=True, help="zoo model name, .ckpt file, or run folder")
    pp.add_argument("--config", default=None, help="a `zoo fit` YAML whose data.init_args define the corpus/split")
    pp.add_argument("--paths", nargs="*", default=None, help="text files / folders / globs (default: stdlib)")
    pp.add_argument("--tokenizer", default=None)
    pp.add_argument("--seq-len", type=int, default=None)
    pp.add_argument("--max-bytes", type=int, default=None)
    pp.add_argument("--batch-size", type=int, default=None)
    pp.add_argument("--max-batches", type=int, default=None)
    pp.add_argument("--cache-dir", default=None)
    pp.add_argument("--unigram", action="store_true", help="also report the byte unigram baseline")
    pp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        model = load_lm(args.model, map_location="cpu")
        if args.eval == "needle":
            from zoo.tokenizer import load_tokenizer

            haystack = Path(args.haystack).read_text(errors="replace") if args.haystack else None
            rows = needle_in_haystack(model, load_tokenizer(args.tokenizer), _ints(args.lengths),
                                      _floats(args.depths), haystack, args.seed, args.device)
            paths = write_needle_report(rows, args.out, title=f"needle: {args.model}")
            print(paths["md"].read_text())
            print(json.dumps({"eval": "needle", "model": args.model, "recall": float(np.mean([r["found"] for r in rows])),
                              "cells": len(rows), **{k: str(v) for k, v in paths.items()}}))
            return 0
        from zoo.data.text import TextDataModule

        data = _data_args_from_config(args.config)
        for key, value in (("paths", args.paths), ("tokenizer", args.tokenizer), ("seq_len", args.seq_len),
                           ("max_bytes", args.max_bytes), ("batch_size", args.batch_size),
                           ("cache_dir", args.cache_dir)):
            if value is not None:
                data[key] = value
        dm = TextDataModule(**data)
        result = {"eval": "ppl", "model": args.model,
                  **evaluate_perplexity(model, dm, args.max_batches, args.device)}
        if args.unigram:
            result.update(byte_unigram_baseline(dm))
        print("| metric | value |\n|---|---|")
        for k, v in result.items():
            print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        print(json.dumps(result))
        return 0
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"zoo eval {args.eval}: error: {err}")
        return 2
