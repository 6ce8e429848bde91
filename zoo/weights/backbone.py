"""Load a pretrained backbone from whatever file a user has: ``load_backbone(source) -> nn.Module``.

(Re-exported by ``zoo.weights``, which imports this module, and so torch, only when one of its names is used.)

Sources, auto-detected:
- our Lightning checkpoint (``.ckpt`` of any image-pretraining method): the encoder its contract names for
  ``which`` (``zoo.weights.checkpoint``; online by default, ``which="target"`` for a momentum target);
- our export (``zoo export CKPT --out x.safetensors``): architecture read from the file's JSON metadata;
- torchvision / timm state dicts (``.pth``/``.pt``/``.bin``/``.safetensors``) for a named ``arch``;
- the official BYOL release (``.pkl``): restricted unpickler, Haiku -> torchvision names, TF-SAME padding;
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
from zoo.weights.safe_load import (UnsafeFileError, check_weights, load_state_dict_file, read_safetensors,
                                   sniff_format)

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
    check_weights(sd, source, own)  # NaN/Inf, or integers where the model holds floats: refused, as for LM/HF files
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
            which: str, head: nn.Linear | None = None) -> nn.Module:
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {PADDINGS}.")
    if padding == "tf_same":
        from zoo.weights.byol_official import apply_tf_same_padding

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


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, source: str = "the classifier") -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    check_weights({"classifier.weight": weight, **({} if bias is None else {"classifier.bias": bias})}, source,
                  dict(lin.named_parameters(prefix="classifier")))
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _legacy_image_contract(ckpt: dict) -> dict[str, Any]:
    """The contract of a checkpoint written before contracts existed: byol.BYOL's attribute names, the only image
    method of that time (and the language-model modules' hyper-parameters, to send those to their loader)."""
    hp = ckpt.get("hyper_parameters") or {}
    if isinstance(hp, dict) and "encoder" not in hp and ("model" in hp or "student" in hp):
        return {"kind": "lm"}
    return {"kind": "image-encoder", "arch": hp.get("encoder") if isinstance(hp, dict) else None,
            "overrides": dict(hp.get("encoder_overrides") or {}) if isinstance(hp, dict) else {},
            "encoders": {"online": "online_encoder.", "target": "target_encoder."},
            "classifier": "online_classifier." if "online_classifier.weight" in ckpt["state_dict"] else None}


def _from_lightning(ckpt: dict, source: str, which: str, arch: str | nn.Module | None, head: bool
                    ) -> tuple[nn.Module, str | nn.Module, dict, nn.Linear | None]:
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
    if which not in encoders:
        raise ValueError(f"{source}: the checkpoint has no {which!r} encoder (it has: {sorted(encoders)}); "
                         f"pass which={next(iter(encoders), 'online')!r}.")
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
    return model, name, overrides, lin


def _from_official(path: Path, which: str, arch: str | nn.Module | None, head: bool
                   ) -> tuple[nn.Module, str | nn.Module, dict, nn.Linear | None]:
    from zoo.weights.byol_official import haiku_classifier, haiku_to_torchvision, infer_arch, read_official_pickle

    state = read_official_pickle(path)
    params, bn_state = state[f"{which}_params"], state[f"{which}_state"]
    try:
        name = arch if arch is not None else infer_arch(params)
        sd = haiku_to_torchvision(params, bn_state)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{str(path)!r} ({which} encoder): {err}") from None
    model = load_into(_build(name), sd, str(path))
    lin = None
    if head:
        # The classifier is trained on the online representation; it is the ImageNet head for either encoder.
        try:
            c = haiku_classifier(state["online_params"])
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{str(path)!r} (head=True): {err}") from None
        lin = _linear(c["weight"], c["bias"], repr(str(path)))
    return model, name, {}, lin


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


def load_backbone(source: str | os.PathLike, which: str = "online", padding: str | None = None,
                  arch: str | nn.Module | None = None, head: bool = False, sha256: str | None = None,
                  trust: bool | None = None) -> nn.Module:
    """Load an encoder (features [B, D], eval mode) from any supported source; see the module docstring.

    ``padding``: "torch" or "tf_same"; default "tf_same" for the official BYOL release (exact Haiku semantics for
    stride-2 layers), the file's recorded padding for our exports, "torch" otherwise. ``head=True`` returns
    encoder + saved linear classifier (a method's online classifier) as one module giving logits. ``sha256`` pins a
    URL or file; ``trust=True`` accepts a pretrained entry whose sha256 is not yet verified (zoo.list_pretrained()).
    """
    if which not in ("online", "target"):
        raise ValueError(f"which={which!r}: choose 'online' or 'target'.")
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
    # Plain pickles (not torch's zip container) are only ever read by the restricted official-BYOL unpickler.
    if fmt == "pickle" and path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        model, name, ov, lin = _from_official(path, which, arch, head)
        return _finish(model, name, ov, padding or "tf_same", src, which, lin)
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
        return _plain(tensors, src, arch, padding, head)
    if fmt not in ("zip", "pickle"):
        raise ValueError(f"{src}: unknown weight format (not a torch file, safetensors or pickle).")
    obj = load_torch_file(path)
    if is_lightning_checkpoint(obj):
        model, name, ov, lin = _from_lightning(obj, src, which, arch, head)
        return _finish(model, name, ov, padding or "torch", src, which, lin)
    tensors, _ = load_state_dict_file(path)
    return _plain(tensors, src, arch, padding, head)


def _plain(tensors: dict[str, torch.Tensor], src: str, arch: str | nn.Module | None, padding: str | None,
           head: bool) -> nn.Module:
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
    return _finish(model, arch, {}, padding or "torch", src, "online", lin)
