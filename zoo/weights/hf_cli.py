"""The command-line front of ``zoo export-hf``: its parser, in a module that imports no torch.

``zoo export-hf --help`` and argument errors come back at once; ``zoo.weights.hf`` (torch, the Transformer) is
imported only to do the export.
"""
from __future__ import annotations

import argparse
import json


def parser() -> argparse.ArgumentParser:
    """The ``zoo export-hf`` parser."""
    ap = argparse.ArgumentParser(prog="zoo export-hf", description="Write a zoo language model as a Hugging Face "
                                 "Gemma / Gemma 2 folder (weights, config and tokenizer) loadable by transformers.")
    ap.add_argument("source", help="registry name (random init), an LM checkpoint or run folder, a .safetensors "
                    "file (with --model), or an HF folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", help="registry name of the architecture; needed only for a bare .safetensors file "
                    "(LM checkpoints record it)")
    ap.add_argument("--tokenizer", help="tokenizer to write beside the weights ('byte', a tokenizer.json, a "
                    "SentencePiece .model, or a folder); default: the one the checkpoint records")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TransformerConfig field (value parsed as JSON, else a string)")
    ap.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16")
    return ap


def main(argv: list[str]) -> int:
    """Export a zoo language model (checkpoint, run folder or name) to a Hugging Face folder, tokenizer included.

    `zoo export-hf CKPT_OR_NAME --out DIR [--model NAME] [--tokenizer SPEC] [--set field=value ...] [--dtype ...]`.
    """
    ap = parser()
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    from zoo.weights.hf import run_export_hf

    return run_export_hf(args, overrides)
