"""The Hugging Face adapters of the LM families (``zoo.models.lm_family.HFAdapter``): Gemma, Gemma 2 and Llama.

Pure mappings, no I/O and no torch: config.json dict <-> TransformerConfig fields, and our state_dict keys -> HF tensor
names. ``zoo.weights.hf`` reads and writes folders through them. Naming trap handled here: in Gemma 1
``post_attention_layernorm`` is the pre-MLP norm; in Gemma 2 it is a real post-attention norm and the pre-MLP norm is
``pre_feedforward_layernorm`` (Llama names its pre-MLP norm ``post_attention_layernorm`` too, like Gemma 1).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from zoo.models.lm_blocks import FFN_KINDS
from zoo.models.lm_family import HFAdapter

if TYPE_CHECKING:
    from zoo.models.transformer import TransformerConfig

_LAYER_TYPE = {"sliding_attention": "local", "full_attention": "global"}


# ----------------------------------------------------------------------------------------------- shared by all
def _pattern(layer_types: list[str]) -> tuple[str, ...]:
    """Shortest cycle reproducing the per-layer attention types."""
    ours = [_LAYER_TYPE[t] for t in layer_types]
    for p in range(1, len(ours) + 1):
        if all(ours[i] == ours[i % p] for i in range(len(ours))):
            return tuple(ours[:p])
    return tuple(ours)


def _common_from_hf(cfg: dict, source: str, ffn: str, default_act: str, **extra: Any) -> dict[str, Any]:
    """The fields every supported architecture shares: sizes, heads, RoPE, norms, tying; the activation checked
    against the FFN kind's (``accepted``: other names that mean the same function in old configs)."""
    mtype = cfg.get("model_type")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or default_act
    accepted = extra.pop("accepted_acts", ())
    if act not in (FFN_KINDS[ffn].hf_activation, *accepted):
        raise ValueError(f"{source}: hidden_act={act!r} is not what model_type={mtype!r} computes with "
                         f"(expected {FFN_KINDS[ffn].hf_activation!r})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag, False):
            raise ValueError(f"{source}: {flag}=true is not supported by the zoo Transformer (model_type={mtype!r})")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise ValueError(f"{source}: rope_type={rope.get('rope_type') or rope.get('type')!r} is not supported "
                         f"(only 'default'; model_type={mtype!r})")
    n_heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads, d_ff=cfg["intermediate_size"], ffn=ffn,
        positions="rope", rope_base=float((cfg.get("rope_parameters") or {}).get("rope_theta",
                                                                                 cfg.get("rope_theta", 10000.0))),
        **extra,
    )


def _common_to_hf(c: "TransformerConfig", adapter: str, model_type: str) -> dict[str, Any]:
    act = FFN_KINDS[c.ffn].hf_activation
    return dict(
        architectures=[adapter], model_type=model_type, vocab_size=c.vocab_size, hidden_size=c.d_model,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        hidden_act=act, attention_bias=False, tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_base,
        rope_parameters={"rope_theta": c.rope_base, "rope_type": "default"}, torch_dtype="float32",
    )


def _needs(c: "TransformerConfig", **need: Any) -> str | None:
    """Why ``c`` differs from the fields an architecture fixes (None when it does not)."""
    for name, value in need.items():
        if getattr(c, name) != value:
            return f"config.{name}={getattr(c, name)!r}, needs {value!r}"
    return None


def _names(c: "TransformerConfig", norms: dict[str, str]) -> dict[str, str]:
    """Our state_dict keys -> HF keys: embeddings, attention and MLP projections, and the per-layer ``norms``."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    projections = ("gate", "up", "down") if c.dense_ffn().gated else ("up", "down")
    for i in range(c.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for p in ("q", "k", "v", "o"):
            names[f"{ours}attn.{p}_proj.weight"] = f"{hf}self_attn.{p}_proj.weight"
        for p in projections:
            names[f"{ours}ffn.{p}_proj.weight"] = f"{hf}mlp.{p}_proj.weight"
        for mine, theirs in norms.items():
            names[f"{ours}{mine}.weight"] = f"{hf}{theirs}.weight"
    return names


# ----------------------------------------------------------------------------------------------- Gemma, Gemma 2
_GEMMA_FIXED = dict(positions="rope", ffn="geglu", norm_unit_offset=True, embed_scale=True)


def _gemma_from_hf(cfg: dict, source: str) -> dict[str, Any]:
    # Gemma 1 configs say "gelu" but the released models (and transformers) use the tanh approximation.
    return _common_from_hf(cfg, source, "geglu", "gelu_pytorch_tanh", accepted_acts=("gelu",),
                           max_seq_len=cfg.get("max_position_embeddings", 8192),
                           norm_eps=cfg.get("rms_norm_eps", 1e-6), norm_unit_offset=True, embed_scale=True,
                           tie_embeddings=cfg.get("tie_word_embeddings", True))


def _is_gemma2(c: "TransformerConfig") -> bool:
    return c.post_norms or c.window is not None or c.attn_softcap is not None or c.final_softcap is not None


def _gemma_refuse(c: "TransformerConfig") -> str | None:
    if (why := _needs(c, **_GEMMA_FIXED)) is not None:
        return why
    if _is_gemma2(c):
        return "post-norms, windows or soft-caps are Gemma 2's"
    if c.scale != 1 / math.sqrt(c.head_dim):
        return (f"query_scale={c.query_scale} (Gemma 1 fixes head_dim**-0.5; Gemma 2 configs carry "
                "query_pre_attn_scalar)")
    return None


def _gemma_to_hf(c: "TransformerConfig") -> dict[str, Any]:
    return dict(_common_to_hf(c, "GemmaForCausalLM", "gemma"), hidden_activation=FFN_KINDS["geglu"].hf_activation)


def _gemma2_from_hf(cfg: dict, source: str) -> dict[str, Any]:
    fields = _gemma_from_hf(cfg, source)
    n = cfg["num_hidden_layers"]
    # Older configs lack layer_types; transformers then alternates sliding (even layers) / global.
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    unknown = sorted(set(types) - set(_LAYER_TYPE))
    if unknown:
        raise ValueError(f"{source}: layer_types has unsupported entries {unknown}")
    fields.update(post_norms=True, layer_pattern=_pattern(types),
                  window=cfg.get("sliding_window") if "sliding_attention" in types else None,
                  query_scale=cfg.get("query_pre_attn_scalar", fields["head_dim"]) ** -0.5,
                  attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"))
    return fields


def _gemma2_refuse(c: "TransformerConfig") -> str | None:
    if (why := _needs(c, **_GEMMA_FIXED)) is not None:
        return why
    if not _is_gemma2(c):
        return "no post-norms, windows or soft-caps (a Gemma 1 config)"
    if not c.post_norms:
        return "windows/soft-caps with post_norms=False: Gemma 2 has post-norms"
    scalar = c.scale ** -2
    if abs(scalar - round(scalar)) > 1e-6 * scalar:
        return f"query_scale={c.scale}: Gemma 2 stores query_pre_attn_scalar = query_scale**-2 = {scalar} as an integer"
    return None


def _gemma2_to_hf(c: "TransformerConfig") -> dict[str, Any]:
    inv = {v: k for k, v in _LAYER_TYPE.items()}
    return dict(_gemma_to_hf(c), architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                layer_types=[inv["local" if c.layer_window(i) else "global"] for i in range(c.n_layers)],
                sliding_window=c.window if c.window is not None else c.max_seq_len,
                query_pre_attn_scalar=int(round(c.scale ** -2)), attn_logit_softcapping=c.attn_softcap,
                final_logit_softcapping=c.final_softcap)


GEMMA = HFAdapter("gemma", "GemmaForCausalLM", _gemma_from_hf, _gemma_refuse, _gemma_to_hf,
                  lambda c: _names(c, {"attn_norm": "input_layernorm",
                                       "ffn_norm": "post_attention_layernorm"}))  # Gemma 1: the pre-MLP norm
GEMMA2 = HFAdapter("gemma2", "Gemma2ForCausalLM", _gemma2_from_hf, _gemma2_refuse, _gemma2_to_hf,
                   lambda c: _names(c, {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                                        "ffn_norm": "pre_feedforward_layernorm",
                                        "post_ffn_norm": "post_feedforward_layernorm"}))


# ----------------------------------------------------------------------------------------------- Llama
# RMSNorm scaled by w (w initialised to 1), SwiGLU, RoPE, no embedding scale, no soft-caps, no windows.
LLAMA_FIXED = dict(positions="rope", ffn="swiglu", norm_unit_offset=False, embed_scale=False, post_norms=False,
                   window=None, attn_softcap=None, final_softcap=None)


def _llama_from_hf(cfg: dict, source: str) -> dict[str, Any]:
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"{source}: pretraining_tp={cfg['pretraining_tp']!r} is not supported (only 1; "
                         "model_type='llama')")
    return _common_from_hf(cfg, source, "swiglu", "silu", max_seq_len=cfg.get("max_position_embeddings", 2048),
                           norm_eps=cfg.get("rms_norm_eps", 1e-6), norm_unit_offset=False, embed_scale=False,
                           tie_embeddings=cfg.get("tie_word_embeddings", False))


def _llama_refuse(c: "TransformerConfig") -> str | None:
    if (why := _needs(c, **LLAMA_FIXED)) is not None:
        return why
    if c.scale != 1 / math.sqrt(c.head_dim):
        return f"query_scale={c.query_scale} (Llama fixes head_dim**-0.5)"
    return None


LLAMA = HFAdapter("llama", "LlamaForCausalLM", _llama_from_hf, _llama_refuse,
                  lambda c: dict(_common_to_hf(c, "LlamaForCausalLM", "llama"), mlp_bias=False, pretraining_tp=1),
                  lambda c: _names(c, {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}))
