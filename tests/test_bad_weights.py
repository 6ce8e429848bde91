"""Silent bad weights are refused: NaN/Inf or integer tensors in a Hugging Face folder (zoo.from_hf) or an LM
checkpoint (zoo.load_lm, zoo export-hf), in one line naming the file and the tensor; an export into a folder that
holds an older sharded export loads the NEW model; a bad --dtype or rope_parameters is one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from lm_testutil import TINY
from zoo.weights.hf import export_hf, from_hf

HF_TENSOR = "model.layers.1.mlp.up_proj.weight"


def _model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.create("gemma2-tiny", **{**TINY, **overrides}).eval()


def _poison(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "int":
        return torch.zeros(t.shape, dtype=torch.int64)
    t = t.clone()
    t.view(-1)[3] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[how]
    return t


@pytest.mark.parametrize("how", ["nan", "inf", "-inf", "int"])
def test_from_hf_refuses_nonfinite_or_integer_weights_naming_file_and_tensor(tmp_path, how):
    folder = export_hf(_model(), tmp_path / "hf")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[HF_TENSOR] = _poison(tensors[HF_TENSOR], how)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        from_hf(folder)
    line = str(err.value)
    assert "\n" not in line and str(weights) in line and repr(HF_TENSOR) in line, line
    assert ("int64" in line) if how == "int" else ("NaN/Inf" in line), line
    with pytest.raises(ValueError, match="NaN/Inf|int64"):
        zoo.load_lm(str(folder))  # the LM loader reads the same folder through from_hf


def test_from_hf_refuses_a_dtype_it_cannot_hold(tmp_path):
    model = _model()
    folder = export_hf(model, tmp_path / "hf")
    for bad in ("int8", "torch.int32", "bool", "nope", "Float32"):
        with pytest.raises(ValueError, match=f"dtype {bad!r} is not a floating-point dtype"):
            from_hf(folder, dtype=bad)
    x = torch.randint(0, 259, (1, 8))
    assert from_hf(folder, dtype="bfloat16").embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(from_hf(folder, dtype=torch.float32)(x), model(x), rtol=0, atol=0)
    # a finite fp32 value beyond float16's range would become Inf: refused, naming the tensor
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[HF_TENSOR].view(-1)[0] = 1e6
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{HF_TENSOR!r} overflows float16"):
        from_hf(folder, dtype="float16")


def _lm_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    contract = {"format": 1, "kind": "lm", "model": "gemma2-tiny", "overrides": TINY, "prefix": "model."}
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "zoo": contract,
                "pytorch-lightning_version": "2.6.0"}, path)
    return path


@pytest.mark.parametrize("how", ["nan", "inf", "int"])
def test_lm_checkpoint_with_bad_weights_is_refused_by_every_reader(tmp_path, capsys, how):
    from zoo.weights.hf_cli import main as export_main

    state = _model().state_dict()
    state["layers.0.ffn.up_proj.weight"] = _poison(state["layers.0.ffn.up_proj.weight"], how)
    ckpt = _lm_checkpoint(tmp_path / "bad.ckpt", state)
    with pytest.raises(ValueError) as err:
        zoo.load_lm(str(ckpt))
    line = str(err.value)
    assert "\n" not in line and str(ckpt) in line and "'layers.0.ffn.up_proj.weight'" in line, line
    assert export_main([str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "layers.0.ffn.up_proj.weight" in err_lines[0], err_lines
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def _sharded_export(folder: Path, model: torch.nn.Module, shards: int = 3) -> None:
    """What transformers' save_pretrained(max_shard_size=...) writes: model-0000i-of-0000n.safetensors + index."""
    export_hf(model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_export_over_an_older_sharded_export_loads_the_new_model(tmp_path, capsys):
    old, new = _model(0, n_layers=4), _model(1)
    folder = tmp_path / "hf"
    _sharded_export(folder, old)
    # a stale index makes the loader read the OLD weights (and refuse the new config): the export must supersede it
    from zoo.weights.hf_cli import main as export_main

    ckpt = _lm_checkpoint(tmp_path / "new.ckpt", new.state_dict())
    assert export_main([str(ckpt), "--out", str(folder), "--tokenizer", "byte"]) == 0
    capsys.readouterr()
    assert not list(folder.glob("model-*-of-*.safetensors")) and not (folder / "model.safetensors.index.json").exists()
    x = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(folder)(x), new(x), rtol=0, atol=0)
    transformers = pytest.importorskip("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        # fp32, same weights, a 2-layer model: the two implementations differ only by summation order (~1e-6)
        assert (back(x).logits - new(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope", [[10000.0], "default", {"rope_theta": "big"}, {"rope_theta": -1.0},
                                  {"rope_theta": float("inf")}, {"rope_type": 3}, {"rope_theta": True}])
def test_a_malformed_rope_parameters_is_one_line(tmp_path, capsys, rope):
    from zoo.weights.hf_cli import main as export_main

    folder = export_hf(_model(), tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters"):
        from_hf(folder)
    assert export_main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rope_parameters" in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("dtype", ["int8", "torch.int64", "bool", "float", "fp16", "nope", ""])
def test_export_hf_refuses_a_dtype_that_is_not_floating_before_loading(tmp_path, capsys, dtype):
    from zoo.weights.hf_cli import main as export_main

    assert export_main(["gemma2-tiny", "--out", str(tmp_path / "out"), "--dtype", dtype]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"zoo export-hf: error: --dtype {dtype!r}"), err
    assert not (tmp_path / "out").exists()
