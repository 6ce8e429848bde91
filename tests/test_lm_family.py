"""LM families as specs (zoo/models/lm_family.py) and the one FFN table (zoo/models/lm_blocks.py) every reader uses."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo
from lm.parallel import flops as F
from lm.parallel.plan import activation_bytes
from zoo.models import lm_blocks
from zoo.models.lm_configs import CONFIGS, get_config
from zoo.models.lm_family import FAMILIES, LMFamily, export_adapter, hf_adapter, register_family
from zoo.models.ffn import ACTIVATIONS


def test_every_registered_lm_belongs_to_exactly_one_family():
    members = [n for f in FAMILIES.values() for n in f.configs]
    assert len(members) == len(set(members)) and set(members) == set(CONFIGS)
    for family in FAMILIES.values():
        for name, config in family.configs.items():
            for field, value in family.blocks.items():
                assert getattr(config, field) == value, (name, field)


@pytest.mark.parametrize("name,architecture", [("gemma-tiny", "GemmaForCausalLM"),
                                               ("gemma2-tiny", "Gemma2ForCausalLM"),
                                               ("llama-tiny", "LlamaForCausalLM"), ("llama3-8b", "LlamaForCausalLM")])
def test_each_family_exports_as_its_own_architecture(name, architecture):
    assert export_adapter(CONFIGS[name]).architecture == architecture


def test_a_config_no_architecture_fits_is_refused_with_each_reason():
    with pytest.raises(ValueError, match=r"GemmaForCausalLM: config\.positions.*LlamaForCausalLM: config\.positions"):
        export_adapter(CONFIGS["gopher-tiny"])
    # a Llama with Gemma's (1 + w) norm is neither
    with pytest.raises(ValueError, match="LlamaForCausalLM: config.norm_unit_offset"):
        export_adapter(get_config("llama-tiny", norm_unit_offset=True))


def test_unknown_hf_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"config\.json: model_type='mistral'.*gemma.*gemma2.*llama"):
        hf_adapter("mistral")


def test_a_member_cannot_change_its_familys_block_choices():
    with pytest.raises(ValueError, match=r"'llama-gelu' changes the family's block choices \['ffn'\]"):
        FAMILIES["llama"].add("llama-gelu", ffn="gelu")
    assert "llama-gelu" not in FAMILIES["llama"].configs


def test_a_family_cannot_reuse_a_registered_name():
    clash = LMFamily("llama-again", dict(FAMILIES["llama"].blocks))
    clash.add("llama-tiny", d_model=32, n_heads=2)
    with pytest.raises(ValueError, match="llama-tiny"):
        register_family(clash)
    assert "llama-again" not in FAMILIES


def test_a_new_ffn_kind_in_the_table_reaches_the_transformer_the_flop_counter_and_the_planner(monkeypatch):
    """ReGLU (a gated ReLU, Shazeer 2020) added to the table alone: the model computes it, the FLOP counter counts
    its third matrix (checked against torch's counter) and the planner keeps its four [tokens, d_ff] tensors."""
    monkeypatch.setitem(lm_blocks.FFN_KINDS, "reglu", lm_blocks.FfnKind("reglu", True, "relu", "relu"))
    monkeypatch.setitem(ACTIVATIONS, "relu", torch.relu)
    overrides = dict(d_model=32, n_layers=2, d_ff=40, n_heads=4, n_kv_heads=2, attn_backend="eager", max_seq_len=16)
    model = zoo.create("llama-tiny", ffn="reglu", **overrides).eval()
    ffn = model.layers[0].ffn
    x = torch.randn(1, 3, 32)
    want = ffn.down_proj(torch.relu(ffn.gate_proj(x)) * ffn.up_proj(x))
    torch.testing.assert_close(ffn(x), want, rtol=0, atol=0)
    ids = torch.randint(0, 259, (2, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    parts = F.forward_flops(model.config, 16)
    assert counter.get_total_flops() == pytest.approx(2 * (parts.forward - parts.embeddings - parts.attention_softmax),
                                                      rel=1e-9)
    swiglu = activation_bytes(get_config("llama-tiny", **overrides), 2, 16, "32-true", "eager")
    assert activation_bytes(model.config, 2, 16, "32-true", "eager") == swiglu  # same gated layout
    with pytest.raises(ValueError, match="ffn='rglu'"):
        get_config("llama-tiny", ffn="rglu")


def test_routed_llama_keeps_swiglu_experts_and_dense_layers():
    model = zoo.create("llama-tiny", ffn="routed", n_experts=2, routing_frequency=2, router="hash", n_layers=2,
                       device="meta")
    assert model.config.expert_ffn == "swiglu"
    dense, routed = model.layers[0].ffn, model.layers[1].ffn
    assert dense.gated and dense.act is torch.nn.functional.silu
    assert all(e.gated and e.act is torch.nn.functional.silu for e in routed.experts)
