"""The command-line front of ``zoo export-hf``: its parser, in a module that imports no torch.

``zoo export-hf --help`` and argument errors come back at once, each error as one line (``zoo.errors``, as every
tool); ``zoo.weights.export_hf`` (torch, the Transformer) is imported only to do the export.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from zoo.errors import parse_tool_args, tool_parser, user_error_line
from zoo.weights.dtypes import FLOAT_DTYPES


def parser() -> Any:
    """The ``zoo export-hf`` parser."""
    ap = tool_parser("zoo export-hf", "Write a zoo language model as a Hugging Face Gemma / Gemma 2 / Llama folder "
                     "(weights, config and tokenizer) loadable by transformers.")
    ap.add_argument("source", help="registry name (random init), an LM checkpoint or run folder, a .safetensors "
                    "file (with --model), or an HF folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default=None, help="registry name of the architecture; needed only for a bare "
                    ".safetensors file (LM checkpoints record it)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer to write beside the weights ('byte', a "
                    "tokenizer.json, a SentencePiece .model, or a folder); default: the one the checkpoint records")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TransformerConfig field (value parsed as JSON, else a string)")
    ap.add_argument("--dtype", default=None, help=f"cast weights to one of {', '.join(FLOAT_DTYPES)} (default: "
                    "as trained)")
    return ap


def main(argv: list[str]) -> int:
    """Export a zoo language model (checkpoint, run folder or name) to a Hugging Face folder, tokenizer included.

    `zoo export-hf CKPT_OR_NAME --out DIR [--model NAME] [--tokenizer SPEC] [--set field=value ...] [--dtype ...]`.
    """
    args = parse_tool_args(parser(), list(argv), "export-hf")
    if args is None:
        return 2
    if args.dtype is not None and args.dtype.removeprefix("torch.") not in FLOAT_DTYPES:
        print(f"zoo export-hf: error: --dtype {args.dtype!r} is not a floating-point dtype; use one of "
              f"{', '.join(FLOAT_DTYPES)}", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.set:
        if "=" not in item:
            print(f"zoo export-hf: error: --set {item!r}: expected FIELD=VALUE", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    from zoo.weights.export_hf import run_export_hf

    try:
        return run_export_hf(args, overrides)
    except Exception as err:  # a user's mistake (unknown model, missing file, bad --set): one line, exit 2
        line = user_error_line("export-hf", err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
