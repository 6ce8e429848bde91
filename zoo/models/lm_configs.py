"""Language models of the zoo as data: Gemma, Gemma 2, Gopher, Chinchilla (+ the 50-shape ladder), Llama 2 / 3 and tiny
CPU models, each family one ``LMFamily`` spec (zoo/models/lm_family.py: block choices, configs, HF adapters).

Every entry is a ``TransformerConfig`` of the one Transformer (zoo/models/transformer.py). Importing this module registers
each name with ``zoo.models.registry``; builders accept keyword overrides of any config field:
``zoo.create("gemma2-tiny", n_layers=2)``, ``zoo.create("gemma2-27b", device="meta")``.
"""
from __future__ import annotations

from typing import Callable

from zoo.models.builders import UnknownModelError, register
from zoo.models.lm_family import FAMILIES, LMFamily, register_family
from zoo.models.lm_hf import GEMMA, GEMMA2, LLAMA, LLAMA_FIXED
from zoo.models.transformer import Transformer, TransformerConfig

# --- Gemma (Gemma Team 2024, Table 1) and Gemma 2 (Gemma Team 2024, Tables 1-2); released checkpoints: vocab 256000.
# Shared: tied embeddings, RoPE base 10k, GeGLU (tanh GELU), RMSNorm (1 + w) eps 1e-6, embeddings * sqrt(d_model).
_GEMMA = dict(ffn="geglu", norm_unit_offset=True, embed_scale=True, tie_embeddings=True, positions="rope")
_GEMMA_SIZES = dict(vocab_size=256000, max_seq_len=8192, rope_base=10000.0, norm_eps=1e-6)
# Gemma 2 adds: post-norms, local(4096)/global alternation starting with local, soft-caps 50 (attention) / 30 (final).
_GEMMA2 = dict(_GEMMA, post_norms=True, layer_pattern=("local", "global"), attn_softcap=50.0, final_softcap=30.0)
GEMMA_FAMILY = register_family(LMFamily("gemma", _GEMMA, _GEMMA_SIZES, hf=(GEMMA,)))
GEMMA2_FAMILY = register_family(LMFamily("gemma2", _GEMMA2, dict(_GEMMA_SIZES, window=4096), hf=(GEMMA2,)))
#            name          family         d_model layers d_ff   heads kv  head_dim query_scale
_GEMMA_TABLE = [
    ("gemma-2b",   GEMMA_FAMILY,  2048, 18, 16384, 8,  1,  256, 256 ** -0.5),
    ("gemma-7b",   GEMMA_FAMILY,  3072, 28, 24576, 16, 16, 256, 256 ** -0.5),
    ("gemma2-2b",  GEMMA2_FAMILY, 2304, 26, 9216,  8,  4,  256, 256 ** -0.5),
    ("gemma2-9b",  GEMMA2_FAMILY, 3584, 42, 14336, 16, 8,  256, 256 ** -0.5),
    ("gemma2-27b", GEMMA2_FAMILY, 4608, 46, 36864, 32, 16, 128, 144 ** -0.5),  # query scale (d_model / heads)^-1/2
]
for _name, _family, _d, _l, _ff, _h, _kv, _hd, _qs in _GEMMA_TABLE:
    _family.add(_name, d_model=_d, n_layers=_l, d_ff=_ff, n_heads=_h, n_kv_heads=_kv, head_dim=_hd, query_scale=_qs)

# --- Gopher (Rae et al. 2021, Table 1) and Chinchilla 70B (Hoffmann et al. 2022, Table 4).
# Shared: SentencePiece vocab 32000, context 2048, FFN 4 x d_model (GELU MLP), pre-norm RMSNorm, Transformer-XL
# relative positions. Embeddings tied (input = output matrix): this reproduces the reported sizes (see tests).
# No Hugging Face architecture has Transformer-XL positions: these families read and write zoo checkpoints only.
_GOPHER = dict(ffn="gelu", positions="relative", tie_embeddings=True)
_GOPHER_SIZES = dict(vocab_size=32000, max_seq_len=2048)
GOPHER_FAMILY = register_family(LMFamily("gopher", _GOPHER, _GOPHER_SIZES))
#            name              layers heads kv_size d_model  reported size
_GOPHER_TABLE = [
    ("gopher-44m",     8,  16,  32,  512,   44e6),
    ("gopher-117m",    12, 12,  64,  768,   117e6),
    ("gopher-417m",    12, 12,  128, 1536,  417e6),
    ("gopher-1.4b",    24, 16,  128, 2048,  1.4e9),
    ("gopher-7.1b",    32, 32,  128, 4096,  7.1e9),
    ("gopher-280b",    80, 128, 128, 16384, 280e9),
    ("chinchilla-70b", 80, 64,  128, 8192,  70e9),  # Hoffmann et al. Table 4
]
for _name, _l, _h, _kv, _d, _reported in _GOPHER_TABLE:
    GOPHER_FAMILY.add(_name, _reported, d_model=_d, n_layers=_l, n_heads=_h, head_dim=_kv, d_ff=4 * _d)

# --- Chinchilla scaling ladder (Hoffmann et al. 2022, Table A9): reported params (M), d_model, ffw, kv, heads, layers.
CHINCHILLA_FAMILY = register_family(LMFamily("chinchilla-ladder", _GOPHER, _GOPHER_SIZES))
_LADDER_TABLE = [
    (44, 512, 2048, 64, 8, 8), (57, 576, 2304, 64, 9, 9), (74, 640, 2560, 64, 10, 10),
    (90, 640, 2560, 64, 10, 13), (106, 640, 2560, 64, 10, 16), (117, 768, 3072, 64, 12, 12),
    (140, 768, 3072, 64, 12, 15), (163, 768, 3072, 64, 12, 18), (175, 896, 3584, 64, 14, 14),
    (196, 896, 3584, 64, 14, 16), (217, 896, 3584, 64, 14, 18), (251, 1024, 4096, 64, 16, 16),
    (278, 1024, 4096, 64, 16, 18), (306, 1024, 4096, 64, 16, 20), (425, 1280, 5120, 128, 10, 18),
    (489, 1280, 5120, 128, 10, 21), (509, 1408, 5632, 128, 11, 18), (552, 1280, 5120, 128, 10, 24),
    (587, 1408, 5632, 128, 11, 21), (632, 1536, 6144, 128, 12, 19), (664, 1408, 5632, 128, 11, 24),
    (724, 1536, 6144, 128, 12, 22), (816, 1536, 6144, 128, 12, 25), (893, 1792, 7168, 128, 14, 20),
    (1018, 1792, 7168, 128, 14, 23), (1143, 1792, 7168, 128, 14, 26), (1266, 2048, 8192, 128, 16, 22),
    (1424, 2176, 8704, 128, 17, 22), (1429, 2048, 8192, 128, 16, 25), (1593, 2048, 8192, 128, 16, 28),
    (1609, 2176, 8704, 128, 17, 25), (1731, 2304, 9216, 128, 18, 24), (1794, 2176, 8704, 128, 17, 28),
    (2007, 2304, 9216, 128, 18, 28), (2283, 2304, 9216, 128, 18, 32), (2298, 2560, 10240, 128, 20, 26),
    (2639, 2560, 10240, 128, 20, 30), (2980, 2560, 10240, 128, 20, 34), (3530, 2688, 10752, 128, 22, 36),
    (3802, 2816, 11264, 128, 22, 36), (4084, 2944, 11776, 128, 22, 36), (4516, 3072, 12288, 128, 24, 36),
    (6796, 3584, 14336, 128, 28, 40), (9293, 4096, 16384, 128, 32, 42), (11452, 4352, 17408, 128, 32, 47),
    (12295, 4608, 18432, 128, 36, 44), (12569, 4608, 18432, 128, 32, 47), (13735, 4864, 19456, 128, 32, 47),
    (14940, 4992, 19968, 128, 32, 49), (16183, 5120, 20480, 128, 40, 47),
]
for _p, _d, _ff, _kv, _h, _l in _LADDER_TABLE:
    CHINCHILLA_FAMILY.add(f"chinchilla-ladder-{_p}m", _p * 1e6, d_model=_d, d_ff=_ff, head_dim=_kv, n_heads=_h,
                          n_layers=_l)

# --- Llama 2 (Touvron et al. 2023, Table 1 and the released config.json files) and Llama 3 8B (Meta 2024).
# Shared: RMSNorm (w, eps 1e-5), SwiGLU, RoPE, untied embeddings, no embedding scale; 70B and Llama 3 use
# grouped-query attention (8 kv heads). Reported sizes: the released checkpoints' parameter counts.
_LLAMA2_SIZES = dict(vocab_size=32000, max_seq_len=4096, rope_base=10000.0, norm_eps=1e-5)
LLAMA_FAMILY = register_family(LMFamily("llama", dict(LLAMA_FIXED, tie_embeddings=False), _LLAMA2_SIZES, hf=(LLAMA,)))
#            name          d_model layers d_ff   heads kv  reported        extra
_LLAMA_TABLE = [
    ("llama2-7b",  4096, 32, 11008, 32, 32, 6.74e9,  {}),
    ("llama2-13b", 5120, 40, 13824, 40, 40, 13.02e9, {}),
    ("llama2-70b", 8192, 80, 28672, 64, 8,  68.98e9, {}),
    ("llama3-8b",  4096, 32, 14336, 32, 8,  8.03e9,  dict(vocab_size=128256, max_seq_len=8192, rope_base=500000.0)),
]
for _name, _d, _l, _ff, _h, _kv, _reported, _extra in _LLAMA_TABLE:
    LLAMA_FAMILY.add(_name, _reported, d_model=_d, n_layers=_l, d_ff=_ff, n_heads=_h, n_kv_heads=_kv, **_extra)

# --- Tiny CPU models (ours, not from a paper): byte vocabulary (256 bytes + pad/bos/eos, see zoo.models.tokenizer).
GEMMA2_FAMILY.add("gemma2-tiny", vocab_size=259, max_seq_len=1024, window=64, d_model=256, n_layers=6, d_ff=768,
                  n_heads=4, n_kv_heads=2, head_dim=64, query_scale=64 ** -0.5)
GEMMA_FAMILY.add("gemma-tiny", vocab_size=259, max_seq_len=1024, d_model=256, n_layers=4, d_ff=768, n_heads=4,
                 n_kv_heads=1, head_dim=64)
GOPHER_FAMILY.add("gopher-tiny", vocab_size=259, max_seq_len=1024, d_model=256, n_layers=4, n_heads=4, head_dim=64,
                  d_ff=1024)
LLAMA_FAMILY.add("llama-tiny", vocab_size=259, max_seq_len=1024, d_model=256, n_layers=4, d_ff=688, n_heads=4,
                 n_kv_heads=2)

# Every family's configs by registry name, and the published sizes the parameter-count tests check.
CONFIGS: dict[str, TransformerConfig] = {n: c for f in FAMILIES.values() for n, c in f.configs.items()}
REPORTED_PARAMS: dict[str, float] = {n: p for f in FAMILIES.values() for n, p in f.reported_params.items()}


def get_config(name: str, **overrides) -> TransformerConfig:
    """The registered config `name` with field overrides applied (a new object; the table is not modified)."""
    if name not in CONFIGS:
        import difflib

        close = difflib.get_close_matches(name, list(CONFIGS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown language model {name!r}.{hint} Known: see zoo.models.lm_configs.CONFIGS")
    return CONFIGS[name].replace(**overrides)


def _builder(name: str) -> Callable[..., Transformer]:
    def build(**overrides) -> Transformer:
        return Transformer(get_config(name, **overrides))

    build.__doc__ = f"Build the {name!r} Transformer; keyword arguments override TransformerConfig fields."
    return build


for _name in CONFIGS:
    register(_name, _builder(_name))
