"""``zoo export SOURCE --out backbone.safetensors``: the encoder only, with JSON metadata naming its architecture (and
the model card: source sha256, training config, probe figures, normalisation); reloads with ``zoo.load_backbone(path)``.

``--format timm`` / ``--format torchvision`` (or both, ``timm,torchvision``) write a folder the other libraries load
(``zoo.weights.export_formats``). SOURCE is anything ``zoo.load_backbone`` reads: a checkpoint, an official BYOL
``.pkl``, a pretrained name, a URL, a timm folder or ``hf-hub:ORG/REPO``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["export_backbone", "export", "main"]


def _load(source: str, which: str, arch: str | None, padding: str | None, trust: bool | None,
          sha256: str | None) -> tuple[Any, Any, Path]:
    """(encoder, classifier or None, local file/folder) of ``source``."""
    from zoo.weights.backbone import BackboneWithHead, _locate, load_backbone

    local = _locate(str(source), sha256, trust) if not str(source).startswith("random:") else None
    where = str(local) if local is not None else str(source)
    try:
        model = load_backbone(where, which=which, padding=padding, arch=arch, head=True)
    except ValueError as err:
        if "head=True" not in str(err):  # anything but "this source has no classifier" is the user's to see
            raise
        model = load_backbone(where, which=which, padding=padding, arch=arch)
    if isinstance(model, BackboneWithHead):
        return model.encoder, model.head, local
    return model, None, local


def export(source: str | os.PathLike, out: str | os.PathLike, formats: Sequence[str] = ("safetensors",),
           which: str | None = None, arch: str | None = None, padding: str | None = None, trust: bool | None = None,
           sha256: str | None = None) -> list[Path]:
    """Export the encoder of ``source`` in each of ``formats`` ('safetensors' file, 'timm'/'torchvision' folder)."""
    from zoo.weights.backbone import EXPORT_FORMAT
    from zoo.weights.export_formats import FORMATS, model_card, write_timm, write_torchvision
    from zoo.weights.safe_load import write_safetensors

    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format {','.join(formats)!r}: choose from {', '.join(FORMATS)} (timm and torchvision "
                         "may be combined: --format timm,torchvision).")
    out = Path(out)
    if "safetensors" in formats and (len(formats) > 1 or out.suffix != ".safetensors"):
        raise ValueError(f"--out {str(out)!r}: the safetensors export is one file named <something>.safetensors "
                         "(timm and torchvision exports are folders; export them separately).")
    if "safetensors" not in formats and (out.suffix == ".safetensors" or out.is_file()):
        raise ValueError(f"--out {str(out)!r}: --format {','.join(formats)} writes a folder; pass a folder path.")
    model, head, local = _load(str(source), which, arch, padding, trust, sha256)
    if "timm" in formats:  # refuse an architecture the other library lacks before writing anything
        from zoo.weights.export_formats import timm_architecture

        timm_architecture(model.zoo_arch, model.zoo_arch_overrides)
    if "torchvision" in formats:
        from zoo.weights.export_formats import _torchvision_name

        _torchvision_name(model.zoo_arch, model.zoo_arch_overrides)
    card = model_card(str(source), local, model, head)
    paths: list[Path] = []
    if "safetensors" in formats:
        paths.append(write_safetensors(out, model.state_dict(), {**card, "format": EXPORT_FORMAT, "version": 1}))
    if "timm" in formats:
        paths += write_timm(out, model, head, card)
    if "torchvision" in formats:
        paths += write_torchvision(out, model, head, card)
    return paths


def export_backbone(source: str | os.PathLike, out: str | os.PathLike, which: str | None = None,
                    arch: str | None = None, padding: str | None = None) -> Path:
    """Write the encoder of ``source`` (anything ``load_backbone`` reads) to ``out`` as safetensors."""
    return export(source, out, ("safetensors",), which=which, arch=arch, padding=padding)[0]


def main(argv: list[str] | None = None) -> int:
    """Export a backbone's encoder: safetensors (default), or timm / torchvision folders with a model card.

    ``zoo export SOURCE --out backbone.safetensors [--which target] [--arch NAME]``;
    ``zoo export SOURCE --format timm,torchvision --out DIR``.
    """
    from zoo.errors import parse_tool_args, tool_parser, user_error_line

    ap = tool_parser("zoo export", "Export a backbone's encoder weights: safetensors, or folders timm / torchvision load.")
    ap.add_argument("checkpoint", help="our .ckpt, an official BYOL .pkl, a pretrained name, a URL, a timm folder, "
                    "hf-hub:ORG/REPO, or a state dict (then give --arch)")
    ap.add_argument("--out", required=True, help="output: a .safetensors file, or a folder for --format timm/torchvision")
    ap.add_argument("--format", default="safetensors", help="safetensors (default), timm, torchvision, or "
                    "timm,torchvision (both into one folder)")
    ap.add_argument("--which", default=None, help="encoder to export, by the name the checkpoint declares (BYOL: online "
                    "| target, its EMA encoder); default: the first it declares, the trained encoder")
    ap.add_argument("--arch", default=None, help="registry name, needed for plain state dicts")
    ap.add_argument("--padding", default=None, choices=("torch", "tf_same"), help="padding recorded for reloading")
    ap.add_argument("--sha256", default=None, help="pin the source file's sha256 (URLs and files)")
    ap.add_argument("--trust", action="store_true", help="use a pretrained entry whose sha256 is not yet verified")
    args = parse_tool_args(ap, list(sys.argv[1:] if argv is None else argv), "export")
    if args is None:
        return 2
    formats = [f.strip() for f in str(args.format).split(",") if f.strip()]
    try:
        paths = export(args.checkpoint, args.out, formats, which=args.which, arch=args.arch, padding=args.padding,
                       trust=args.trust or None, sha256=args.sha256)
    except Exception as err:  # a user's mistake: one line, exit 2 (a bug keeps its traceback)
        line = user_error_line("export", err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    folder = paths[0] if formats == ["safetensors"] else Path(args.out)
    print(f"load it with zoo.load_backbone({str(folder)!r})"
          + ("; in timm: timm.create_model('local-dir:" + str(folder) + "', pretrained=True) (see README.md there)"
             if "timm" in formats else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
