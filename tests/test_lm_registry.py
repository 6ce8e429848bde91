"""Language-model registry: names, overrides, meta-device builds, and parameter counts against the papers.

Counting convention (stated once, used by every count below):
- ``num_params(embedding=True)`` counts every parameter of our module once: tied input/output embedding counted once,
  all norm weights, and for Gopher/Chinchilla the Transformer-XL relative-position projection W_r (d_model x
  heads*kv per layer) and the per-layer content/position biases. ``embedding=False`` removes the embedding matrix
  (and the output matrix when untied).
- Gemma / Gemma 2: the papers count embeddings with vocab 256,128 (the released checkpoints hold 256,000 rows), so
  the embedding count is checked on ``vocab_size=256128``; non-embedding counts must match to the parameter.
- Gopher (Rae et al. Table 1) and the Chinchilla ladder (Hoffmann et al. Table A9): embeddings tied and W_r
  included reproduces the reported sizes; tolerance 2% for Gopher's names (rounded to two significant figures,
  e.g. "1.4B" for 1.374B) and 1% for the ladder (reported to 3-5 significant figures).
"""
from __future__ import annotations

import pytest
import torch

import zoo
from zoo.models.lm_configs import CONFIGS, REPORTED_PARAMS, get_config
from zoo.models.transformer import Transformer, TransformerConfig

# Gemma Team 2024 Table 2 and Gemma 2 Table 1 (paper numbers, vocab 256128): (embedding, non-embedding).
GEMMA_PARAMS = {
    "gemma-2b": (524_550_144, 1_981_884_416),
    "gemma-7b": (786_825_216, 7_751_248_896),
    "gemma2-2b": (590_118_912, 2_024_517_888),
    "gemma2-9b": (917_962_752, 8_324_201_984),
    "gemma2-27b": (1_180_237_824, 26_047_480_320),
}


@pytest.mark.parametrize("name", list(GEMMA_PARAMS))
def test_gemma_counts_equal_paper_tables_exactly(name):
    model = zoo.create(name, device="meta", vocab_size=256128)
    emb, non_emb = GEMMA_PARAMS[name]
    assert model.num_params(embedding=True) - model.num_params(embedding=False) == emb
    assert model.num_params(embedding=False) == non_emb
    assert get_config(name).vocab_size == 256000  # released checkpoints' row count is the registry default


@pytest.mark.parametrize("name", [n for n in REPORTED_PARAMS if not n.startswith("chinchilla-ladder")])
def test_gopher_and_chinchilla_counts_within_two_percent(name):
    count = zoo.create(name, device="meta").num_params()
    assert abs(count - REPORTED_PARAMS[name]) / REPORTED_PARAMS[name] < 0.02, count


def test_all_fifty_ladder_shapes_within_one_percent():
    ladder = [n for n in REPORTED_PARAMS if n.startswith("chinchilla-ladder-")]
    assert len(ladder) == 50 and "chinchilla-ladder-44m" in ladder and "chinchilla-ladder-16183m" in ladder
    for name in ladder:
        count = zoo.create(name, device="meta").num_params()
        assert abs(count - REPORTED_PARAMS[name]) / REPORTED_PARAMS[name] < 0.01, (name, count)


def test_meta_device_allocates_nothing():
    model = zoo.create("gemma2-27b", device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert model.num_params() > 27e9
    gopher = zoo.create("gopher-280b", device="meta")
    assert all(p.is_meta for p in gopher.parameters())


def test_every_family_registered_and_builders_take_overrides():
    names = zoo.available()
    for name in ["gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b", "gopher-44m", "gopher-117m",
                 "gopher-417m", "gopher-1.4b", "gopher-7.1b", "gopher-280b", "chinchilla-70b", "gemma2-tiny",
                 "gopher-tiny"]:
        assert name in names
    model = zoo.create("gemma2-tiny", vocab_size=300, n_layers=2)
    assert isinstance(model, Transformer) and model.config.vocab_size == 300 and len(model.layers) == 2
    assert CONFIGS["gemma2-tiny"].n_layers == 6  # the table itself is untouched by overrides
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        zoo.create("gemma2-tiny", n_layer=2)
    with pytest.raises(KeyError, match="gemma2-tiny"):
        get_config("gemma2-tyni")


def test_family_switches_match_reference_facts():
    g2 = get_config("gemma2-9b")
    assert [g2.layer_window(i) for i in range(4)] == [4096, None, 4096, None]  # starts with a local layer
    assert (g2.attn_softcap, g2.final_softcap, g2.post_norms) == (50.0, 30.0, True)
    assert get_config("gemma2-27b").scale == pytest.approx(144 ** -0.5)
    assert get_config("gemma2-2b").scale == pytest.approx(256 ** -0.5)
    g1 = get_config("gemma-2b")
    assert (g1.n_kv_heads, g1.window, g1.attn_softcap, g1.post_norms) == (1, None, None, False)
    for cfg in (g1, g2):
        assert cfg.norm_unit_offset and cfg.embed_scale and cfg.tie_embeddings and cfg.ffn == "geglu"
    gopher = get_config("gopher-280b")
    assert (gopher.positions, gopher.ffn, gopher.vocab_size, gopher.max_seq_len) == ("relative", "gelu", 32000, 2048)
    assert gopher.d_ff == 4 * gopher.d_model
    assert get_config("chinchilla-70b").n_heads == 64


@pytest.mark.parametrize("name", ["gemma2-tiny", "gemma-tiny", "gopher-tiny"])
def test_tiny_cpu_models_run(name):
    cfg = get_config(name)
    model = zoo.create(name)
    assert 2e6 <= model.num_params() <= 5e6
    assert cfg.vocab_size == 259  # zoo.models.tokenizer.ByteTokenizer
    if name == "gemma2-tiny":
        assert cfg.window < cfg.max_seq_len and cfg.attn_softcap and cfg.final_softcap
    ids = torch.randint(0, cfg.vocab_size, (2, 80))
    with torch.no_grad():
        assert model(ids).shape == (2, 80, cfg.vocab_size)


def test_config_is_plain_data():
    cfg = TransformerConfig(layer_pattern=["local", "global"], window=8)
    assert cfg.layer_pattern == ("local", "global") and cfg.n_kv_heads == cfg.n_heads and cfg.head_dim == 64


def test_overriding_heads_or_width_rederives_derived_fields():
    """An MHA model stays MHA with a new head count; a derived head_dim follows d_model / n_heads."""
    base = zoo.create("gopher-tiny", device="meta").config
    cfg = zoo.create("gopher-tiny", n_heads=2, device="meta").config
    assert base.n_kv_heads == base.n_heads and cfg.n_heads == cfg.n_kv_heads == 2
    assert cfg.head_dim == cfg.d_model // 2
    gqa = zoo.create("gemma2-tiny", device="meta").config
    kept = zoo.create("gemma2-tiny", n_heads=gqa.n_heads * 2, device="meta").config
    assert kept.n_kv_heads == gqa.n_kv_heads  # an explicit GQA ratio is the user's, not derived: left alone


def test_routing_a_dense_model_keeps_its_ffn_kind_for_the_experts():
    gopher = zoo.create("gopher-tiny", ffn="routed", n_experts=2, device="meta").config
    gemma = zoo.create("gemma2-tiny", ffn="routed", n_experts=2, device="meta").config
    assert (gopher.expert_ffn, gemma.expert_ffn) == ("gelu", "geglu")
    with pytest.raises(ValueError, match="expert_ffn"):
        zoo.create("gemma2-tiny", expert_ffn="relu", device="meta")
