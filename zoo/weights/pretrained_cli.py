"""``zoo pretrained list|download|info``: the pretrained-weights table from the command line (no torch imported).

``list`` prints the table (name, architecture, size, top-1, verified or not); ``download NAME`` fetches a file into
the cache (``--trust`` for an entry whose sha256 is not yet verified); ``info NAME|PATH`` prints the model card of a
pretrained name or of an export (``zoo export``'s safetensors file, timm or torchvision folder).
"""
from __future__ import annotations

import json
import sys
from typing import Any

from zoo.errors import parse_tool_args, tool_parser, user_error_line

ACTIONS = ("list", "download", "info")


def parser() -> Any:
    """The ``zoo pretrained`` parser."""
    ap = tool_parser("zoo pretrained", "List, download and describe named pretrained weights.")
    ap.add_argument("action", choices=ACTIONS, help="list: the table; download NAME: fetch into the cache; "
                    "info NAME|PATH: the model card")
    ap.add_argument("name", nargs="?", default=None, help="a pretrained name (zoo pretrained list), or for info an "
                    "export file/folder")
    ap.add_argument("--arch", default=None, help="list: only weights for this architecture")
    ap.add_argument("--trust", action="store_true", help="accept a file whose sha256 is not yet verified "
                    "(or set ZOO_TRUST_UNVERIFIED=1)")
    ap.add_argument("--json", action="store_true", help="info: print the card as JSON")
    return ap


def _list(arch: str | None) -> None:
    from zoo.weights.pretrained import list_pretrained, pretrained_entry

    names = list_pretrained(arch)
    rows = [(n, (e := pretrained_entry(n))["arch"], f"{e['size'] / 1e9:.2f} GB",
             f"{e['top1']}" if e.get("top1") is not None else "-", "yes" if e["sha256"] else "not yet")
            for n in names]
    header = ("name", "arch", "size", "top-1", "sha256 verified")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if not rows:
        print(f"(no pretrained weights for architecture {arch!r})")


def main(argv: list[str] | None = None) -> int:
    """List, download or describe named pretrained weights (the official BYOL release and its ablations).

    ``zoo pretrained list [--arch NAME]``; ``zoo pretrained download NAME [--trust]``;
    ``zoo pretrained info NAME|PATH [--json]``.
    """
    args = parse_tool_args(parser(), list(sys.argv[1:] if argv is None else argv), "pretrained")
    if args is None:
        return 2
    if args.action != "list" and not args.name:
        print(f"zoo pretrained: error: `zoo pretrained {args.action}` needs a NAME (see zoo pretrained list)",
              file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            _list(args.arch)
        elif args.action == "download":
            from zoo.weights.pretrained import pretrained_file

            path = pretrained_file(args.name, trust=True if args.trust else None)
            print(f"{args.name}: {path}")
        else:
            from zoo.weights.pretrained import format_card, read_model_card

            card = read_model_card(args.name)
            print(json.dumps(card, indent=2) if args.json else format_card(card))
    except Exception as err:  # a user's mistake (unknown name, bad hash, offline, no card): one line, exit 2
        line = user_error_line("pretrained", err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    return 0
