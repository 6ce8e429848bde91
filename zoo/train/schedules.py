"""Learning-rate schedules as pure functions of the step: one warmup + cosine shape for every trainer in the zoo.

``warmup_cosine`` is linear warmup over ``warmup_steps`` then half-cosine decay from ``peak`` to ``final``, ending at
``total_steps``; from then on the value is ``final``. Steps count optimizer steps from 0 (the step about to be
taken, as ``LambdaLR`` passes it). Two warmup starts are in use and are named, not mixed:

- ``warmup_start="zero"`` (default): step ``s`` of the warmup gets ``peak * s / warmup_steps``, so step 0 has lr 0
  and the peak is reached at ``s = warmup_steps`` -- BYOL (Grill et al. 2020 and the authors' ``schedules.py``);
- ``warmup_start="one"``: step ``s`` gets ``peak * (s + 1) / warmup_steps``, so the first step already moves and the
  last warmup step reaches the peak -- the LM trainer (``lm.modules.optim.lr_at``, nanoGPT-style).

Callers: ``byol.functional.lr_schedule`` (zero, final 0), ``zoo.eval.linear.cosine_factor`` (no warmup, final 0),
``lm.modules.optim.lr_at`` (one, final ``min_lr_ratio * peak``), ``simsiam`` (zero, final 0).
"""
from __future__ import annotations

import math

__all__ = ["WARMUP_STARTS", "warmup_cosine"]

WARMUP_STARTS = ("zero", "one")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, peak: float = 1.0, final: float = 0.0,
                  warmup_start: str = "zero") -> float:
    """Value at ``step`` of linear warmup to ``peak``, then cosine decay to ``final`` at ``total_steps``."""
    if warmup_start not in WARMUP_STARTS:
        raise ValueError(f"warmup_start must be one of {WARMUP_STARTS}, got {warmup_start!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return peak * (step + (warmup_start == "one")) / warmup_steps
    if step >= total_steps:
        return final
    span = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, span) / span
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return final + (peak - final) * cosine
