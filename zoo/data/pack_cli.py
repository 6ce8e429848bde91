"""The command-line front of ``zoo data``: its parser, in a module that imports no torch.

``zoo data pack imagefolder:/src --out DIR --shard_size 1GB`` writes WebDataset shards (``zoo.data.pack``);
argument errors come back at once as one line (``zoo.errors``, as every tool).
"""
from __future__ import annotations

import sys
from typing import Any

from zoo.errors import parse_tool_args, tool_parser, user_error_line

USAGE = "usage: zoo data pack imagefolder:<root> --out DIR [--shard_size 1GB] [--splits train,val] [--no_verify]"


def parser() -> Any:
    """The ``zoo data pack`` parser."""
    ap = tool_parser("zoo data pack", "Write an ImageNet-layout image folder as WebDataset tar shards (<key>.jpg with "
                     "the file's bytes unchanged, <key>.cls with the class index, classes.json), resumably, and "
                     "verify them. Train on them with --data.init_args.dataset wds:DIR.")
    ap.add_argument("source", help="imagefolder:<root> (root holds train/ and val/)")
    ap.add_argument("--out", required=True, help="output folder (DIR/<split>/<split>-000000.tar ...)")
    ap.add_argument("--shard_size", default="1GB", help="bytes per shard: 1GB, 500MB, 2GiB or a number")
    ap.add_argument("--splits", default="train,val", help="comma-separated splits to pack")
    ap.add_argument("--no_verify", action="store_true", help="skip reading every shard back")
    return ap


def main(argv: list[str]) -> int:
    """Pack image folders into WebDataset tar shards (zoo data pack).

    `zoo data pack imagefolder:<root> --out DIR [--shard_size 1GB] [--splits train,val] [--no_verify]`.
    """
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nsubcommands:\n  pack   write an image folder as WebDataset tar shards (zoo data pack --help)")
        return 0 if argv else 2
    if argv[0] != "pack":
        print(f"zoo data: error: unknown subcommand {argv[0]!r}; the one subcommand is pack ({USAGE})", file=sys.stderr)
        return 2
    args = parse_tool_args(parser(), argv[1:], "data pack")
    if args is None:
        return 2
    from zoo.data.pack import pack_folder, parse_size

    try:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        unknown = [s for s in splits if s not in ("train", "val")]
        if unknown or not splits:
            raise ValueError(f"--splits {args.splits!r}: use train, val or train,val")
        summary = pack_folder(args.source, args.out, parse_size(args.shard_size), splits, verify=not args.no_verify)
    except Exception as err:  # a user's mistake (missing folder, bad size, foreign manifest): one line, exit 2
        line = user_error_line("data pack", err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    for split, s in summary.items():
        print(f"{split}: {s['samples']} samples in {s['shards']} shards ({s['written']} written, {s['reused']} "
              f"already there, {s['skipped']} unreadable files left out){', verified' if s['verified'] else ''}")
    print(f"train on them with --data.init_args.dataset wds:{args.out}")
    return 0
