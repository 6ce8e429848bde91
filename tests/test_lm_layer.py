"""The LM layer: LMModule base (model in configure_model), checkpoint contract, zoo.load_lm, Transformer aux outputs
and input embeddings, dead knobs, export-hf without --model plus tokenizer files."""
from __future__ import annotations

import pytest
import torch

import zoo
from lm import CausalLM, Distill, LMModule
from lm_testutil import TINY, quiet_trainer, tiny_data
from zoo.models.transformer import Transformer, TransformerConfig, TransformerOutput

ROUTED = {**TINY, "ffn": "routed", "n_experts": 4, "routing_frequency": 1}


def _fit_and_save(tmp_path, module, steps: int = 2):
    dm = tiny_data(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, dm)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


# -- LMModule ------------------------------------------------------------------------------------------------------
def test_siblings_share_the_base_and_record_every_hparam():
    assert issubclass(CausalLM, LMModule) and issubclass(Distill, LMModule)
    assert not issubclass(Distill, CausalLM)
    m = CausalLM(model_overrides=TINY, lr=3e-3)
    # The base's defaults and the subclass's own arguments are both saved (checkpoints and sweeps read them).
    assert m.hparams.lr == 3e-3 and m.hparams.warmup_steps == 100 and m.hparams.model_overrides == TINY
    d = Distill(student_overrides=TINY, teacher="gemma2-tiny", teacher_overrides=TINY, top_k=4, weight_decay=0.0)
    assert d.hparams.top_k == 4 and d.hparams.weight_decay == 0.0 and d.hparams.betas == (0.9, 0.95)
    assert CausalLM.summary_metrics == ("val/bpb", "perf/tokens_per_s", "perf/model_tflops", "perf/mfu")


def test_model_is_built_once_in_configure_model_and_plain_python_works():
    m = CausalLM(model_overrides=TINY, total_steps=10)
    assert m.model is None and m.config.d_model == TINY["d_model"]  # config known before any weights exist
    m.configure_model()
    built = m.model
    m.configure_model()
    assert m.model is built  # second call is a no-op
    fresh = CausalLM(model_overrides=TINY, total_steps=10)
    ids = torch.randint(0, 259, (2, 9))
    assert fresh(ids).shape == (2, 9, 259)  # forward builds the model on first use
    opt = CausalLM(model_overrides=TINY, total_steps=10).configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in opt.param_groups) > 0
    assert {k.split(".")[0] for k in m.state_dict()} == {"model", "reward_baseline", "reward_baseline_set"}


def test_checkpoint_contract_and_loading_outside_a_trainer(tmp_path):
    torch.manual_seed(0)
    module = CausalLM(model_overrides=TINY, warmup_steps=1)
    path = _fit_and_save(tmp_path, module)
    from zoo.weights.safe_load import safe_torch_load

    ckpt = safe_torch_load(path)
    assert ckpt["zoo"] == {"format": 1, "kind": "lm", "model": "gemma2-tiny", "overrides": TINY, "prefix": "model.",
                           "tokenizer": "byte"}
    x = torch.randint(0, 259, (1, 12))
    expected = module.model.eval()(x)
    torch.testing.assert_close(zoo.load_lm(path)(x), expected)
    torch.testing.assert_close(zoo.load_lm(tmp_path / "run")(x), expected)  # a run folder finds last.ckpt
    again = CausalLM.load_from_checkpoint(path)  # Lightning's own loader: configure_model runs first
    torch.testing.assert_close(again.model.eval()(x), expected)
    # The contract wins over the hyper-parameters: a reader never needs a module's init argument names.
    ckpt["hyper_parameters"] = {}
    torch.save(ckpt, tmp_path / "contract_only.ckpt")
    torch.testing.assert_close(zoo.load_lm(tmp_path / "contract_only.ckpt")(x), expected)
    ckpt["zoo"] = {**ckpt["zoo"], "format": 2}
    torch.save(ckpt, tmp_path / "future.ckpt")
    with pytest.raises(ValueError, match="contract format 2"):
        zoo.load_lm(tmp_path / "future.ckpt")
    assert isinstance(zoo.load_lm("gemma2-tiny"), Transformer)  # a registry name: random init


def test_distill_checkpoint_contract_names_the_student(tmp_path):
    module = Distill(student_overrides=TINY, teacher="gemma2-tiny", teacher_overrides=TINY, warmup_steps=1)
    path = _fit_and_save(tmp_path, module, steps=1)
    from zoo.weights.safe_load import safe_torch_load

    contract = safe_torch_load(path)["zoo"]
    assert (contract["model"], contract["overrides"]) == ("gemma2-tiny", TINY)
    x = torch.randint(0, 259, (1, 8))
    torch.testing.assert_close(zoo.load_lm(path)(x), module.model.eval()(x))


@pytest.mark.parametrize("kwargs,key", [({"reinforce_weight": 1.0}, "reinforce_weight"),
                                        ({"baseline_momentum": 0.5}, "baseline_momentum"),
                                        ({"balance_weight": 0.1}, "balance_weight")])
def test_rlr_knobs_refused_without_an_rlr_router(kwargs, key):
    for overrides in (TINY, {**ROUTED, "router": "sbase"}):
        with pytest.raises(ValueError, match=rf"model\.{key}=.* has no effect.*remove the key"):
            CausalLM(model_overrides=overrides, **kwargs)
    CausalLM(model_overrides={**ROUTED, "router": "rlr"}, **kwargs)  # used there: accepted


def test_router_settings_on_a_dense_ffn_are_refused():
    with pytest.raises(ValueError, match="n_experts=4 has no effect: ffn='geglu' is dense"):
        TransformerConfig(n_experts=4)
    with pytest.raises(ValueError, match="router='hash' has no effect"):
        zoo.create("gemma2-tiny", device="meta", router="hash")
    with pytest.raises(ValueError, match="sinkhorn_iters=3 has no effect: router='hash'"):
        TransformerConfig(ffn="routed", n_experts=2, router="hash", sinkhorn_iters=3)
    routed = TransformerConfig(ffn="routed", n_experts=4, router="hash", hash_seed=1)
    assert routed.replace(ffn="geglu").n_experts == 1  # back to dense: the routed settings go with the FFN


# -- Transformer outputs and inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["sbase", "hash", "rlr"])
def test_forward_returns_routing_aux_instead_of_module_state(router):
    torch.manual_seed(0)
    model = zoo.create("gemma2-tiny", **{**ROUTED, "router": router}).train()
    ids = torch.randint(0, 259, (2, 10))
    out = model(ids, return_aux=True)
    assert isinstance(out, TransformerOutput) and out.logits.shape == (2, 10, 259) and out.hidden.shape == (2, 10, 64)
    assert len(out.routing) == 2  # one per routed layer
    for aux in out.routing:
        assert aux.expert.shape == ids.shape and aux.stats["load"].shape == (4,)
        assert (aux.log_prob is not None) == (router == "rlr") == (aux.balance_loss is not None)
    assert not any(k.startswith("last_") for layer in model.layers for k in vars(layer.ffn))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids, return_aux=True).logits)  # the plain path: logits only


def test_inputs_embeds_equal_ids_and_work_with_the_cache():
    torch.manual_seed(0)
    model = zoo.create("gemma-tiny", n_layers=2, d_model=64, d_ff=128, n_heads=2, head_dim=32).eval()
    assert model.config.embed_scale  # the sqrt(d) scale applies to given embeddings as to looked-up ids
    ids = torch.randint(0, 259, (2, 12))
    full = model(ids)
    torch.testing.assert_close(model(inputs_embeds=model.embed(ids)), full)
    # A prefix of embeddings (e.g. image tokens) goes into the KV cache once; text then continues from ids.
    prefix = torch.randn(2, 5, 64)
    joined = torch.cat((prefix, model.embed(ids)), 1)
    reference = model(inputs_embeds=joined)
    cache = model.new_cache(2, 32)
    first = model(inputs_embeds=prefix, kv_cache=cache)
    rest = model(ids, kv_cache=cache)
    torch.testing.assert_close(torch.cat((first, rest), 1), reference, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_bad_shapes_and_hash_router_need_ids():
    model = zoo.create("gemma2-tiny", **TINY)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, d_model=64\]"):
        model(inputs_embeds=torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="disagree"):
        model(torch.zeros(1, 3, dtype=torch.long), inputs_embeds=torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="pass input_ids"):
        model()
    hashed = zoo.create("gemma2-tiny", **{**ROUTED, "router": "hash"})
    with pytest.raises(ValueError, match="hash router picks experts by token id"):
        hashed(inputs_embeds=torch.randn(1, 4, 64))
    ids = torch.randint(0, 259, (1, 4))
    torch.testing.assert_close(hashed(ids, inputs_embeds=hashed.embed(ids)), hashed(ids))


# -- export-hf and the tokenizer -----------------------------------------------------------------------------------
def test_export_hf_reads_the_checkpoint_and_writes_a_working_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer, Gemma2ForCausalLM

    from zoo.models.tokenizer import ByteTokenizer
    from zoo.weights.hf_cli import main

    torch.manual_seed(0)
    module = CausalLM(model_overrides=TINY, warmup_steps=1)
    path = _fit_and_save(tmp_path, module)
    assert main([str(path), "--out", str(tmp_path / "hf")]) == 0  # no --model: the checkpoint records it
    assert "tokenizer.json" in capsys.readouterr().out
    back = Gemma2ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 259, (1, 20))
    with torch.no_grad():
        assert (back(ids).logits - module.model.eval()(ids)).abs().max().item() <= 1e-4
    hf_tok, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), ByteTokenizer()
    for text in ("def f(x):\n\treturn x + 1\r\n", "héllo wörld 世界 🎉", " leading space", "\x00\x7f"):
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert hf_tok.decode(ours.encode(text)) == text
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (256, 257, 258)
    assert hf_tok.decode([0xE4, 0xB8, 258], skip_special_tokens=True) == ours.decode([0xE4, 0xB8, 258])


def test_summary_metrics_are_names_the_module_logs(tmp_path):
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides=TINY, warmup_steps=1, throughput_every=2, peak_flops=1e12)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=1)
    trainer.fit(module, dm)
    assert set(CausalLM.summary_metrics) <= set(trainer.callback_metrics)
