"""Turning tensors into a loaded encoder: build it by name, load a state dict strictly (wrapper prefixes bridged,
classifier heads dropped, NaN refused), add TF-SAME padding and provenance. Shared by ``zoo.load_backbone``
(``backbone.py``) and the timm-folder reader (``hub.py``), which both import it (neither imports the other's
internals, so the two never form an import circle).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.weights.safe_load import check_weights

__all__ = ["PADDINGS", "BackboneWithHead", "load_into"]

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


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, source: str = "the classifier") -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    check_weights({"classifier.weight": weight, **({} if bias is None else {"classifier.bias": bias})}, source,
                  dict(lin.named_parameters(prefix="classifier")))
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin
