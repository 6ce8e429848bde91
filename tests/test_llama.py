"""The Llama-style family, proof that an LM family is one spec (issue 28): published sizes from the shapes, training
from a config, `zoo plan`, and both directions of the Hugging Face round trip against transformers' LlamaForCausalLM.

Tolerance of the logit comparisons: fp32 on both sides, the same operations in a different order (fused vs separate
projections, RoPE tables, softmax). Each logit is a D = 32-term dot product at the end of 2 layers of O(1) values;
float32 rounding (eps 1.2e-7) accumulates to ~eps x sqrt(D) x (a few layers of products) ~ 1e-5 relative on logits
of magnitude ~1-10, so 1e-4 absolute is the bound used by the Gemma parity tests too (tests/test_hf_parity.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.models.lm_configs import CONFIGS, REPORTED_PARAMS
from zoo.models.lm_family import FAMILIES, family_of

transformers = pytest.importorskip("transformers")  # declared in the dev extra; installed wherever tests run
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from zoo.weights.hf import export_hf, from_hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, d_ff=48, n_heads=4, n_kv_heads=2, max_seq_len=64)

# Published parameter counts, in billions to the precision the model cards give them.
PUBLISHED = {"llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98, "llama3-8b": 8.03}


def _count_from_shapes(name: str) -> int:
    """Parameters of a Llama shape, counted by hand: untied embeddings, per layer q/k/v/o (GQA), SwiGLU, 2 norms."""
    c = CONFIGS[name]
    d, hd, f = c.d_model, c.head_dim, c.d_ff
    attention = d * hd * (c.n_heads + 2 * c.n_kv_heads) + c.n_heads * hd * d
    per_layer = attention + 3 * d * f + 2 * d
    return 2 * c.vocab_size * d + c.n_layers * per_layer + d


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    count = zoo.create(name, device="meta").num_params()
    assert count == _count_from_shapes(name)
    assert round(count / 1e9, 2) == PUBLISHED[name] == REPORTED_PARAMS[name] / 1e9


def test_the_llama_family_is_one_spec():
    family = family_of("llama2-7b")
    assert family is FAMILIES["llama"] and {a.architecture for a in family.hf} == {"LlamaForCausalLM"}
    for name in (*PUBLISHED, "llama-tiny"):
        c = CONFIGS[name]
        assert (c.ffn, c.norm_unit_offset, c.positions, c.tie_embeddings, c.embed_scale) == (
            "swiglu", False, "rope", False, False), name
    assert CONFIGS["llama2-70b"].n_kv_heads == 8 and CONFIGS["llama3-8b"].rope_base == 500000.0
    assert CONFIGS["llama3-8b"].vocab_size == 128256 and CONFIGS["llama2-7b"].n_kv_heads == 32


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Norm weights start at one; random values make the w (not 1 + w) scale observable.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.08) + (1.0 if p.ndim == 1 else 0))
    return model.eval()


def _hf_llama(**extra) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="eager", **extra)
    return _randomise(LlamaForCausalLM(cfg))


def test_transformers_llama_loads_with_equal_logits_and_generation(tmp_path):
    torch.manual_seed(0)
    hf = _hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    c = ours.config
    assert (c.ffn, c.n_kv_heads, c.tie_embeddings, c.norm_unit_offset, c.rope_base) == ("swiglu", 2, False, False,
                                                                                         500000.0)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert want.abs().max() > 0.5  # non-trivial logits
    assert (got - want).abs().max().item() <= 1e-4
    prompt = torch.randint(0, VOCAB, (2, 5))
    hf.generation_config.eos_token_id = None  # plain greedy on both sides
    want = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(prompt, 10, use_cache=True), want)


def test_export_hf_writes_a_llama_that_transformers_reads_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = _randomise(zoo.create("llama-tiny", **SMALL))
    out = export_hf(ours, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_act"] == "silu"
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False
    back = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    again = from_hf(out)  # and back into the zoo: the same tensors
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_zoo_export_hf_cli_writes_llama_tiny(tmp_path, capsys):
    from zoo.weights.hf_cli import main

    assert main(["llama-tiny", "--set", "n_layers=1", "--out", str(tmp_path / "hf")]) == 0
    assert "tokenizer" in capsys.readouterr().out
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert back.config.num_hidden_layers == 1 and back.config.num_key_value_heads == 2


def test_hf_llama_features_the_zoo_lacks_are_refused_naming_the_field(tmp_path):
    hf = _hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field, value in (("hidden_act", "gelu"), ("mlp_bias", True), ("attention_bias", True),
                         ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})):
        (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(raw, **{field: value})))
        with pytest.raises(ValueError, match=r"config\.json.*(hidden_act|mlp_bias|attention_bias|rope_type)"):
            from_hf(tmp_path / "hf")


def test_llama_tiny_trains_from_its_config(tmp_path, monkeypatch):
    from lm.modules.causal_lm import load_lm
    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(REPO / "configs" / "lm" / "stdlib_llama_tiny.yaml"), "--trainer.max_steps=3",
          "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.init_args.max_bytes=30000",
          "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
          f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    model = load_lm(str(tmp_path / "run"))
    assert model.config.ffn == "swiglu" and model.lm_head is not None  # untied head
    fresh = zoo.create("llama-tiny")
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert moved, "three optimiser steps changed no weight"


def test_a_few_steps_lower_the_loss():
    """SwiGLU + GQA learn: 30 AdamW steps on one repeated batch bring the loss well below its start (ln 259 = 5.56)."""
    torch.manual_seed(0)
    model = zoo.create("llama-tiny", n_layers=2, d_model=64, d_ff=160, max_seq_len=64)
    ids = torch.randint(0, 259, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_zoo_plan_reads_the_llama_shapes(capsys):
    from lm.cli.plan import main

    assert main(["llama2-70b", "--devices", "8", "--seq_len", "4096", "--batch", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["params"] == _count_from_shapes("llama2-70b")
    assert plan["flops_per_token"] > 6 * plan["params"] * 0.9
    assert main(["llama2-7b", "--devices", "1", "--seq_len", "4096", "--batch", "1"]) == 0
    assert "llama2-7b" in capsys.readouterr().out
