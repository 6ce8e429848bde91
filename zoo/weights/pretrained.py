"""Named pretrained weights: look-up in the table (``zoo.weights.pretrained_table``), download, trust, model cards.

``list_pretrained()`` names every entry; ``pretrained_file(name)`` gives a local, complete copy of its file (downloaded
into the cache once); ``zoo.load_backbone(name)`` builds the encoder from it. An entry whose sha256 is not yet in the
table is downloaded, its digest printed, and refused until trusted (``trust=True``, ``zoo pretrained ... --trust`` or
``ZOO_TRUST_UNVERIFIED=1``). No torch import here: ``zoo pretrained list`` answers at once.
"""
from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any

from zoo.weights.pretrained_table import PRETRAINED

__all__ = ["list_pretrained", "pretrained_entry", "pretrained_file", "pretrained_for_arch", "is_trusted",
           "UnknownPretrainedError", "UnverifiedWeightsError", "TRUST_ENV", "read_model_card", "format_card"]

TRUST_ENV = "ZOO_TRUST_UNVERIFIED"


class UnknownPretrainedError(KeyError, ValueError):
    """A name that is not in the pretrained table (prints without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnverifiedWeightsError(ValueError):
    """A downloaded file whose sha256 the table does not hold yet, used without trusting it."""


def list_pretrained(arch: str | None = None) -> list[str]:
    """Names of the pretrained weights in the table (only those for registry architecture ``arch`` if given)."""
    return sorted(n for n, e in PRETRAINED.items() if arch is None or e["arch"] == arch)


def _closest(name: str) -> str:
    near = difflib.get_close_matches(name, list(PRETRAINED), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(near)}?" if near else ""


def pretrained_entry(name: str) -> dict[str, Any]:
    """The table's entry for ``name`` (a copy); an unknown name is refused naming the closest ones."""
    if name not in PRETRAINED:
        raise UnknownPretrainedError(f"unknown pretrained weights {name!r}.{_closest(name)} See zoo.list_pretrained() "
                                     "(or `zoo pretrained list`) for every name.")
    return json.loads(json.dumps(PRETRAINED[name]))


def pretrained_for_arch(arch: str) -> str | None:
    """The first table entry (by name) for registry architecture ``arch``, preferring the main release."""
    names = list_pretrained(arch)
    return next((n for n in names if "ablation" not in n), names[0] if names else None)


def is_trusted(trust: bool | None = None) -> bool:
    """``trust`` if given, else whether ``ZOO_TRUST_UNVERIFIED`` is set to a true value."""
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pretrained_file(name: str, trust: bool | None = None, progress: bool | None = None) -> Path:
    """Local path of ``name``'s file: from the cache, else downloaded (resumed, locked, verified against the table)."""
    from zoo.weights.download import fetch, recorded_sha256, sha256_file

    entry = pretrained_entry(name)
    filename = Path(entry["urls"][0]).name
    path = fetch(entry["urls"], sha256=entry["sha256"], filename=filename, progress=progress)
    if entry["sha256"] is None:
        digest = recorded_sha256(path) or sha256_file(path)
        if not is_trusted(trust):
            raise UnverifiedWeightsError(
                f"{name}: no verified sha256 is recorded for this file yet; the download ({path}) measured sha256 "
                f"{digest}. Compare it with a trusted source, then pass trust=True (`--trust`) or set {TRUST_ENV}=1.")
        print(f"{name}: unverified file used because trusted; its sha256 is {digest}", file=sys.stderr, flush=True)
    return path


def _card_from_dir(folder: Path) -> dict[str, Any]:
    for candidate in ("config.json", "model_card.json"):
        path = folder / candidate
        if path.is_file():
            data = json.loads(path.read_text())
            if candidate == "config.json":
                card = dict(data.get("zoo") or {})
                card.setdefault("architecture", data.get("architecture"))
                card.setdefault("pretrained_cfg", data.get("pretrained_cfg"))
                return card
            return data
    raise ValueError(f"{folder}: no config.json or model_card.json; is it a `zoo export --format timm|torchvision` "
                     "folder?")


def read_model_card(source: str | os.PathLike) -> dict[str, Any]:
    """The model card of a pretrained name, an export (folder, .safetensors, .pth with its card) or a hub folder."""
    src = str(source)
    if src in PRETRAINED:
        entry = pretrained_entry(src)
        from zoo.weights.download import cache_path_for, recorded_sha256

        cached = cache_path_for(entry["urls"][0], Path(entry["urls"][0]).name)
        entry["cached"] = str(cached) if cached.is_file() else None
        entry["cached_sha256"] = recorded_sha256(cached) if cached.is_file() else None
        return entry
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{src!r} is neither a pretrained name nor an existing file or folder.{_closest(src)}")
    if path.is_dir():
        return _card_from_dir(path)
    if path.suffix in (".pth", ".pt") and (path.parent / "model_card.json").is_file():
        return json.loads((path.parent / "model_card.json").read_text())
    from zoo.weights.safe_load import read_safetensors, sniff_format

    if path.suffix == ".safetensors" or sniff_format(path) == "safetensors":
        meta = read_safetensors(path)[1].get("zoo")
        if isinstance(meta, dict):
            return meta
    raise ValueError(f"{src}: no model card found (exports from `zoo export` carry one; a .ckpt does not).")


def format_card(card: dict[str, Any]) -> str:
    """The model card as aligned ``key: value`` lines (nested dicts as JSON)."""
    width = max((len(k) for k in card), default=0)
    lines = []
    for key, value in card.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
