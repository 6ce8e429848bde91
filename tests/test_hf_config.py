"""from_hf refuses config.json files that disagree with the weights or are malformed (no transformers needed)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.weights.hf import export_hf, from_hf

SMALL = dict(n_layers=6, d_model=32, d_ff=64, n_heads=2, n_kv_heads=1, head_dim=16, window=8, max_seq_len=64,
             vocab_size=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    return export_hf(zoo.create("gemma2-tiny", **SMALL).eval(), tmp_path_factory.mktemp("hf") / "six")


def _copy(folder, tmp_path, **changes):
    out = tmp_path / "edited"
    out.mkdir()
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out, cfg


def test_full_folder_still_loads(folder):
    assert from_hf(folder).config.n_layers == 6


@pytest.mark.parametrize("n", [4, 1])
def test_fewer_layers_in_config_than_weights_is_refused(folder, tmp_path, n):
    out, cfg = _copy(folder, tmp_path, num_hidden_layers=n, layer_types=cfg_types(folder)[:n])
    with pytest.raises(ValueError, match=rf"not used by config.json \(num_hidden_layers={n}.*model.layers.{n}\.") as e:
        from_hf(out)
    assert str(out) in str(e.value)


def cfg_types(folder):
    return json.loads((folder / "config.json").read_text())["layer_types"]


def test_extra_stray_tensor_is_refused(folder, tmp_path):
    out, _ = _copy(folder, tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        from_hf(out)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", -1), ("num_hidden_layers", 0),
                                          ("hidden_size", "32"), ("vocab_size", 3.5), ("intermediate_size", None),
                                          ("num_attention_heads", True), ("head_dim", -16), ("rms_norm_eps", -1e-6),
                                          ("rope_theta", "big"), ("sliding_window", 0)])
def test_malformed_field_is_refused_naming_it(folder, tmp_path, field, value):
    out, _ = _copy(folder, tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"config.json: {field}=") as e:
        from_hf(out)
    assert str(out) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ("[1, 2]", "found a list"),
                                         ('"gemma"', "found a str"), ("", "not valid JSON")])
def test_config_not_a_json_object_is_refused(folder, tmp_path, text, match):
    out, _ = _copy(folder, tmp_path)
    (out / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        from_hf(out)
    assert "config.json" in str(e.value)


def test_export_hf_cli_reads_checkpoints_through_the_safe_loader(tmp_path):
    """`zoo export-hf FILE` used torch.load directly: empty/hostile files now give one clear error naming the file."""
    from zoo.weights.export_hf import _load_model

    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        _load_model(str(tmp_path / "empty.ckpt"), "gemma2-tiny", {})
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="not a state dict"):
        _load_model(str(tmp_path / "list.ckpt"), "gemma2-tiny", {})
