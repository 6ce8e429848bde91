"""Load a pretrained backbone from whatever file a user has: ``load_backbone(source) -> nn.Module``.

(Re-exported by ``zoo.weights``, which imports this module, and so torch, only when one of its names is used.)

Sources, auto-detected:
- our Lightning checkpoint (``.ckpt`` of any image-pretraining method): the encoder its contract names for
  ``which`` (``zoo.weights.checkpoint``; by default the first it declares, the trained one; a momentum method
  declares its target too);
- our export (``zoo export CKPT --out x.safetensors``): architecture read from the file's JSON metadata;
- torchvision / timm state dicts (``.pth``/``.pt``/``.bin``/``.safetensors``) for a named ``arch``;
- a format a method package registers (``zoo.weights.readers``; e.g. ``byol``'s reader of the official BYOL
  ``.pkl``: restricted unpickler, Haiku -> torchvision names, TF-SAME padding);
- ``random:<arch>``: a randomly initialised encoder, seed 0 (the usual sanity baseline for a probe);
- a pretrained name (``zoo.list_pretrained()``, e.g. ``byol-r50-official``), downloaded into the cache once;
- an ``https://``, ``http://`` or ``file://`` URL (``sha256=`` pins it), downloaded into the cache once
  (``zoo.weights.download``);
- a folder in timm's layout (``config.json`` + ``model.safetensors``: ``zoo export --format timm`` or a timm repo),
  or ``hf-hub:ORG/REPO[@REVISION]`` (``zoo.weights.hub``).
"""
from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.weights.assemble import PADDINGS, BackboneWithHead, _build, _finish, _linear, load_into  # noqa: F401
from zoo.weights.checkpoint import checkpoint_contract, is_lightning_checkpoint, load_torch_file
from zoo.weights.safe_load import (UnsafeFileError, check_weights, load_state_dict_file, read_safetensors,
                                   sniff_format)

__all__ = ["load_backbone", "load_into", "BackboneWithHead", "UnsafeFileError", "EXPORT_FORMAT"]

EXPORT_FORMAT = "zoo-backbone"


def _legacy_image_contract(ckpt: dict) -> dict[str, Any]:
    """The contract of a checkpoint written before contracts existed, read off its state dict: every top-level
    module named ``<branch>_encoder`` is encoder ``<branch>`` (in state-dict order: the trained one first), a
    ``*_classifier`` the classifier -- the naming of the only image method of that time (and the language-model
    modules' hyper-parameters, to send those to their loader)."""
    hp = ckpt.get("hyper_parameters") or {}
    if isinstance(hp, dict) and "encoder" not in hp and ("model" in hp or "student" in hp):
        return {"kind": "lm"}
    tops = list(dict.fromkeys(k.split(".", 1)[0] for k in ckpt["state_dict"] if "." in k))
    return {"kind": "image-encoder", "arch": hp.get("encoder") if isinstance(hp, dict) else None,
            "overrides": dict(hp.get("encoder_overrides") or {}) if isinstance(hp, dict) else {},
            "encoders": {t[: -len("_encoder")]: f"{t}." for t in tops if t.endswith("_encoder")},
            "classifier": next((f"{t}." for t in tops if t.endswith("_classifier")
                                and f"{t}.weight" in ckpt["state_dict"]), None)}


def _from_lightning(ckpt: dict, source: str, which: str | None, arch: str | nn.Module | None, head: bool
                    ) -> tuple[nn.Module, str | nn.Module, dict, nn.Linear | None, str]:
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{source}: the checkpoint has no 'state_dict' dict; is it a `zoo fit` checkpoint?")
    contract = checkpoint_contract(ckpt, source) or _legacy_image_contract(ckpt)
    if contract["kind"] == "lm" and isinstance(contract.get("image_encoder"), dict):
        contract = contract["image_encoder"]  # a language model with a vision tower (lm.MultimodalLM): its encoder
    if contract["kind"] == "lm":
        raise ValueError(f"{source} is a language-model checkpoint (lm.CausalLM / lm.Distill), not a vision backbone; "
                         "load it with zoo.load_lm(path).")
    if contract["kind"] != "image-encoder":
        raise ValueError(f"{source} holds a {contract['kind']!r} model, not an image encoder; load_backbone reads "
                         "image-encoder checkpoints only.")
    name = arch if arch is not None else contract.get("arch")
    overrides = dict(contract.get("overrides") or {}) if arch is None else {}
    if name is None:
        raise ValueError(f"{source}: the checkpoint names no encoder architecture; pass arch=<name>.")
    encoders = contract.get("encoders") or {}
    which = _choose(which, list(encoders), source, "the checkpoint")
    prefix = encoders[which]
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not sd:
        found = sorted({k.split(".", 1)[0] for k in ckpt["state_dict"]})
        raise ValueError(f"{source}: no '{prefix}*' weights in the checkpoint (top-level modules: {found}); "
                         "is it an image-pretraining checkpoint?")
    lin = None
    if head:  # checked before building the encoder: asking is cheap (zoo export asks every checkpoint)
        sdict, cls = ckpt["state_dict"], contract.get("classifier")
        if not cls or f"{cls}weight" not in sdict:
            raise ValueError(f"{source}: no online classifier in the checkpoint; load it without head=True.")
        lin = _linear(sdict[f"{cls}weight"], sdict.get(f"{cls}bias"), source)
    model = load_into(_build(name, overrides), sd, source)
    return model, name, overrides, lin, which


def _choose(which: str | None, declared: list[str], source: str, holder: str) -> str:
    """``which``, checked against the encoder names the source declares; None: the first (the trained encoder)."""
    if not declared:
        raise ValueError(f"{source}: {holder} declares no encoder; is it an image-pretraining checkpoint?")
    if which is None:
        return declared[0]
    if which not in declared:
        raise ValueError(f"{source}: {holder} has no {which!r} encoder (it has: {sorted(declared)}); "
                         f"pass which={declared[0]!r}.")
    return which


def _from_reader(reader: Any, path: Path, which: str | None, arch: str | nn.Module | None, head: bool
                 ) -> tuple[nn.Module, str | nn.Module, dict, nn.Linear | None, str]:
    """A file a method package's registered reader claims (``zoo.weights.readers``)."""
    which = _choose(which, list(reader.encoders), str(path), f"a {reader.name} file")
    sd, name, cls = reader.read(path, which, arch, head)
    model = load_into(_build(name), sd, str(path))
    lin = _linear(cls["weight"], cls.get("bias"), repr(str(path))) if head and cls is not None else None
    return model, name, {}, lin, which


def _locate(src: str, sha256: str | None, trust: bool | None) -> Path:
    """The local file or folder behind ``src``: a pretrained name or URL is fetched into the cache first."""
    from zoo.weights.download import fetch, is_url, recorded_sha256, sha256_file
    from zoo.weights.hub import HF_PREFIX, resolve_hub
    from zoo.weights.pretrained_table import PRETRAINED

    if src in PRETRAINED:
        from zoo.weights.pretrained import pretrained_file

        return pretrained_file(src, trust)
    if src.startswith(HF_PREFIX):
        return resolve_hub(src)
    if is_url(src):
        path = fetch(src, sha256=sha256)
        if sha256 is None and not src.lower().startswith("file://"):
            print(f"note: {src} is not pinned; its sha256 is {recorded_sha256(path)} (pass sha256=... to verify it "
                  "on every load)", file=sys.stderr, flush=True)
        return path
    path = Path(src).expanduser()
    if not path.exists():
        near = difflib.get_close_matches(src, list(PRETRAINED), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)} (zoo.list_pretrained())?" if near else ""
        raise FileNotFoundError(f"backbone {src!r} does not exist; pass a .ckpt, .safetensors, .pth or official .pkl "
                                f"file, a folder, a URL, a pretrained name or random:<arch>.{hint}")
    if sha256 is not None and path.is_file() and sha256_file(path).lower() != sha256.lower():
        raise ValueError(f"{src}: sha256 mismatch (the file's is {sha256_file(path)}, expected {sha256}).")
    return path


def load_backbone(source: str | os.PathLike, which: str | None = None, padding: str | None = None,
                  arch: str | nn.Module | None = None, head: bool = False, sha256: str | None = None,
                  trust: bool | None = None) -> nn.Module:
    """Load an encoder (features [B, D], eval mode) from any supported source; see the module docstring.

    ``which``: the encoder to load, by the name the source declares (a checkpoint's contract, a reader's
    ``encoders``; e.g. BYOL's ``online`` / ``target``); None: the first declared, the trained encoder.
    ``padding``: "torch" or "tf_same"; default the registered reader's (``tf_same`` for the official BYOL release:
    exact Haiku semantics for stride-2 layers), the file's recorded padding for our exports, "torch" otherwise. ``head=True`` returns
    encoder + saved linear classifier (a method's online classifier) as one module giving logits. ``sha256`` pins a
    URL or file; ``trust=True`` accepts a pretrained entry whose sha256 is not yet verified (zoo.list_pretrained()).
    """
    src = str(source)
    if src.startswith("random:"):
        name = src[len("random:"):]
        with torch.random.fork_rng(devices=[]):  # seeded: the same "random" encoder in every run and mode
            torch.manual_seed(0)
            model = _build(name)
        return _finish(model, name, {}, padding or "torch", src, "random")
    path = _locate(src, sha256, trust)
    if path.is_dir():
        from zoo.weights.hub import load_folder

        return load_folder(path, src, which, arch, padding, head)
    fmt = sniff_format(path)
    from zoo.weights.readers import reader_for

    reader = reader_for(path, fmt)  # a method package's format (the official BYOL .pkl): its guarded reader
    if reader is not None:
        model, name, ov, lin, which = _from_reader(reader, path, which, arch, head)
        return _finish(model, name, ov, padding or reader.default_padding, src, which, lin)
    if fmt == "pickle" and path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise ValueError(f"{src}: a plain pickle that no registered weight reader claims (zoo.weights.readers); "
                         "plain pickles are never unpickled otherwise: pass a .ckpt, .safetensors or .pth file.")
    if path.suffix == ".safetensors" or fmt == "safetensors":
        tensors, meta = read_safetensors(path)
        zmeta = meta.get("zoo") if isinstance(meta.get("zoo"), dict) else None
        if zmeta and zmeta.get("format") == EXPORT_FORMAT:
            if head:
                raise ValueError(f"{src} is an encoder-only export with no classifier; load it without head=True.")
            name = arch if arch is not None else zmeta["arch"]
            ov = dict(zmeta.get("arch_overrides") or {}) if arch is None else {}
            model = load_into(_build(name, ov), tensors, src)
            lin = None
            return _finish(model, name, ov, padding or zmeta.get("padding", "torch"), src,
                           zmeta.get("which", which), lin)
        return _plain(tensors, src, arch, padding, head, which)
    if fmt not in ("zip", "pickle"):
        raise ValueError(f"{src}: unknown weight format (not a torch file, safetensors or pickle).")
    obj = load_torch_file(path)
    if is_lightning_checkpoint(obj):
        model, name, ov, lin, which = _from_lightning(obj, src, which, arch, head)
        return _finish(model, name, ov, padding or "torch", src, which, lin)
    tensors, _ = load_state_dict_file(path)
    return _plain(tensors, src, arch, padding, head, which)


def _plain(tensors: dict[str, torch.Tensor], src: str, arch: str | nn.Module | None, padding: str | None,
           head: bool, which: str | None) -> nn.Module:
    """A plain state dict of one encoder (``which`` only recorded as given: the file names no branches)."""
    if arch is None:
        raise ValueError(f"{src} is a plain state dict with no architecture recorded; pass arch=<name> "
                         "(e.g. arch='resnet50' for torchvision, arch='timm:resnet50' for timm).")
    lin = None
    if head:
        w = next((k for k in ("fc.weight", "head.weight", "head.fc.weight", "classifier.weight") if k in tensors), None)
        if w is None:
            raise ValueError(f"{src}: no classifier weights (fc/head/classifier) in the file; load without head=True.")
        lin = _linear(tensors[w], tensors.get(w[: -len("weight")] + "bias"), src)
    model = load_into(_build(arch), tensors, src)
    return _finish(model, arch, {}, padding or "torch", src, which, lin)
