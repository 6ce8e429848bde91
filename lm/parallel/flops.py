"""The one FLOP and parameter counter of the zoo Transformer. Three counts, three names:

* ``mfu_flops_per_token(model_or_config, seq_len)``: training FLOPs per token as MFU is usually reported
  (PaLM, Chowdhery et al. 2022, App. B): 6 x the matmul weights a token passes through (inactive routed experts
  excluded, the tied output projection included) + 6 L H hd T for causal attention, sliding windows ignored so
  figures compare across implementations. Used for the logged ``perf/mfu``.
* ``forward_flops`` / ``training_flops(config, tokens, seq_len)``: the detailed count below, for scaling laws.
* ``flops_6nd(N, D)``: the C = 6 N D approximation.

The detailed count follows Hoffmann et al. 2022, Appendix F, per sequence of T tokens, forward pass:
  embeddings 2 T V d; per layer: Q/K/V projections 2 T d (H + 2 K) hd, logits 2 T^2 H hd, softmax 3 H T^2,
  softmax @ values 2 T^2 H hd, output projection 2 T H hd d, feed-forward 2 T (m d f); final logits 2 T d V;
  training = 3 x forward (backward = 2 x forward).
Generalised to our one Transformer: K = kv heads (GQA/MQA), m = 3 weight matrices for GeGLU and 2 for the GELU
MLP, routed FFN layers add a router (2 T d E) and run one expert per token. Relative-position terms of the
Transformer-XL variant, norms and soft-caps are not counted (each well under 1% for the shapes in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zoo.models.lm_blocks import ROUTED, layer_ffn_kind

__all__ = ["FlopBreakdown", "flops_6nd", "forward_flops", "training_flops", "param_count", "tokens_for_budget",
           "matmul_params", "attention_flops_per_token", "mfu_flops_per_token"]


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of one sequence, by part (Chinchilla Appendix F rows)."""

    embeddings: float
    attention_qkv: float
    attention_logits: float
    attention_softmax: float
    attention_reduce: float
    attention_project: float
    feed_forward: float
    router: float
    logits: float

    @property
    def forward(self) -> float:
        """Total forward FLOPs of the sequence."""
        return (self.embeddings + self.attention_qkv + self.attention_logits + self.attention_softmax
                + self.attention_reduce + self.attention_project + self.feed_forward + self.router + self.logits)

    @property
    def training(self) -> float:
        """Forward + backward FLOPs (backward counted as twice the forward)."""
        return 3.0 * self.forward


def flops_6nd(N: float, D: float) -> float:
    """The standard training-compute approximation C = 6 N D."""
    if N <= 0 or D <= 0:
        raise ValueError(f"N and D must be positive; got N={N}, D={D}")
    return 6.0 * float(N) * float(D)


def _field(config: Any, name: str) -> Any:
    if not hasattr(config, name):
        raise ValueError(f"config {type(config).__name__} has no field {name!r}; pass a zoo TransformerConfig")
    return getattr(config, name)


def forward_flops(config: Any, seq_len: int) -> FlopBreakdown:
    """Detailed forward FLOPs of one sequence of ``seq_len`` tokens for a TransformerConfig (see module doc)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    T = float(seq_len)
    d, V, n_layers = _field(config, "d_model"), _field(config, "vocab_size"), _field(config, "n_layers")
    H, K, hd, f = (_field(config, k) for k in ("n_heads", "n_kv_heads", "head_dim", "d_ff"))
    ffn = _field(config, "ffn")
    mats = layer_ffn_kind(config, ffn == ROUTED).matmuls  # the FFN table: gated kinds have a third matrix
    n_routed = sum(1 for i in range(n_layers) if config.is_routed(i)) if ffn == ROUTED else 0
    # Hash routing is a table lookup: no router matmul.
    E = 0 if getattr(config, "router", "") == "hash" else int(getattr(config, "n_experts", 1))
    return FlopBreakdown(
        embeddings=2 * T * V * d,
        attention_qkv=n_layers * 2 * T * d * (H + 2 * K) * hd,
        attention_logits=n_layers * 2 * T * T * H * hd,
        attention_softmax=n_layers * 3 * H * T * T,
        attention_reduce=n_layers * 2 * T * T * H * hd,
        attention_project=n_layers * 2 * T * H * hd * d,
        # One expert per token: a routed layer does the work of one dense FFN plus its router.
        feed_forward=n_layers * 2 * T * mats * d * f,
        router=n_routed * 2 * T * d * E,
        logits=2 * T * d * V,
    )


def training_flops(config: Any, tokens: float, seq_len: int, method: str = "detailed",
                   n_params: float | None = None) -> float:
    """Training FLOPs for ``tokens`` tokens: 'detailed' (Appendix F count) or '6nd' (N = non-embedding params)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if method == "detailed":
        return forward_flops(config, seq_len).training * float(tokens) / seq_len
    if method == "6nd":
        return flops_6nd(n_params if n_params is not None else param_count(config, embedding=False), tokens)
    raise ValueError(f"method={method!r}; use 'detailed' or '6nd'")


def param_count(config: Any, embedding: bool = True) -> int:
    """Exact parameter count of the zoo Transformer built from ``config`` (on the meta device: no memory)."""
    from zoo.models.transformer import Transformer

    with torch.device("meta"):
        return int(Transformer(config).num_params(embedding=embedding))


def tokens_for_budget(C: float, N: float) -> float:
    """Tokens D that spend compute C on a model of N parameters under C = 6 N D."""
    if C <= 0 or N <= 0:
        raise ValueError(f"C and N must be positive; got C={C}, N={N}")
    return C / (6.0 * N)


def matmul_params(model: nn.Module, vocab_size: int | None = None) -> int:
    """Parameters used in a matmul per token: Linear weights, inactive routed experts excluded, tied head included."""
    from zoo.models.routing import RoutedFFN

    inactive: set[int] = set()
    for m in model.modules():
        if isinstance(m, RoutedFFN):
            # One expert per token: all but one expert's weights do no work for a given token.
            for expert in list(m.experts)[1:]:
                inactive.update(id(p) for p in expert.parameters())
    seen: set[int] = set()
    n, head_found = 0, False
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            if id(w) in seen or id(w) in inactive:
                continue
            seen.add(id(w))
            n += w.numel()
            if vocab_size is not None and w.shape[0] == vocab_size:
                head_found = True
    if vocab_size is not None and not head_found:
        # Tied embedding: the output projection reuses the embedding matrix, which is still a V x D matmul.
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size:
                n += m.weight.numel()
                break
    return n


def attention_flops_per_token(n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Causal attention matmul FLOPs per token for training (fwd+bwd): 6 * L * H * hd * T (half of 12 L H hd T)."""
    return 6.0 * n_layers * n_heads * head_dim * seq_len


def mfu_flops_per_token(model: nn.Module | Any, seq_len: int) -> float:
    """Training FLOPs per token for MFU (see module doc) of a built Transformer or a TransformerConfig (meta build)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not isinstance(model, nn.Module):
        from zoo.models.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(model)
    c = model.config
    return (6.0 * matmul_params(model, c.vocab_size)
            + attention_flops_per_token(c.n_layers, c.n_heads, c.head_dim, seq_len))
