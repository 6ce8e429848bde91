"""Language-model evaluations: needle in a haystack (Gemini 1.5 protocol) and held-out perplexity / bits per byte.

Command line (wired as ``zoo eval ...``)::

    zoo eval needle --model runs/lm/stdlib_gemma2_tiny --lengths 128,256,512 --depths 0,0.25,0.5,0.75,1 --out DIR
    zoo eval ppl --model runs/lm/stdlib_gemma2_tiny --config configs/lm/stdlib_gemma2_tiny.yaml

``--model`` takes a zoo model name (random weights) or a CausalLM / Distill checkpoint or run folder.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import sys
import sysconfig
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lm.evals.report import write_grid_report
from zoo.files import check_folder_path, display_path
from zoo.train.progress import track

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


def check_needle_grid(lengths: Sequence[int], depths: Sequence[float]) -> tuple[list[int], list[float]]:
    """Validate a (length, depth) grid before any work: non-empty, lengths positive integers, depths in [0, 1]."""
    lengths, depths = list(lengths), list(depths)
    if not lengths:
        raise ValueError("--lengths is empty; give comma-separated context lengths in tokens, e.g. 128,256,512")
    if not depths:
        raise ValueError("--depths is empty; give comma-separated needle depths in [0, 1], e.g. 0,0.5,1")
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"--lengths value {n!r} is not a positive integer; context lengths are token counts")
    for d in depths:
        if not (isinstance(d, (int, float, np.floating)) and 0.0 <= float(d) <= 1.0):
            raise ValueError(f"--depths value {d!r} is outside [0, 1]; depth 0 is the start of the context, 1 the end")
    for name, values in (("--lengths", lengths), ("--depths", depths)):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise ValueError(f"{name} repeats {dup}; give each value once")
    return [int(n) for n in lengths], [float(d) for d in depths]


def check_tokenizer_fits(model: nn.Module, tokenizer: Any, spec: str | None = None) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding (the check ``zoo eval ppl`` makes)."""
    from lm.modules.causal_lm import check_data_fits

    config = getattr(model, "config", None)
    if config is not None:
        check_data_fits(type(model).__name__, config, getattr(tokenizer, "vocab_size", None), None,
                        spec if spec is not None else repr(tokenizer))


def needle_in_haystack(model: nn.Module, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                       haystack: str | None = None, seed: int = 0, device: str | torch.device = "cpu",
                       max_new_tokens: int | None = None, tokenizer_spec: str | None = None) -> list[dict[str, Any]]:
    """Score every (length, depth) cell: does the greedy answer contain the needle's number? One row per cell.

    Every cell's prompt is built and checked against the model (vocabulary, max_seq_len) before any is run.
    """
    lengths, depths = check_needle_grid(lengths, depths)
    check_tokenizer_fits(model, tokenizer, tokenizer_spec)
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    rng = random.Random(seed)
    hay_ids = tokenizer.encode(haystack if haystack is not None else default_haystack())
    cells = []
    for length in lengths:
        for depth in depths:
            city, number = rng.choice(CITIES), rng.randint(1_000_000, 9_999_999)  # 7 digits, as in Gemini 1.5
            new = max_new_tokens or len(tokenizer.encode(f" {number}")) + 4
            if max_len is not None and length + new > max_len:
                raise ValueError(f"context length {length} + {new} answer tokens exceeds the model's "
                                 f"max_seq_len={max_len}; use --lengths up to {max_len - new}")
            prompt, pos = build_needle_prompt(tokenizer, hay_ids, length, depth, city, number)
            cells.append((length, depth, city, number, new, prompt, pos))
    model = model.to(device).eval()
    rows = []
    for length, depth, city, number, new, prompt, pos in track(cells, "needle cells"):
        answer = tokenizer.decode(greedy_continue(model, prompt, new, device))
        rows.append({"length": length, "depth": depth, "city": city, "number": number, "needle_token": pos,
                     "answer": answer, "found": int(str(number) in answer)})
    return rows


def write_needle_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "needle in a haystack"
                        ) -> dict[str, Path]:
    """Write needle.csv (every cell), needle.md (depth x length grid + recall) and needle.png (heatmap)."""
    if not rows:
        raise ValueError("no needle results to report (an empty --lengths or --depths grid)")
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["found"]
    lines = [f"# {title}", "", "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for i, d in enumerate(depths):
        lines.append(f"| {d:.0%} | " + " | ".join("found" if v == 1 else "missed" for v in grid[i]) + " |")
    recall = np.nanmean(grid, axis=0)
    lines.append("| recall | " + " | ".join(f"{v:.0%}" for v in recall) + " |")
    lines += ["", f"overall recall: {np.nanmean(grid):.1%} over {len(rows)} cells"]
    return write_grid_report(rows, out_dir, "needle", lines, grid, lambda v: "found" if v == 1 else "missed",
                             [str(n) for n in lengths], [f"{d:.0%}" for d in depths], "context length (tokens)",
                             "needle depth", title)


# ----------------------------------------------------------------------------------------------------------------
# Perplexity / bits per byte
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_perplexity(model: nn.Module, datamodule: Any, max_batches: int | None = None,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """Token-weighted loss, perplexity and bits per byte of ``model`` on the data module's held-out split."""
    from lm.modules.causal_lm import check_data_fits, split_batch, token_nll
    from lm.modules.metrics import bits_per_byte

    datamodule.setup("validate")
    check_data_fits(type(model).__name__, model.config, datamodule.vocab_size, datamodule.seq_len,
                    datamodule.tokenizer_spec)
    model = model.to(device).eval()
    total, n = 0.0, 0
    loader = datamodule.val_dataloader()
    count = min(len(loader), max_batches) if max_batches is not None else len(loader)
    for i, batch in enumerate(track(loader, "perplexity batches", total=count)):
        if max_batches is not None and i >= max_batches:
            break
        tokens = split_batch(batch)[1].to(device)
        nll = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
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

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r} is not a file; pass a `zoo fit` YAML (configs/lm/*.yaml)")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path!r} is not readable YAML ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); pass a `zoo fit` YAML") from None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if data is None:
        data = {}
    init_args = data.get("init_args") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(init_args or {}, dict):
        raise ValueError(f"--config {path!r}: 'data' must be a mapping with an 'init_args' mapping, "
                         "as in a `zoo fit` YAML")
    return dict(init_args or {})


def _numbers(flag: str, text: str, kind: type) -> list[Any]:
    """Comma-separated numbers of one flag; a bad item raises an error naming the flag and the item."""
    out = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            value = kind(item)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{flag} value {item!r} is not {what}; give a comma-separated list") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{flag} value {item!r} is not a finite number")
        out.append(value)
    return out


def _floats(text: str) -> list[float]:
    return _numbers("--depths", text, float)


def _ints(text: str, flag: str = "--lengths") -> list[int]:
    return _numbers(flag, text, int)


def _image_counts(args: Any) -> list[int]:
    """``--images`` as positive integers and ``--trials`` >= 1, checked before any model is loaded."""
    counts = _ints(args.images, "--images")
    if not counts or min(counts) < 1:
        raise ValueError(f"--images {args.images!r} must be a comma-separated list of positive image counts K")
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    return counts


def _check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _check_model_spec(spec: str) -> None:
    """Refuse an empty checkpoint file up front (torch.load would fail on it with an unhelpful EOFError)."""
    p = Path(spec).expanduser()
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"--model {spec!r} is an empty file (0 bytes); pass a CausalLM .ckpt, a run folder "
                         "or a zoo model name")


def _check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be a positive integer")


def _written(paths: dict[str, Path]) -> str:
    """The line that says where a report went: ``results in runs/needle: needle.md (table), ...``."""
    what = {"md": "table", "csv": "rows", "png": "heatmap"}
    folder = display_path(next(iter(paths.values())).parent)
    return f"results in {folder}: " + ", ".join(f"{p.name} ({what.get(k, k)})" for k, p in paths.items())


def _image_needle(model: torch.nn.Module, args: Any, depths: list[float]) -> int:
    """``zoo eval needle --modality image``: the multimodal needle grid over image counts and depths."""
    from lm.evals.needle_image import image_needle_for_model, write_image_needle_report
    from zoo.data.interleaved import InterleavedDataModule

    if not hasattr(model, "tokens_per_image"):
        raise ValueError(f"--model {args.model!r} is a text-only language model; --modality image needs a multimodal "
                         "one (an lm.MultimodalLM checkpoint or a vlm-* name)")
    counts = _image_counts(args)
    dm = InterleavedDataModule(dataset=args.dataset, tokens_per_image=model.tokens_per_image,
                               image_size=model.image_size, train_size=1, batch_size=1, val_size=max(counts) * args.trials,
                               seed=args.seed)
    dm.setup()
    rows = image_needle_for_model(model, dm, counts, depths, args.trials, args.seed, args.device)
    paths = write_image_needle_report(rows, args.out, title=f"image needle: {args.model}")
    print(paths["md"].read_text())
    print(_written(paths))
    print(json.dumps({"eval": "needle", "modality": "image", "model": args.model,
                      "accuracy": float(np.mean([r["accuracy"] for r in rows])), "cells": len(rows),
                      **{k: str(v) for k, v in paths.items()}}))
    return 0


def run_eval(args: Any) -> int:
    """Run the evaluation that ``lm.cli.evals`` parsed into ``args``; print a table and a JSON line."""
    from lm.modules.causal_lm import load_lm

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # Every argument is checked before anything is loaded, run or written.
        _check_device(args.device)
        _check_model_spec(args.model)
        if args.eval == "needle":
            lengths, depths = check_needle_grid(_ints(args.lengths), _floats(args.depths))
            if args.modality == "image":
                _image_counts(args)
            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {args.out!r} is a file; the needle report needs a folder")
            haystack = None
            if args.haystack:
                hp = Path(args.haystack)
                if not hp.is_file():
                    raise FileNotFoundError(f"--haystack {args.haystack!r} is not a file; pass a text file")
                haystack = hp.read_text(encoding="utf-8", errors="replace")
                if not haystack.strip():
                    raise ValueError(f"--haystack {args.haystack!r} holds no text; pass a text file to repeat")
        else:
            _check_positive(args, ("seq_len", "max_bytes", "batch_size", "max_batches"))
            if args.cache_dir:
                check_folder_path(Path(args.cache_dir).expanduser(), f"--cache-dir {args.cache_dir!r}")
            data = _data_args_from_config(args.config)
        try:
            model = load_lm(args.model, map_location="cpu")
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise ValueError(f"--model {args.model!r} could not be read as a checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'truncated file'}); pass a CausalLM .ckpt, "
                             "a run folder or a zoo model name") from None
        if args.eval == "needle" and args.modality == "image":
            return _image_needle(model, args, depths)
        if args.eval == "needle":
            from zoo.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
            check_tokenizer_fits(model, tokenizer, args.tokenizer)
            rows = needle_in_haystack(model, tokenizer, lengths, depths, haystack, args.seed, args.device,
                                      tokenizer_spec=args.tokenizer)
            paths = write_needle_report(rows, args.out, title=f"needle: {args.model}")
            print(paths["md"].read_text())
            print(_written(paths))
            print(json.dumps({"eval": "needle", "model": args.model, "recall": float(np.mean([r["found"] for r in rows])),
                              "cells": len(rows), **{k: str(v) for k, v in paths.items()}}))
            return 0
        from zoo.data.text import TextDataModule

        for key, value in (("paths", args.paths), ("tokenizer", args.tokenizer), ("seq_len", args.seq_len),
                           ("max_bytes", args.max_bytes), ("batch_size", args.batch_size),
                           ("cache_dir", args.cache_dir)):
            if value is not None:
                data[key] = value
        try:
            dm = TextDataModule(**data)
        except TypeError as exc:
            raise ValueError(f"data options {sorted(data)} from --config {args.config!r} and the flags do not fit "
                             f"TextDataModule: {exc}") from None
        result = {"eval": "ppl", "model": args.model,
                  **evaluate_perplexity(model, dm, args.max_batches, args.device)}
        if args.unigram:
            result.update(byte_unigram_baseline(dm))
        print("| metric | value |\n|---|---|")
        for k, v in result.items():
            print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        print(json.dumps(result))
        return 0
    except (ValueError, OSError, KeyError) as err:
        print(f"zoo eval {args.eval}: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
