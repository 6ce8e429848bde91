"""Backbones from folders in timm's layout (``config.json`` + ``model.safetensors``) and from the Hugging Face Hub.

``load_backbone("hf-hub:ORG/REPO[@REVISION]")`` fetches the two files through ``huggingface_hub`` (its cache, revision
pinning; ``ZOO_OFFLINE=1``/``HF_HUB_OFFLINE=1`` read the cache only, ``HF_HUB_CACHE`` read at call time) and builds the
encoder the folder describes: our own exports (``zoo export --format timm``) carry the zoo architecture under the
``"zoo"`` key; any other timm repo is built as ``timm:<architecture>`` with its ``model_args``.
``huggingface_hub`` is optional: without it an ``hf-hub:`` source is refused in one line (local folders still load).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["HF_PREFIX", "resolve_hub", "load_folder", "WEIGHT_FILES"]

HF_PREFIX = "hf-hub:"
# What a timm/HF folder may hold, in timm's order of preference (local-dir loading).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_REPO_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_errors(hub: Any) -> tuple[type, ...]:
    errors = getattr(hub, "errors", None)
    names = ("LocalEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
             "GatedRepoError", "HfHubHTTPError", "HFValidationError")
    return tuple(getattr(errors, n) for n in names if errors is not None and hasattr(errors, n))


def resolve_hub(spec: str) -> Path:
    """Local snapshot folder of ``hf-hub:ORG/REPO[@REVISION]`` holding its config.json and weights."""
    from zoo.weights.download import offline

    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    repo, _, revision = body.partition("@")
    if not _REPO_RE.match(repo):
        raise ValueError(f"{spec!r}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION.")
    try:
        import huggingface_hub as hub
    except ImportError:
        raise ValueError(f"{spec}: reading from the Hugging Face Hub needs huggingface_hub: pip install "
                         "huggingface_hub (or load a downloaded folder with zoo.load_backbone(DIR)).") from None
    kwargs = {"revision": revision or None, "local_files_only": offline(),
              "cache_dir": os.environ.get("HF_HUB_CACHE") or None}
    errors = _hub_errors(hub)
    where = f"{spec} ({'offline, from the cache ' + str(kwargs['cache_dir'] or 'HF_HUB_CACHE') if offline() else 'Hub'})"
    try:
        config = Path(hub.hf_hub_download(repo, "config.json", **kwargs))
    except errors as err:
        raise ValueError(f"{where}: no config.json ({type(err).__name__}: {str(err).splitlines()[0]}); check the "
                         "repository, the revision, or unset ZOO_OFFLINE/HF_HUB_OFFLINE to download it.") from None
    for name in WEIGHT_FILES:
        try:
            hub.hf_hub_download(repo, name, **kwargs)
            return config.parent
        except errors:
            continue
    raise ValueError(f"{where}: none of {', '.join(WEIGHT_FILES)} is available; is it a timm-layout repository?")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    card_path = folder / "model_card.json"
    if not path.is_file() and card_path.is_file():  # a `zoo export --format torchvision` folder
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{card_path}: not valid JSON ({err}).") from None
        if isinstance(card, dict) and isinstance(card.get("arch"), str):
            return {"architecture": card["arch"], "pretrained_cfg": {"classifier": "fc"}, "zoo": card}
    if not path.is_file():
        raise ValueError(f"{folder}: a weights folder needs config.json (timm's layout: architecture, "
                         "pretrained_cfg) beside model.safetensors.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise ValueError(f"{path}: no 'architecture' entry; it is not a timm-layout config.json.")
    return cfg


def _weights(folder: Path) -> Any:
    from zoo.weights.safe_load import load_state_dict_file

    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)[0]
    raise ValueError(f"{folder}: no weight file (one of {', '.join(WEIGHT_FILES)}).")


def load_folder(folder: Path, source: str, which: str | None, arch: str | nn.Module | None, padding: str | None,
                head: bool) -> nn.Module:
    """The encoder of a timm-layout folder (ours or any timm model's); see the module docstring."""
    from zoo.models.registry import UnknownModelError
    from zoo.weights.assemble import _build, _finish, _linear, load_into

    cfg = _read_config(folder)
    card = cfg.get("zoo") if isinstance(cfg.get("zoo"), dict) else {}
    if arch is not None:
        name, overrides = arch, {}
    elif card.get("arch"):
        name, overrides = card["arch"], dict(card.get("arch_overrides") or {})
    else:
        # model_args may repeat the classifier size; the encoder is built features-only (num_classes=0)
        overrides = {k: v for k, v in dict(cfg.get("model_args") or {}).items() if k not in ("num_classes",
                                                                                              "pretrained")}
        name = f"timm:{cfg['architecture']}"
    try:
        model = _build(name, overrides)
    except (UnknownModelError, TypeError) as err:
        raise ValueError(f"{source}: config.json names architecture {cfg['architecture']!r}, which neither zoo nor "
                         f"the installed timm can build ({err}); pass arch=<zoo.available() name> if the weights fit "
                         "one.") from None
    tensors = _weights(folder)
    lin = None
    if head:
        cls = (cfg.get("pretrained_cfg") or {}).get("classifier") or "fc"
        cls = cls[0] if isinstance(cls, (list, tuple)) else cls
        if f"{cls}.weight" not in tensors or (card.get("classifier") or {}).get("zeros"):
            raise ValueError(f"{source}: no trained classifier in this folder; load it without head=True.")
        lin = _linear(tensors[f"{cls}.weight"], tensors.get(f"{cls}.bias"), source)
    model = load_into(model, tensors, source)
    return _finish(model, name, overrides, padding or card.get("padding", "torch"), source,
                   card.get("which", which), lin)
