"""Parity with `transformers` (test-only dependency) on random tiny Gemma / Gemma 2 models saved with
save_pretrained: fp32 logits within 1e-4, greedy generation (with and without our KV cache) equal to transformers',
export back to Hugging Face, the `zoo export-hf` entry point, and clear errors on bad folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # declared in the dev extra; installed wherever tests run
from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM  # noqa: E402

from zoo.weights.hf import export_hf, from_hf, load_hf_tokenizer  # noqa: E402
from zoo.weights.hf_cli import main  # noqa: E402

torch.set_num_threads(1)
VOCAB = 97


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # inputs drawn with torch.randint are the same every run


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    # Norm weights start at zero in both implementations; random values make the (1 + w) mapping observable.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.08))
    return model.eval()


def gemma2_case() -> Gemma2ForCausalLM:
    """GQA (4 heads / 2 kv), window 4 < sequence, both soft-caps small enough to bite, query scale 40^-1/2 != hd."""
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=40,
                       sliding_window=4, max_position_embeddings=64, attn_logit_softcapping=3.0,
                       final_logit_softcapping=4.0, attn_implementation="eager")
    return _randomise(Gemma2ForCausalLM(cfg))


def gemma1_case() -> GemmaForCausalLM:
    """MQA (4 heads / 1 kv), untied output, Gemma 1 norm names."""
    cfg = GemmaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=12, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return _randomise(GemmaForCausalLM(cfg))


CASES = {"gemma2-gqa-window-softcaps": gemma2_case, "gemma1-mqa-untied": gemma1_case}


@pytest.fixture(params=list(CASES))
def saved(request, tmp_path) -> tuple[torch.nn.Module, Path]:
    hf = CASES[request.param]()
    # Gemma 2 sharded (index + several files), Gemma 1 as one model.safetensors: both loader paths covered.
    shard = "20KB" if request.param.startswith("gemma2") else "100MB"
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    return hf, tmp_path


def test_logits_match_transformers(saved):
    hf, folder = saved
    ours = from_hf(folder)
    if isinstance(hf, Gemma2ForCausalLM):
        assert (folder / "model.safetensors.index.json").is_file()
        assert ours.config.layer_window(0) == 4 and ours.config.layer_window(1) is None
        assert ours.config.scale != ours.config.head_dim ** -0.5
    ids = torch.randint(3, VOCAB, (2, 19))  # 19 > window 4
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert want.abs().max() > 0.5  # non-trivial logits
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers_with_and_without_cache(saved):
    hf, folder = saved
    ours = from_hf(folder)
    prompt = torch.randint(3, VOCAB, (2, 5))
    hf.generation_config.eos_token_id = None  # no early stop / eos masking: plain greedy on both sides
    want = hf.generate(prompt, max_new_tokens=14, do_sample=False)
    assert want.shape == (2, 19)
    assert torch.equal(ours.generate(prompt, 14, use_cache=True), want)
    assert torch.equal(ours.generate(prompt, 14, use_cache=False), want)


def test_export_round_trip_loads_in_transformers(saved, tmp_path):
    hf, folder = saved
    ours = from_hf(folder)
    out = export_hf(ours, tmp_path / "exported")
    back = type(hf).from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (1, 11))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_export_hf_cli_from_checkpoint_file(tmp_path, capsys):
    import zoo
    from safetensors.torch import save_file

    model = _randomise(zoo.create("gemma2-tiny", n_layers=2, vocab_size=VOCAB))
    ckpt = tmp_path / "lm.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    rc = main([str(ckpt), "--model", "gemma2-tiny", "--set", "n_layers=2", "--set", f"vocab_size={VOCAB}",
               "--out", str(tmp_path / "hf")])
    assert rc == 0
    back = Gemma2ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (1, 90))  # longer than gemma2-tiny's window of 64
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4
    capsys.readouterr()
    # a bare .safetensors file without --model: one line naming the missing flag, exit 2, no traceback
    assert main([str(ckpt), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo export-hf: error: ") and "--model" in err and len(err.strip().splitlines()) == 1, err
    # as every tool: an abbreviated flag is refused, not taken as --out
    assert main([str(ckpt), "--ou", str(tmp_path / "y"), "--model", "gemma2-tiny"]) == 2
    assert "unknown key ou" in capsys.readouterr().err and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="positions"):
        export_hf(zoo.create("gopher-tiny", n_layers=1), tmp_path / "gopher")


def test_bad_folders_raise_clear_errors(tmp_path):
    hf = gemma2_case()
    hf.save_pretrained(tmp_path / "ok", max_shard_size="20KB")
    ok = tmp_path / "ok"
    # Unsupported architecture: the error names config.json and model_type.
    bad = json.loads((ok / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(bad, model_type="llama")))
    with pytest.raises(ValueError, match=r"config\.json.*model_type='llama'"):
        from_hf(tmp_path / "llama")
    # Config / weight shape mismatch: names the file, the tensor and both shapes.
    (ok / "config.json").write_text(json.dumps(dict(bad, intermediate_size=80)))
    mismatch = r"model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj.*intermediate_size"
    with pytest.raises(ValueError, match=mismatch):
        from_hf(ok)
    (ok / "config.json").write_text(json.dumps(bad))
    # Missing shard: names the shard file.
    shard = sorted(ok.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        from_hf(ok)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path / "nowhere")


def test_load_hf_tokenizer_reads_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "hello": 4, "world": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_hf_tokenizer(tmp_path)
    assert loaded.encode("hello world") == [4, 5] and loaded.decode([4, 5]) == "hello world"
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (6, 2, 1)
