"""ONE decoder-only Transformer; Gemma, Gemma 2, Gopher and Chinchilla are configs of it (see zoo/models/lm_configs.py).

Per block (pre-norm, optional post-norms as in Gemma 2):
    x = x + post_attn_norm(attn(attn_norm(x)))
    x = x + post_ffn_norm(ffn(ffn_norm(x), input_ids))
Attention math, backends and the KV cache live in zoo/models/attention.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.models import attention as A
from zoo.models.ffn import DenseFFN
from zoo.models.lm_blocks import FFN_KINDS as DENSE_FFN_KINDS
from zoo.models.lm_blocks import ROUTED, ffn_kind, layer_ffn_kind

if TYPE_CHECKING:
    from zoo.models.lm_blocks import FfnKind
    from zoo.models.routing import RoutingAux

ROUTERS = ("sbase", "hash", "rlr")


# Fields read only by routed FFN layers, and those read only by some routers (see _refuse_dead_knobs).
_ROUTED_ONLY = ("n_experts", "router", "routing_frequency", "expert_ffn", "sinkhorn_iters", "hash_seed",
                "balance_bias_momentum")
_ROUTER_ONLY = {"sinkhorn_iters": ("sbase",), "balance_bias_momentum": ("sbase",), "hash_seed": ("hash",)}


@dataclass
class TransformerConfig:
    """Every switch of the Transformer; model families differ only by these values."""

    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1024  # hidden size of the FFN (per GeGLU branch)
    max_seq_len: int = 2048
    ffn: str = "geglu"  # a kind of zoo.models.lm_blocks.FFN_KINDS (geglu, swiglu, gelu) | "routed" (RoutedFFN)
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + w), w initialised to 0 (Gemma)
    post_norms: bool = False  # extra RMSNorm on the attention and FFN outputs (Gemma 2)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) rounded to the activation dtype (Gemma)
    tie_embeddings: bool = True
    query_scale: float | None = None  # None: head_dim ** -0.5
    positions: str = "rope"  # "rope" | "relative" (Transformer-XL: relative keys, content and position biases)
    rope_base: float = 10000.0
    window: int | None = None  # sliding window W (keys incl. the current one) of "local" layers
    layer_pattern: tuple[str, ...] = ("global",)  # cycled over layers; Gemma 2: ("local", "global")
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_backend: str = "auto"  # "auto" | "eager" | "sdpa" | "flex" (see zoo.models.attention.pick_backend)
    n_experts: int = 1
    router: str = "sbase"  # "sbase" | "hash" | "rlr"
    routing_frequency: int = 1  # with ffn="routed", layer i is routed iff i % routing_frequency == routing_frequency-1
    expert_ffn: str = "geglu"  # kind of each routed expert (a dense kind): the dense FFN it replaces
    sinkhorn_iters: int = 8  # S-BASE balancing iterations
    hash_seed: int = 0  # Hash router's fixed token -> expert map
    balance_bias_momentum: float = 0.99  # S-BASE eval-time routing bias: running mean of Sinkhorn's balancing
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.layer_pattern = tuple(self.layer_pattern)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.ffn != ROUTED:  # a dense kind of the one table (read now: a family may have added its kind)
            if self.ffn not in DENSE_FFN_KINDS:
                raise ValueError(f"ffn={self.ffn!r}; expected one of {(*DENSE_FFN_KINDS, ROUTED)}")
        ffn_kind(self.expert_ffn, "expert_ffn")  # a dense kind of the table (ValueError naming the field if not)
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r}; expected one of {ROUTERS}")
        if self.positions not in ("rope", "relative"):
            raise ValueError(f"positions={self.positions!r}; expected 'rope' or 'relative'")
        if self.attn_backend not in A.BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r}; expected one of {A.BACKENDS}")
        bad = [t for t in self.layer_pattern if t not in ("global", "local")]
        if bad or not self.layer_pattern:
            raise ValueError(f"layer_pattern={self.layer_pattern!r}; use a non-empty tuple of 'global'/'local'")
        if "local" in self.layer_pattern and (self.window is None or self.window < 1):
            raise ValueError(f"layer_pattern has 'local' layers but window={self.window!r}; set window >= 1")
        if self.routing_frequency < 1:
            raise ValueError(f"routing_frequency={self.routing_frequency} must be >= 1")
        self._refuse_dead_knobs()

    def _refuse_dead_knobs(self) -> None:
        # A router setting that the chosen FFN / router never reads is an error, not a silent no-op.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.ffn != ROUTED:
            unused, why = _ROUTED_ONLY, f"ffn={self.ffn!r} is dense; set ffn='routed' to use it, or remove the key"
        else:
            unused = tuple(k for k, routers in _ROUTER_ONLY.items() if self.router not in routers)
            why = f"router={self.router!r} does not read it; remove the key"
        for key in unused:
            if getattr(self, key) != defaults[key]:
                raise ValueError(f"{key}={getattr(self, key)!r} has no effect: {why}")

    @property
    def scale(self) -> float:
        """Query scale actually used."""
        return self.query_scale if self.query_scale is not None else A.default_query_scale(self.head_dim)

    def layer_window(self, i: int) -> int | None:
        """Sliding window of layer i (None for global layers)."""
        return self.window if self.layer_pattern[i % len(self.layer_pattern)] == "local" else None

    def is_routed(self, i: int) -> bool:
        """Whether layer i uses the routed FFN."""
        return self.ffn == ROUTED and i % self.routing_frequency == self.routing_frequency - 1

    def dense_ffn(self) -> "FfnKind":
        """The table entry of the dense FFN this model computes with (a routed model's: its experts' kind)."""
        return layer_ffn_kind(self, self.ffn == ROUTED)

    def replace(self, **overrides) -> "TransformerConfig":
        """Copy with fields overridden; unknown names raise a ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s) {unknown}; valid fields: {sorted(names)}")
        # Derived fields follow their sources when they were derived: an MHA model stays MHA with a new head count,
        # and a head_dim of d_model // n_heads is recomputed when either changes.
        if overrides.get("ffn") == ROUTED and "expert_ffn" not in overrides and self.ffn != ROUTED:
            overrides["expert_ffn"] = self.ffn  # a routed Gopher keeps GELU experts, a routed Gemma GeGLU ones
        if overrides.get("ffn", self.ffn) != ROUTED and self.ffn == ROUTED:
            # Back to a dense FFN: the routed settings go with it (they would be dead knobs).
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            overrides = {**{k: defaults[k] for k in _ROUTED_ONLY}, **overrides}
        if "n_heads" in overrides and "n_kv_heads" not in overrides and self.n_kv_heads == self.n_heads:
            overrides["n_kv_heads"] = None
        if ({"n_heads", "d_model"} & set(overrides) and "head_dim" not in overrides
                and self.head_dim == self.d_model // self.n_heads):
            overrides["head_dim"] = None
        return dataclasses.replace(self, **overrides)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back; scale (1 + w) with unit_offset, else w."""

    def __init__(self, dim: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (h * (1.0 + w if self.unit_offset else w)).type_as(x)


class Attention(nn.Module):
    """Multi-head / grouped / multi-query attention with RoPE or Transformer-XL relative positions."""

    def __init__(self, config: TransformerConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.layer, self.n_heads, self.n_kv, self.hd = layer, c.n_heads, c.n_kv_heads, c.head_dim
        self.window, self.cap, self.scale = c.layer_window(layer), c.attn_softcap, c.scale
        self.relative = c.positions == "relative"
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        if self.relative:
            # Transformer-XL: r_{i-j} = W_r sinusoid(i-j); u (content bias) and v (position bias) per head.
            self.r_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
            self.content_bias = nn.Parameter(torch.zeros(c.n_heads, c.head_dim))
            self.position_bias = nn.Parameter(torch.zeros(c.n_heads, c.head_dim))

    def forward(self, x: Tensor, ctx: "StepContext") -> Tensor:
        """x [B, T, D] -> [B, T, D]; ctx carries positions, RoPE tables, cache, backend and block masks."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if ctx.rope is not None:
            q, k = A.apply_rope(q, *ctx.rope), A.apply_rope(k, *ctx.rope)
        pos, k_pos, cache = ctx.pos, ctx.pos, ctx.cache
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, pos)
        bias = per_distance = None
        if self.relative:
            per_distance = self._per_distance_logits(q, ctx.end, x.dtype)
            if ctx.backend != "flex":  # flex reads the [B, H, T, N] table in its score_mod instead
                bias = A.relative_position_logits(per_distance, None, pos[:, None] - k_pos[None, :])
            q = q + self.content_bias[None, :, None, :].to(q.dtype)
        if ctx.backend == "flex":
            out = A.flex_attention(q, k, v, scale=self.scale, cap=self.cap, window=self.window,
                                   block_mask=ctx.block_masks.get(self.window), per_distance=per_distance)
        elif ctx.backend == "sdpa":
            plain = cache is None and self.window is None and bias is None
            mask = None if plain else A.visible(pos, k_pos, self.window)
            out = A.sdpa_attention(q, k, v, scale=self.scale, mask=mask, bias=bias)
        else:
            out = A.eager_attention(q, k, v, scale=self.scale, mask=A.visible(pos, k_pos, self.window),
                                    cap=self.cap, bias=bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))

    def _per_distance_logits(self, q: Tensor, end: int, dtype: torch.dtype) -> Tensor:
        """(q_i + v) . r_d * scale as [B, H, Tq, N] for distances d = 0..N-1, N = min(W, end)."""
        # Visible distances are 0 .. min(W, end) - 1; masked pairs are clamped by the lookup and masked out later.
        n_dist = min(self.window or end, end)
        dist = torch.arange(n_dist, device=q.device)
        table = A.sinusoid_table(dist, self.r_proj.in_features).to(dtype)
        rel = self.r_proj(table).view(n_dist, self.n_heads, self.hd)
        q_pos_bias = q + self.position_bias[None, :, None, :].to(q.dtype)
        return torch.einsum("bhqd,nhd->bhqn", q_pos_bias, rel) * self.scale


class StepContext(NamedTuple):
    """What every layer of one forward call shares."""

    pos: Tensor  # [T] absolute positions of the new tokens
    rope: tuple[Tensor, Tensor] | None  # RoPE cos/sin [T, head_dim]
    cache: A.KVCache | None
    end: int  # position after the last new token (python int: no device sync)
    backend: str  # resolved attention backend
    block_masks: dict  # window (None = global) -> FlexAttention BlockMask


def _flex_block_masks(seq_len: int, windows: tuple[int, ...], device: str) -> dict:
    # Process-wide cache lookups (zoo.models.attention.make_block_mask): one mask per (shape, window), all layers.
    return {(w or None): A.make_block_mask(seq_len, w or None, device) for w in windows}


class Block(nn.Module):
    """One Transformer layer: attention and FFN, each pre-normed, optionally post-normed."""

    def __init__(self, config: TransformerConfig, layer: int) -> None:
        super().__init__()
        c = config
        norm = lambda: RMSNorm(c.d_model, c.norm_eps, c.norm_unit_offset)  # noqa: E731
        self.attn_norm, self.attn = norm(), Attention(c, layer)
        self.post_attn_norm = norm() if c.post_norms else None
        self.ffn_norm = norm()
        self.routed = c.is_routed(layer)
        if self.routed:
            from zoo.models.routing import RoutedFFN  # only routed models need it

            self.ffn = RoutedFFN(c)
        else:
            self.ffn = DenseFFN(c)
        self.post_ffn_norm = norm() if c.post_norms else None

    def forward(self, x: Tensor, input_ids: Tensor | None, ctx: "StepContext") -> tuple[Tensor, "RoutingAux | None"]:
        """[B, T, D] -> ([B, T, D], the routed FFN's auxiliary outputs or None for a dense layer)."""
        h = self.attn(self.attn_norm(x), ctx)
        x = x + (self.post_attn_norm(h) if self.post_attn_norm is not None else h)
        aux = None
        if self.routed:
            h, aux = self.ffn(self.ffn_norm(x), input_ids)
        else:
            h = self.ffn(self.ffn_norm(x))
        return x + (self.post_ffn_norm(h) if self.post_ffn_norm is not None else h), aux


class TransformerOutput(NamedTuple):
    """Everything one forward computes: logits, final-norm hidden states and the routed layers' auxiliary outputs."""

    logits: Tensor | None  # [B, T, V]; None when the caller asked for no logits (chunked loss)
    hidden: Tensor  # [B, T, D] after the final norm
    routing: tuple["RoutingAux", ...]  # one per routed layer, in layer order (empty for a dense model)


class Transformer(nn.Module):
    """Decoder-only language model: forward(input_ids) -> logits [B, T, V]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps, c.norm_unit_offset)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._windows = tuple(sorted({c.layer_window(i) or 0 for i in range(c.n_layers)}))
        if not self.embed.weight.is_meta:  # meta builds (counting, loading) have no values to initialise
            self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every weight; call after ``to_empty()`` on a model built on the meta device.

        Only this module's own parts are touched: a routed FFN's router keeps the init its module chose.
        """
        std = self.config.init_std
        # Residual-branch outputs scaled by 1/sqrt(2L) so the residual stream's variance does not grow with depth.
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, 0.0 if m.unit_offset else 1.0)
            elif isinstance(m, Attention):
                for lin in (m.q_proj, m.k_proj, m.v_proj) + ((m.r_proj,) if m.relative else ()):
                    nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(m.o_proj.weight, std=out_std)
                if m.relative:
                    nn.init.zeros_(m.content_bias)
                    nn.init.zeros_(m.position_bias)
            elif isinstance(m, DenseFFN):
                for lin in (m.gate_proj, m.up_proj):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(m.down_proj.weight, std=out_std)

    @property
    def output_weight(self) -> Tensor:
        """The [V, D] matrix producing logits (the embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def prepare_block_masks(self, seq_len: int, device: torch.device | str | None = None) -> None:
        """Build the FlexAttention block masks for sequences of seq_len now, so a compiled step only reads them."""
        device = self.embed.weight.device if device is None else device
        _flex_block_masks(seq_len, self._windows, str(torch.device(device)))

    def forward(self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                kv_cache: A.KVCache | None = None, return_hidden: bool = False, return_aux: bool = False,
                compute_logits: bool = True) -> Tensor | tuple[Tensor, Tensor] | TransformerOutput:
        """Logits [B, T, V]; (logits, hidden [B, T, D]) with return_hidden; a TransformerOutput with return_aux.

        ``compute_logits=False`` (with return_aux) skips the unembedding: ``logits`` is None and the caller
        projects ``hidden`` itself (lm's chunked loss, so [B, T, V] never exists at once).

        ``inputs_embeds`` [B, T, D] replaces the embedding lookup (e.g. image tokens spliced into text); it is taken
        in the embedding table's space, so Gemma's sqrt(d_model) scale applies to it as to looked-up ids, and
        ``model(inputs_embeds=model.embed(ids))`` equals ``model(ids)``. ``input_ids`` may be given with it, of the
        same [B, T], for the parts that read token ids (the hash router); positions without a token can hold any id.
        """
        c = self.config
        x = self._embed(input_ids, inputs_embeds)
        b, t = x.shape[:2]
        start = kv_cache.seen if kv_cache is not None else 0
        if start + t > c.max_seq_len:
            raise ValueError(f"sequence length {start + t} exceeds the model's max_seq_len={c.max_seq_len}; "
                             "use shorter inputs or build the model with a larger max_seq_len")
        if kv_cache is not None and start + t > kv_cache.max_len:
            raise ValueError(f"sequence length {start + t} exceeds the KV cache size {kv_cache.max_len}; "
                             "create the cache with a larger max_len")
        pos = torch.arange(start, start + t, device=x.device)
        rope = A.rope_cos_sin(pos, c.head_dim, c.rope_base, x.dtype) if c.positions == "rope" else None
        backend = A.pick_backend(c.attn_backend, cap=c.attn_softcap, relative=c.positions == "relative",
                                 cached=kv_cache is not None, device=x.device)
        masks = _flex_block_masks(t, self._windows, str(x.device)) if backend == "flex" else {}
        ctx = StepContext(pos, rope, kv_cache, start + t, backend, masks)
        routing = []
        for layer in self.layers:
            x, aux = layer(x, input_ids, ctx)
            if aux is not None:
                routing.append(aux)
        if kv_cache is not None:
            kv_cache.seen = start + t
        hidden = self.norm(x)
        if not compute_logits:
            if not return_aux:
                raise ValueError("compute_logits=False returns only hidden states: pass return_aux=True too")
            return TransformerOutput(None, hidden, tuple(routing))
        logits = self.logits(hidden)
        if return_aux:
            return TransformerOutput(logits, hidden, tuple(routing))
        return (logits, hidden) if return_hidden else logits

    def logits(self, hidden: Tensor) -> Tensor:
        """Unembedding + final soft-cap of final-norm hidden states [..., D] -> logits [..., V]."""
        return A.softcap(F.linear(hidden, self.output_weight), self.config.final_softcap)

    def _embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """The [B, T, D] input of the first layer, from ids or given embeddings (checked), scaled as configured."""
        c = self.config
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids [batch, seq] or inputs_embeds [batch, seq, d_model]")
            x = self.embed(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != c.d_model:
                raise ValueError(f"inputs_embeds must be [batch, seq, d_model={c.d_model}], got shape "
                                 f"{tuple(inputs_embeds.shape)}")
            if input_ids is not None and tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
                raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds "
                                 f"{tuple(inputs_embeds.shape)} disagree on [batch, seq]")
            if input_ids is None and c.ffn == ROUTED and c.router == "hash":
                raise ValueError("the hash router picks experts by token id: pass input_ids alongside "
                                 "inputs_embeds (any id at positions without a token)")
            x = inputs_embeds.to(self.embed.weight.dtype)
        if c.embed_scale:
            # Round sqrt(d) to the activation dtype first (bf16: sqrt(3072) -> 55.5), as released checkpoints expect.
            x = x * torch.tensor(math.sqrt(c.d_model), dtype=x.dtype, device=x.device)
        return x

    def new_cache(self, batch: int, max_len: int | None = None) -> A.KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens (ring buffers of W for local layers)."""
        c = self.config
        max_len = c.max_seq_len if max_len is None else max_len
        sizes = [min(c.layer_window(i) or max_len, max_len) for i in range(c.n_layers)]
        p = self.embed.weight
        return A.KVCache(max_len, sizes, batch, c.n_kv_heads, c.head_dim, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 use_cache: bool = True, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Append up to max_new_tokens tokens; greedy when temperature == 0, else sampled. Returns [B, T + new]."""
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                             f"exceeds max_seq_len={self.config.max_seq_len}")
        cache = self.new_cache(input_ids.shape[0], total) if use_cache else None
        seq, step_in = input_ids, input_ids
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else seq, kv_cache=cache)[:, -1, :].float()
            nxt = sample_next(logits, temperature, top_k, generator)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            step_in = nxt[:, None]
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return seq

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (tied weights once); embedding=False leaves out the input/output embedding matrices."""
        total = sum(p.numel() for p in self.parameters())
        if not embedding:
            total -= self.embed.weight.numel() + (self.lm_head.weight.numel() if self.lm_head is not None else 0)
        return total


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else softmax(logits / T) (top-k optional)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
