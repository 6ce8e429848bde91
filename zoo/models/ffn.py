"""The dense feed-forward block of a Transformer layer, apart so that the routed FFN (``zoo.models.routing``, whose
experts are exactly this block) and the Transformer (``zoo.models.transformer``) both import it without importing
each other."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class DenseFFN(nn.Module):
    """GeGLU (tanh GELU gate, Gemma) or a plain GELU MLP (Gopher); called as ffn(x, input_ids)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gated = config.ffn != "gelu"
        d, h = config.d_model, config.d_ff
        self.gate_proj = nn.Linear(d, h, bias=False) if self.gated else None
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: Tensor, input_ids: Tensor | None = None) -> Tensor:
        """[B, T, D] -> [B, T, D]; input_ids is unused (same signature as the routed FFN)."""
        if self.gated:
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
