"""Attention math for the zoo Transformer: RoPE, relative positions, masks, backends and the KV cache.

Pure functions (tensors in, tensors out) so each backend can be tested against the eager reference. Shapes:
q [B, Hq, Tq, hd], k/v [B, Hkv, Tk, hd]; positions are absolute token indices (int64), ``-1`` marks an empty
cache slot. A key j is visible from query i when ``0 <= pos_j <= pos_i`` and, for a sliding window W,
``pos_i - pos_j < W`` (W keys including the current one, as Gemma 2 counts them).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "eager", "sdpa", "flex")


# ----------------------------------------------------------------------------------------------- positions
def rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, head_dim] for RoPE, half-split layout (the one Hugging Face Gemma checkpoints use)."""
    # Computed in float32 from scratch each call: no buffer to keep, so meta-device models stay allocation-free.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by the RoPE tables [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    # Tables follow x's dtype: under autocast x is bf16 while the tables were built for the fp32 residual stream,
    # and promoting q/k to fp32 would send the attention kernel down its slow fp32 path.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotated * sin


def sinusoid_table(distances: Tensor, dim: int) -> Tensor:
    """Transformer-XL sinusoidal embedding [N, dim] of relative distances (float32)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def relative_position_logits(q_pos_bias: Tensor, rel: Tensor | None, distance: Tensor) -> Tensor:
    """Position term (q_i + v) . r_{i-j} as [B, H, Tq, Tk].

    q_pos_bias [B, H, Tq, hd] is the query plus the position bias v; rel [N, H, hd] holds projected embeddings of
    distances 0..N-1; distance [Tq, Tk] is pos_i - pos_j (entries outside 0..N-1 are masked later anyway).
    With ``rel=None``, q_pos_bias already is the per-distance table [B, H, Tq, N] and is only gathered.
    """
    per_distance = q_pos_bias if rel is None else torch.einsum("bhqd,nhd->bhqn", q_pos_bias, rel)
    index = distance.clamp(0, per_distance.shape[-1] - 1)
    index = index.expand(per_distance.shape[0], per_distance.shape[1], -1, -1)
    return torch.gather(per_distance, -1, index)


# ----------------------------------------------------------------------------------------------- masks
def visible(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean [Tq, Tk]: which keys each query may attend to (causal, optional window of W keys incl. itself)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= (qp - kp) < window
    return allowed


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    # kv head g serves query heads g*n_rep .. (g+1)*n_rep-1, the grouping Hugging Face checkpoints assume.
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


# ----------------------------------------------------------------------------------------------- backends
def eager_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor, cap: float | None = None,
                    bias: Tensor | None = None) -> Tensor:
    """Reference attention: scores*scale (+bias), soft-cap, mask, float32 softmax. Returns [B, Hq, Tq, hd]."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    scores = softcap(scores, cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None,
                   bias: Tensor | None = None) -> Tensor:
    """PyTorch scaled_dot_product_attention (no soft-cap). ``mask=None`` means plain causal over equal lengths."""
    gqa = q.shape[1] != k.shape[1]
    if bias is not None:
        additive = bias.masked_fill(~mask, float("-inf")) if mask is not None else bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive.to(q.dtype), scale=scale, enable_gqa=gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _mask_mod(window: int | None):
    if window is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


_BLOCK_MASKS: dict = {}  # (seq_len, window, device) -> BlockMask, built once per shape for the whole process


def make_block_mask(seq_len: int, window: int | None, device: str):
    """FlexAttention BlockMask for causal attention over positions 0..T-1, optionally a window of W keys (cached).

    Built once per (seq_len, window, device) and reused by every layer and step. A compiled graph reads a cached
    mask as a constant (no graph break, no recompile); one missing at trace time is built inside the graph instead
    (correct, but rebuilt each step): call ``Transformer.prepare_block_masks`` before compiling to avoid that.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    key = (int(seq_len), window, str(device))
    mask = _BLOCK_MASKS.get(key)
    if mask is not None:
        return mask
    mask = create_block_mask(_mask_mod(window), None, None, seq_len, seq_len, device=device)
    if not torch.compiler.is_compiling():  # a traced mask holds graph tensors: it must not outlive its graph
        _BLOCK_MASKS[key] = mask
    return mask


def relative_score_mod(per_distance: Tensor, cap: float | None):
    """score_mod adding the relative-position term per_distance[b, h, i, i - j] (then the soft-cap) to a score.

    per_distance [B, H, Tq, N] holds (q_i + v) . r_d * scale for distances d = 0..N-1; masked pairs (negative or
    beyond-window distances) are clamped here and removed by the block mask, as in the eager path.
    """
    last = per_distance.shape[-1] - 1

    def mod(score, b, h, q_idx, kv_idx):
        s = score + per_distance[b, h, q_idx, (q_idx - kv_idx).clamp(0, last)]
        return s if cap is None else cap * torch.tanh(s / cap)
    return mod


@functools.lru_cache(maxsize=16)
def _score_mod(cap: float | None):
    if cap is None:
        return None

    def mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return mod


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, cap: float | None, window: int | None,
                   compiled: bool | None = None, block_mask=None, per_distance: Tensor | None = None) -> Tensor:
    """FlexAttention over a full causal sequence (positions 0..T-1): soft-cap (and relative positions, given
    ``per_distance`` [B, H, T, N]) as score_mod, causal + window as a block mask.

    Compiled (fused kernel) on CUDA by default; uncompiled elsewhere, where PyTorch falls back to an unfused
    implementation that is slow but exact -- that is what the CPU tests exercise. Inside an outer torch.compile
    the call is traced into that graph, whatever the device.
    """
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if q.shape[2] != k.shape[2]:
        raise ValueError("flex backend handles full sequences only (no KV cache); use 'eager' or 'sdpa' instead")
    if compiled is None:
        compiled = q.is_cuda
    if block_mask is None:
        block_mask = make_block_mask(q.shape[2], window, str(q.device))
    mod = _score_mod(cap) if per_distance is None else relative_score_mod(per_distance, cap)
    fn = _compiled_flex() if compiled and not torch.compiler.is_compiling() else _flex
    return fn(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def pick_backend(requested: str, *, cap: float | None, relative: bool, cached: bool, device: torch.device) -> str:
    """Resolve ``auto`` and reject combinations a backend cannot do exactly."""
    if requested not in BACKENDS:
        raise ValueError(f"attn_backend={requested!r}; expected one of {BACKENDS}")
    if requested == "auto":
        # Relative positions on the GPU go to flex too: its score_mod reads the [B, H, T, N] per-distance table
        # instead of materialising a [B, H, T, T] bias for SDPA.
        if device.type == "cuda" and not cached:
            return "flex" if cap is not None or relative else "sdpa"
        return "eager" if cap is not None else "sdpa"
    if requested == "sdpa" and cap is not None:
        raise ValueError("attn_backend='sdpa' cannot apply attn_softcap; use 'flex', 'eager' or 'auto'")
    if requested == "flex" and (cached or (device.type == "cpu" and torch.is_grad_enabled())):
        # Generation steps and CPU training (PyTorch's flex has no CPU backward, compiled or not) take the exact
        # eager/SDPA path; both compile without graph breaks.
        return "eager" if cap is not None else "sdpa"
    return requested


# ----------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Per-layer key/value ring buffers for generation.

    Global layers get ``max_len`` slots (never wrap); sliding-window layers get ``min(W, max_len)`` slots, so a
    long generation keeps only the W most recent keys. Slot of position p is ``p % size``; ``pos`` records which
    position each slot holds (-1 = empty), which is all the masks and relative distances need.
    """

    def __init__(self, max_len: int, sizes: list[int], batch: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.k = [torch.zeros(batch, n_kv_heads, s, head_dim, device=device, dtype=dtype) for s in sizes]
        self.v = [torch.zeros(batch, n_kv_heads, s, head_dim, device=device, dtype=dtype) for s in sizes]
        self.pos = [torch.full((s,), -1, device=device, dtype=torch.long) for s in sizes]
        self.max_len = max_len  # positions the cache may hold in total (local layers keep only their window)
        self.seen = 0  # tokens already written (the next token's position)

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, pos_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store new keys/values; return (keys, values, positions) the new queries attend over."""
        kb, vb, pb = self.k[layer], self.v[layer], self.pos[layer]
        size, t = pb.shape[0], pos_new.shape[0]
        if t == 1:
            # One token: the slot it overwrites holds position p - size, already outside any window.
            slot = pos_new % size
            kb.index_copy_(2, slot, k_new)
            vb.index_copy_(2, slot, v_new)
            pb.index_copy_(0, slot, pos_new)
            return kb, vb, pb
        # Several tokens (prefill): early queries may still need keys a later write would evict, so attend over
        # old buffer + new keys, then keep the last `size` new ones.
        k_all, v_all, p_all = torch.cat((kb, k_new), 2), torch.cat((vb, v_new), 2), torch.cat((pb, pos_new))
        keep = slice(max(0, t - size), t)
        slot = pos_new[keep] % size
        kb.index_copy_(2, slot, k_new[:, :, keep])
        vb.index_copy_(2, slot, v_new[:, :, keep])
        pb.index_copy_(0, slot, pos_new[keep])
        return k_all, v_all, p_all


def default_query_scale(head_dim: int) -> float:
    """1/sqrt(head_dim), the usual query scale."""
    return 1.0 / math.sqrt(head_dim)
