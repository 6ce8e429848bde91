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

from zoo.weights.checkpoint import checkpoint_contract, is_lightning_checkpoint, load_torch_file
from zoo.weights.safe_load import UnsafeFileError, load_state_dict_file, read_safetensors, sniff_format

__all__ = ["load_backbone", "load_into", "BackboneWithHead", "UnsafeFileError", "EXPORT_FORMAT"]

EXPORT_FORMAT = "zoo-backbone"
PADDINGS = ("torch", "tf_same")
# Classifier heads a features-only encoder does not have; dropped from torchvision/timm files, never silently else.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "head.fc.", "heads.")


class BackboneWithHead(nn.Module):
    """An encoder followed by its linear classifier (e.g. the official BYOL online ImageNet head)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        self.num_classes = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.head(self.encoder(x))


def _build(arch: str | nn.Module, overrides: dict[str, Any] | None = None) -> nn.Module:
    if isinstance(arch, nn.Module):
        return arch
    from zoo.models.registry import create

    return create(arch, **(overrides or {}))


def _strip_common_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items()} if sd and all(k.startswith(prefix) for k in sd) else sd


def _align_keys(model_keys: set[str], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bridge a wrapper prefix on either side (``module.``, ``net.``, ...) when the names otherwise agree."""
    sd = _strip_common_prefix(sd, "module.")  # DDP-saved files
    if model_keys & set(sd):
        return sd
    best, best_hits = sd, 0
    for probe in list(sd)[:8]:
        # model key = prefix + file key (the model wraps the net), or the other way round.
        adds = {mk[: -len(probe)] for mk in model_keys if mk.endswith("." + probe)}
        strips = {probe[: -len(mk)] for mk in model_keys if probe.endswith("." + mk)}
        for cand in [{pre + k: v for k, v in sd.items()} for pre in adds] + [
                {k[len(pre):] if k.startswith(pre) else k: v for k, v in sd.items()} for pre in strips]:
            hits = len(model_keys & set(cand))
            if hits > best_hits:
                best, best_hits = cand, hits
    return best


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict",
              drop_heads: bool = True) -> nn.Module:
    """Load ``state_dict`` strictly; errors name missing/unexpected keys and the first shape mismatch."""
    own = model.state_dict()
    sd = _align_keys(set(own), dict(state_dict))
    if drop_heads:
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    # Old files may lack BN counters; they do not affect the forward pass.
    for k in own:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{source}: tensor {k!r} holds {bad} NaN/Inf value(s) of {v.numel()}; the file is "
                             "corrupt (e.g. saved after training diverged): use an earlier, healthy checkpoint.")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatch = next(((k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                     if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)), None)
    if missing or unexpected or mismatch:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if mismatch:
            parts.append(f"first shape mismatch: {mismatch[0]} is {list(mismatch[1])} in the file but "
                         f"{list(mismatch[2])} in the model")
        arch = getattr(model, "zoo_arch", type(model).__name__)
        raise ValueError(f"{source} does not fit architecture {arch}: " + "; ".join(parts) +
                         ". Pass the matching arch= (see zoo.available()).")
    model.load_state_dict(sd, strict=True)
    return model


def _finish(model: nn.Module, arch: str | nn.Module, overrides: dict | None, padding: str, source: str,
            which: str | None, head: nn.Linear | None = None) -> nn.Module:
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {PADDINGS}.")
    if padding == "tf_same":
        from zoo.models.tf_same import apply_tf_same_padding

        apply_tf_same_padding(model)
    # Provenance travels with the module so `zoo export` and the probe can name what they saw.
    model.zoo_arch = arch if isinstance(arch, str) else type(arch).__name__
    model.zoo_arch_overrides = dict(overrides or {})
    model.zoo_padding, model.zoo_source, model.zoo_which = padding, source, which
    model.eval()
    if head is not None:
        wrapped = BackboneWithHead(model, head).eval()
        wrapped.zoo_arch, wrapped.zoo_source = model.zoo_arch, source
        return wrapped
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


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
        lin = _linear(sdict[f"{cls}weight"], sdict.get(f"{cls}bias"))
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
    lin = _linear(cls["weight"], cls.get("bias")) if head and cls is not None else None
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
        lin = _linear(tensors[w], tensors.get(w[: -len("weight")] + "bias"))
    model = load_into(_build(arch), tensors, src)
    return _finish(model, arch, {}, padding or "torch", src, which, lin)
