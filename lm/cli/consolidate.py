"""The command-line front of ``zoo consolidate``: the parser only; ``lm.parallel.sharding`` runs once the arguments
are good.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lm.cli.common import argv_or_sys
from zoo.cli.errors import parse_tool_args, tool_parser


def build_parser() -> Any:
    """The ``zoo consolidate`` parser."""
    parser = tool_parser("zoo consolidate", "A sharded checkpoint folder -> one checkpoint file.")
    parser.add_argument("folder", help="the sharded checkpoint folder (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="the single-file checkpoint to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Turn a sharded (FSDP2) checkpoint folder into one checkpoint file that zoo.load_lm / export-hf read.

    ``zoo consolidate <folder> --out <file.ckpt>``.
    """
    args = parse_tool_args(build_parser(), argv_or_sys(argv), "consolidate")
    if args is None:
        return 2
    from lm.parallel.sharding import consolidate

    try:
        path = consolidate(args.folder, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"zoo consolidate: error: {err}", file=sys.stderr)
        return 2
    size = Path(path).stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB), one file from the sharded folder {args.folder}; load it with "
          f"zoo.load_lm({str(path)!r}) or zoo export-hf {path} --out DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
