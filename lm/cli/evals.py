"""The command-line front of ``zoo eval needle|ppl``: the parser only; ``lm.evals.text`` runs once the arguments are
good (imported then, so ``--help`` needs no torch).
"""
from __future__ import annotations

from typing import Any

from lm.cli.common import argv_or_sys, subcommand_args
from zoo.cli.errors import tool_parser


def build_parser() -> Any:
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


def main(argv: list[str] | None = None) -> int:
    """Language-model evaluations: needle in a haystack, perplexity and bits per byte.

    ``zoo eval needle|ppl ...``: run one evaluation, print a table and a JSON line, return an exit code.
    """
    args = subcommand_args(build_parser(), argv_or_sys(argv), "eval", "eval")
    if args is None:
        return 2
    from lm.evals.text import run_eval

    return run_eval(args)


if __name__ == "__main__":
    raise SystemExit(main())
