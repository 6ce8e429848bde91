"""Optimiser pieces for language models: AdamW parameter groups and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from zoo.train.schedules import warmup_cosine

# Module types whose weights are scales or lookup tables, not projections: weight decay would only shrink them.
_NO_DECAY_TYPES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step``: linear warmup to ``peak_lr``, then cosine decay to ``min_lr_ratio * peak_lr``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    # warmup_start="one": the first step already has peak / warmup (zoo.train.schedules names both conventions)
    return warmup_cosine(step, total_steps, warmup_steps, peak_lr, final=peak_lr * min_lr_ratio, warmup_start="one")


def _is_norm(module: nn.Module) -> bool:
    # The zoo Transformer's RMSNorm is its own class; recognise any norm by name so new norm types are covered.
    return isinstance(module, _NO_DECAY_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed norms, biases and embeddings (shared weights counted once)."""
    no_decay: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if _is_norm(module) or isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in own)
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("bias") or p.ndim < 2:
                no_decay.add(id(p))
    decay, keep = [], []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields a tied weight once, so it lands in exactly one group
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (keep if id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_adamw(params: Iterable | list[dict], lr: float, betas: tuple[float, float], eps: float = 1e-8
               ) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters) and the reference loop elsewhere."""
    groups = list(params)
    on_cuda = all(p.is_cuda for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
    kwargs = {"fused": True} if on_cuda and torch.cuda.is_available() else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_optim_args(hp: Any) -> None:
    """Refuse impossible optimiser settings before training, naming the key (``model.<key>`` in a config): NaN and
    Inf are refused everywhere (an Inf weight decay or lr turns every weight into NaN at the first step)."""
    if not (_finite(hp.lr) and hp.lr > 0):
        raise ValueError(f"model.lr must be a positive finite number, got {hp.lr}")
    if not (_finite(hp.weight_decay) and hp.weight_decay >= 0):
        raise ValueError(f"model.weight_decay must be a finite number >= 0, got {hp.weight_decay}")
    if not (_finite(hp.warmup_steps) and hp.warmup_steps >= 0):
        raise ValueError(f"model.warmup_steps must be >= 0, got {hp.warmup_steps}")
    if hp.get("total_steps") is not None and not (_finite(hp.total_steps) and hp.total_steps > 0):
        raise ValueError(f"model.total_steps must be a positive integer or null, got {hp.total_steps}")
    if not (_finite(hp.min_lr_ratio) and 0.0 <= hp.min_lr_ratio <= 1.0):
        raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {hp.min_lr_ratio}")
    if len(hp.betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in hp.betas):
        raise ValueError(f"model.betas must be two numbers in [0, 1), got {hp.betas}")
    if "eps" in hp and not (_finite(hp.eps) and hp.eps > 0):
        raise ValueError(f"model.eps must be a positive finite number, got {hp.eps}")
