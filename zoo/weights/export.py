"""``zoo export CKPT --out backbone.safetensors``: the encoder only, with JSON metadata naming its architecture.

The file reloads with ``zoo.load_backbone(path)`` and no other argument.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["export_backbone", "main"]


def export_backbone(source: str | os.PathLike, out: str | os.PathLike, which: str = "online",
                    arch: str | None = None, padding: str | None = None) -> Path:
    """Write the encoder of ``source`` (anything ``load_backbone`` reads) to ``out`` as safetensors."""
    # imported here, not at the top: `zoo export --help` parses without torch
    from zoo.weights.backbone import EXPORT_FORMAT, load_backbone
    from zoo.weights.safe_load import write_safetensors

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r}: exports are safetensors files; name it <something>.safetensors.")
    model = load_backbone(source, which=which, padding=padding, arch=arch)
    meta = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "arch": model.zoo_arch,
        "arch_overrides": model.zoo_arch_overrides,
        "num_features": int(getattr(model, "num_features", 0) or 0),
        "padding": model.zoo_padding,
        "which": model.zoo_which,
        "source": Path(str(source)).name,
    }
    return write_safetensors(out, model.state_dict(), meta)


def main(argv: list[str] | None = None) -> int:
    """Export the encoder of a checkpoint or an official BYOL .pkl to safetensors.

    ``zoo export CKPT --out backbone.safetensors [--which target] [--arch NAME]``.
    """
    from zoo.cli.errors import parse_tool_args, tool_parser

    ap = tool_parser("zoo export", "Export a backbone's encoder weights to safetensors.")
    ap.add_argument("checkpoint", help="our .ckpt, an official BYOL .pkl, or a state dict (then give --arch)")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--which", default="online", choices=("online", "target"), help="encoder branch to export (target: a momentum method's EMA encoder)")
    ap.add_argument("--arch", default=None, help="registry name, needed for plain state dicts")
    ap.add_argument("--padding", default=None, choices=("torch", "tf_same"), help="padding recorded for reloading")
    args = parse_tool_args(ap, list(sys.argv[1:] if argv is None else argv), "export")
    if args is None:
        return 2
    try:
        path = export_backbone(args.checkpoint, args.out, which=args.which, arch=args.arch, padding=args.padding)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"zoo export: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
