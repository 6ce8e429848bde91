"""The dense feed-forward block of a Transformer layer, apart so that the routed FFN (``zoo.models.routing``, whose
experts are exactly this block) and the Transformer (``zoo.models.transformer``) both import it without importing
each other. Its kind (gated or not, which activation) comes from the one table, ``zoo.models.lm_blocks``."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

# The activation of each FfnKind.activation (zoo.models.lm_blocks).
ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


class DenseFFN(nn.Module):
    """A dense FFN of the kind table: gated (GeGLU: Gemma; SwiGLU: Llama) or a plain MLP (GELU: Gopher); called as
    ffn(x, input_ids). A routed model's dense layers are of its experts' kind. ``config`` is a
    ``zoo.models.transformer.TransformerConfig``."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        kind = config.dense_ffn()
        self.gated, self.act = kind.gated, ACTIVATIONS[kind.activation]
        d, h = config.d_model, config.d_ff
        self.gate_proj = nn.Linear(d, h, bias=False) if self.gated else None
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: Tensor, input_ids: Tensor | None = None) -> Tensor:
        """[B, T, D] -> [B, T, D]; input_ids is unused (same signature as the routed FFN)."""
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
