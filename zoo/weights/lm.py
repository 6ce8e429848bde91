"""Loading a trained language model: ``zoo.load_lm(name | checkpoint | run folder | Hugging Face folder)``.

LM training modules write a contract into each checkpoint, read here and nowhere else::

    checkpoint["zoo"] = {"format": 1, "kind": "lm", "model": <registry name>, "overrides": {...}, "prefix": "model.",
                         "tokenizer": <the data module's tokenizer spec: "byte", a file path, or None>}

so a reader rebuilds the architecture with ``zoo.create(model, **overrides)`` and takes the state-dict entries under
``prefix``, without knowing which module wrote the file. Checkpoints written before the contract existed are read
through their Lightning hyper-parameters (``model``/``model_overrides``, or ``student``/``student_overrides`` of a
distillation run), the only other place they recorded it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_KIND = "lm"


@dataclass
class LMCheckpoint:
    """What a language-model checkpoint says about its model, and the model's own state dict (prefix removed)."""

    path: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    tokenizer: str | None = None  # as the data module named it ("byte", a tokenizer file); None when not recorded


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A .ckpt file (or sharded checkpoint folder) as given, or the one a run folder holds: its last.ckpt, else the
    newest *.ckpt inside."""
    from zoo.weights.safe_dcp import is_sharded_checkpoint

    path = str(path)
    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        found = sorted((p for p in Path(path).rglob("*.ckpt") if p.is_file() or is_sharded_checkpoint(p)),
                       key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
        if not found:
            raise FileNotFoundError(f"no .ckpt file under {path!r}; train the model first "
                                    "(e.g. `zoo fit --config configs/lm/stdlib_gemma2_tiny.yaml`)")
        return str(found[-1])
    return path


def read_lm_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LMCheckpoint:
    """Read a language-model checkpoint (file, sharded folder or run folder) through the safe loaders: contract
    first, old layout next."""
    from zoo.weights.checkpoint import checkpoint_contract, read_checkpoint
    from zoo.weights.safe_dcp import is_sharded_checkpoint, read_sharded_checkpoint

    spec = resolve_checkpoint(path)
    if is_sharded_checkpoint(spec):  # a sharded (FSDP2) run's folder, read through the safe DCP reader
        ckpt = read_sharded_checkpoint(spec)
    elif not os.path.isfile(spec):
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist; train one with `zoo fit --config ...` "
                                "or pass a model name from zoo.available()")
    else:
        # The project's one reader of Lightning checkpoints (safe loader): truncated, empty and hostile files give
        # one clear error naming the file.
        ckpt = read_checkpoint(spec, map_location)
    contract = checkpoint_contract(ckpt, source=f"checkpoint {spec!r}")
    if contract is not None and contract["kind"] == CHECKPOINT_KIND:
        name, overrides, prefix = contract["model"], contract.get("overrides"), contract.get("prefix", "model.")
        tokenizer = contract.get("tokenizer")
    elif contract is not None:
        raise ValueError(f"checkpoint {spec!r} holds a {contract.get('kind')!r} model, not a language model; "
                         "load it with zoo.load_backbone(path)")
    else:
        hp = ckpt.get("hyper_parameters") or {}
        prefix, tokenizer = "model.", None
        if "student" in hp:  # a distillation checkpoint: the student is the trained model
            name, overrides = hp["student"], hp.get("student_overrides")
        elif "model" in hp:
            name, overrides = hp["model"], hp.get("model_overrides")
        else:
            raise ValueError(f"checkpoint {spec!r} has neither a 'zoo' contract nor lm.CausalLM / lm.Distill "
                             "hyper-parameters; it was not written by this project's language-model trainer")
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return LMCheckpoint(spec, str(name), dict(overrides or {}), state, tokenizer)


def is_checkpoint_spec(spec: str) -> bool:
    """Whether ``spec`` names a file or folder (rather than a registry entry)."""
    return spec.endswith(".ckpt") or os.path.sep in spec or os.path.exists(spec)


def load_lm(spec: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """A zoo Transformer in eval mode from a registry name (random init), an LM checkpoint or run folder, or a
    Hugging Face Gemma folder."""
    from zoo.models.registry import create

    spec = str(spec)
    if not is_checkpoint_spec(spec):
        return create(spec)
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        from zoo.weights.hf import from_hf

        return from_hf(spec, device=map_location).eval()
    ckpt = read_lm_checkpoint(spec, map_location)
    return build_from_checkpoint(ckpt).eval()


def build_from_checkpoint(ckpt: LMCheckpoint, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The checkpoint's model (its registry name and overrides, updated by ``overrides``) with its weights; NaN/Inf
    or integer weights where the model holds floating ones are refused, naming the file and tensor."""
    from zoo.models.registry import create
    from zoo.weights.safe_load import check_weights

    overrides = {**ckpt.overrides, **(overrides or {})}
    model = create(ckpt.model, **overrides)
    check_weights(ckpt.state_dict, f"checkpoint {ckpt.path!r}", model.state_dict())
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {ckpt.path!r} does not match model {ckpt.model!r} with overrides "
                         f"{overrides}: {str(err).splitlines()[0]}") from None
    return model
