"""The command-line front of ``zoo eval``, ``zoo scaling``, ``zoo plan`` and ``zoo consolidate``.

Each subcommand's parser lives here, in a module that imports neither torch nor Lightning, so ``--help`` and every
argument error come back at once; torch is imported (through ``lm.evals``, ``lm.sweep``, ``lm.plan``,
``lm.sharding``) only once the arguments are known to be good. The modules' own ``main`` functions call these.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from zoo.cli.errors import parse_tool_args, tool_parser


def _argv(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


# ------------------------------------------------------------------------------------------------ zoo eval
def eval_parser() -> Any:
    """The ``zoo eval needle|ppl`` parser."""
    parser = tool_parser("zoo eval", "Language-model evaluations: needle in a haystack, perplexity.")
    sub = parser.add_subcommands(dest="eval", required=True)
    device_help = "cpu, cuda or cuda:N (default: cuda when a GPU is available, else cpu)"
    nd = tool_parser("zoo eval needle", "Needle in a haystack (Gemini 1.5 protocol): hide a fact at each depth of "
                     "contexts of each length and ask for it back; writes a recall grid as CSV, Markdown and PNG.")
    nd.add_argument("--model", required=True, help="zoo model name, .ckpt file, or run folder")
    nd.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or a SentencePiece .model")
    nd.add_argument("--lengths", default="128,256,512", help="comma-separated context lengths in tokens")
    nd.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    nd.add_argument("--haystack", default=None, help="text file to repeat as haystack (default: Python's LICENSE)")
    nd.add_argument("--out", default="runs/eval/needle", help="folder for needle.csv / .md / .png")
    nd.add_argument("--seed", type=int, default=0)
    nd.add_argument("--device", default=None, help=device_help)
    nd.add_argument("--modality", default="text", choices=("text", "image"),
                    help="text: a fact in a text haystack; image: K labelled images, then a question about image j "
                         "(a multimodal model, e.g. lm.MultimodalLM's checkpoint)")
    nd.add_argument("--images", default="2,4,8", help="--modality image: comma-separated image counts K")
    nd.add_argument("--trials", type=int, default=10, help="--modality image: questions per (K, depth) cell")
    nd.add_argument("--dataset", default="digits",
                    help="--modality image: held-out images (digits, imagefolder:<root>)")
    sub.add_subcommand("needle", nd, help="needle in a haystack (Gemini 1.5 protocol)")
    pp = tool_parser("zoo eval ppl", "Perplexity and bits per byte of a language model on the held-out split of a "
                     "text corpus (the corpus of a `zoo fit` config, or given files).")
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
    pp.add_argument("--device", default=None, help=device_help)
    sub.add_subcommand("ppl", pp, help="perplexity and bits per byte on the held-out split")
    return parser


def _subcommand_args(parser: Any, argv: list[str], tool: str, dest: str) -> Any:
    """The chosen subcommand's arguments with its name at ``dest``, or None when parsing failed (already said)."""
    named = [a for a in argv if not a.startswith("-")][:1]
    if named and named[0] in (parser._subcommands_action.choices if parser._subcommands_action else {}):
        tool = f"{tool} {named[0]}"  # errors and the --help hint name the subcommand: zoo scaling fit
    parsed = parse_tool_args(parser, argv, tool)
    if parsed is None:
        return None
    args = parsed[parsed[dest]]
    args[dest] = parsed[dest]
    return args


def eval_main(argv: list[str] | None = None) -> int:
    """Language-model evaluations: needle in a haystack, perplexity and bits per byte.

    ``zoo eval needle|ppl ...``: run one evaluation, print a table and a JSON line, return an exit code.
    """
    args = _subcommand_args(eval_parser(), _argv(argv), "eval", "eval")
    if args is None:
        return 2
    from lm.evals import run_eval

    return run_eval(args)


# ------------------------------------------------------------------------------------------------ zoo scaling
def scaling_parser() -> Any:
    """The ``zoo scaling sweep|fit`` parser."""
    ap = tool_parser("zoo scaling", "Scaling-law sweeps and fits (Chinchilla, routed).")
    sub = ap.add_subcommands(dest="cmd", required=True)
    sw = tool_parser("zoo scaling sweep", "Train the sweep's runs not yet in <out_dir>/runs.csv.")
    sw.add_argument("--config", required=True, help="sweep YAML, e.g. configs/scaling/stdlib_isoflop.yaml")
    sw.add_argument("--dry-run", action="store_true", help="print the planned runs and their FLOPs; train nothing")
    sw.add_argument("--limit", type=int, default=None, help="train at most this many runs now")
    sw.add_argument("--out-dir", default=None, help="override the config's out_dir")
    sub.add_subcommand("sweep", sw, help="train the sweep's runs not yet in <out_dir>/runs.csv")
    ft = tool_parser("zoo scaling fit", "Fit a scaling law to a runs CSV, print it and write plots.")
    ft.add_argument("csv", help="runs.csv written by `zoo scaling sweep`")
    # choices without a type (int() below): jsonargparse shows a type given with choices as "<function <lambda>..."
    ft.add_argument("--approach", choices=("1", "2", "3"), required=True,
                    help="1: training-curve envelope, 2: IsoFLOP parabolas, 3: parametric L(N, D)")
    ft.add_argument("--out", default=None, help="folder for the PNG plots (null: next to the CSV)")
    ft.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for Approach 3 std errors")
    ft.add_argument("--curves", default=None, help="training-curve folder for Approach 1 (null: <csv dir>/curves)")
    sub.add_subcommand("fit", ft, help="fit a scaling law to a runs CSV, print it and write plots")
    return ap


def scaling_main(argv: list[str] | None = None) -> int:
    """Scaling-law sweeps (train a grid of model sizes) and fits (Chinchilla approaches 1-3).

    `zoo scaling sweep --config ...` / `zoo scaling fit runs.csv --approach 1|2|3 [--out DIR]`.
    """
    argv = _argv(argv)
    if argv and argv[0] == "scaling":
        argv = argv[1:]
    args = _subcommand_args(scaling_parser(), argv, "scaling", "cmd")
    if args is None:
        return 2
    from lm.sweep import run_scaling

    return run_scaling(args)


# ------------------------------------------------------------------------------------------------ zoo plan
def plan_parser() -> Any:
    """The ``zoo plan`` parser."""
    parser = tool_parser("zoo plan", "Plan a sharded LM run: per-device memory, FLOPs and step time, from the "
                         "meta-device model.")
    parser.add_argument("model", type=str, help="registered LM name, e.g. gemma2-27b, chinchilla-70b")
    parser.add_argument("--devices", type=int, required=True, help="devices per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (world size = nodes x devices)")
    parser.add_argument("--seq_len", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--batch", type=int, required=True, help="global batch in sequences")
    parser.add_argument("--strategy", type=str, default="fsdp", help="ddp | fsdp (FULL_SHARD) | hybrid")
    parser.add_argument("--activation_checkpointing", action="store_true", help="per-block checkpointing")
    parser.add_argument("--precision", type=str, default="bf16-mixed", help="bf16-mixed | 32-true")
    parser.add_argument("--chip", type=str, default="h100",
                        help="accelerator whose memory and peak FLOP/s are assumed: h100, h200, a100, l40s, ... "
                             "(lm.plan.CHIPS; an unknown name is refused with the full list)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for step time")
    parser.add_argument("--memory_gb", type=float, default=None, help="device memory in GiB (default: the chip's)")
    parser.add_argument("--attn_backend", type=str, default=None, help="eager | sdpa | flex (default: GPU choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return parser


def plan_main(argv: list[str] | None = None) -> int:
    """Plan a sharded LM run: per-device memory, FLOPs and step time, from the meta-device model.

    ``zoo plan <model> --devices D ...`` prints the plan (or one JSON line with ``--json``).
    """
    args = parse_tool_args(plan_parser(), _argv(argv), "plan")
    if args is None:
        return 2
    from lm.plan import run_plan

    return run_plan(args)


# ------------------------------------------------------------------------------------------------ zoo consolidate
def consolidate_parser() -> Any:
    """The ``zoo consolidate`` parser."""
    parser = tool_parser("zoo consolidate", "A sharded checkpoint folder -> one checkpoint file.")
    parser.add_argument("folder", help="the sharded checkpoint folder (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="the single-file checkpoint to write")
    return parser


def consolidate_main(argv: list[str] | None = None) -> int:
    """Turn a sharded (FSDP2) checkpoint folder into one checkpoint file that zoo.load_lm / export-hf read.

    ``zoo consolidate <folder> --out <file.ckpt>``.
    """
    args = parse_tool_args(consolidate_parser(), _argv(argv), "consolidate")
    if args is None:
        return 2
    from lm.sharding import consolidate

    try:
        path = consolidate(args.folder, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"zoo consolidate: error: {err}", file=sys.stderr)
        return 2
    size = Path(path).stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB), one file from the sharded folder {args.folder}; load it with "
          f"zoo.load_lm({str(path)!r}) or zoo export-hf {path} --out DIR")
    return 0
