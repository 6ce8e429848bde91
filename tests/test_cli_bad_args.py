"""Every ``zoo`` tool subcommand refuses bad argument values (wrong type, negative, NaN, a missing path, a folder where
a file is expected) with a non-zero exit, no traceback and ONE error line that names the flag.

The tools run in-process through ``zoo.cli.main`` (the same dispatch as the console script, weight-file checks
included), so each case costs milliseconds: every refusal here happens before a model or dataset is loaded.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Lightning's log handlers bind the stderr of the moment they are made: made here, not inside a test's capture (a
# later test would then log into a closed stream)
import zoo.train.trainer  # noqa: F401,E402

LM_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "lm" / "stdlib_gemma2_tiny.yaml")

# (argv with {tmp} / {ckpt} / {dir} / {missing} placeholders, text the error line must contain: the flag)
CASES = [
    # zoo probe
    (["probe", "--backbone", "{missing}", "--data", "digits"], "{missing}"),
    (["probe", "--backbone", "{dir}", "--data", "digits"], "{dir}"),
    (["probe", "--backbone", "random:resnet18", "--data", "digits", "--epochs", "x"], "epochs"),
    (["probe", "--backbone", "random:resnet18", "--data", "digits", "--mode", "nope"], "mode"),
    (["probe", "--backbone", "random:resnet18", "--data", "digits", "--out", "{file}"], "--out"),
    (["probe", "--backbone", "random:resnet18", "--data", "digits", "--cache_dir", "{file}/sub"], "--cache_dir"),
    # zoo export
    (["export", "{missing}", "--out", "{tmp}/x.safetensors"], "{missing}"),
    (["export", "{dir}", "--out", "{tmp}/x.safetensors"], "{dir}"),
    # --which takes the names the checkpoint declares, so it is checked against a checkpoint that declares some
    (["export", "{declared}", "--out", "{tmp}/x.safetensors", "--which", "nope"], "which"),
    # zoo export-hf
    (["export-hf", "gemma2-tiny", "--out", "{tmp}/hf", "--dtype", "int8"], "--dtype"),
    (["export-hf", "gemma2-tiny", "--out", "{tmp}/hf", "--dtype", "nan"], "--dtype"),
    (["export-hf", "gemma2-tiny", "--out", "{tmp}/hf", "--set", "n_layers"], "--set"),
    (["export-hf", "{missing}.ckpt", "--out", "{tmp}/hf"], "{missing}"),
    (["export-hf", "gemma2-tiny"], "out"),
    # zoo eval ppl / needle
    (["eval", "ppl", "--model", "gemma2-tiny", "--seq-len", "-4"], "--seq-len"),
    (["eval", "ppl", "--model", "gemma2-tiny", "--batch-size", "0"], "--batch-size"),
    (["eval", "ppl", "--model", "gemma2-tiny", "--max-bytes", "x"], "max-bytes"),
    (["eval", "ppl", "--model", "gemma2-tiny", "--max-batches", "nan"], "max-batches"),
    (["eval", "ppl", "--model", "gemma2-tiny", "--cache-dir", "{file}"], "--cache-dir"),
    (["eval", "ppl", "--model", "{dir}/nothing.ckpt"], "{dir}/nothing.ckpt"),
    (["eval", "needle", "--model", "gemma2-tiny", "--lengths", "-8"], "--lengths"),
    (["eval", "needle", "--model", "gemma2-tiny", "--depths", "nan"], "--depths"),
    (["eval", "needle", "--model", "gemma2-tiny", "--out", "{file}"], "--out"),
    (["eval", "needle", "--model", "gemma2-tiny", "--haystack", "{dir}"], "--haystack"),
    (["eval", "needle", "--model", "vlm-digits-tiny", "--modality", "image", "--images", "0"], "--images"),
    (["eval", "needle", "--model", "vlm-digits-tiny", "--modality", "image", "--trials", "-1"], "--trials"),
    (["eval", "needle", "--model", "gemma2-tiny", "--seed", "x"], "seed"),
    (["eval", "needle", "--model", "gemma2-tiny", "--device", "tpu:9"], "--device"),
    # zoo scaling
    (["scaling", "sweep", "--config", "{missing}.yaml"], "{missing}"),
    (["scaling", "sweep", "--config", "{dir}"], "{dir}"),
    (["scaling", "sweep", "--config", LM_CONFIG, "--limit", "x"], "limit"),
    (["scaling", "fit", "{missing}.csv", "--approach", "3"], "{missing}"),
    (["scaling", "fit", "{dir}", "--approach", "3"], "{dir}"),
    (["scaling", "fit", "{file}", "--approach", "4"], "approach"),
    (["scaling", "fit", "{file}", "--approach", "3", "--bootstrap", "x"], "bootstrap"),
    # zoo plan
    (["plan", "gemma2-tiny", "--devices", "-1", "--seq_len", "64", "--batch", "8"], "--devices"),
    (["plan", "gemma2-tiny", "--devices", "2", "--seq_len", "x", "--batch", "8"], "seq_len"),
    (["plan", "gemma2-tiny", "--devices", "2", "--seq_len", "64", "--batch", "8", "--mfu", "nan"], "--mfu"),
    (["plan", "gemma2-tiny", "--devices", "2", "--seq_len", "64", "--batch", "8", "--memory_gb", "-3"],
     "--memory_gb"),
    (["plan", "gemma2-tiny", "--devices", "2", "--seq_len", "64", "--batch", "0"], "--batch"),
    (["plan", "vlm-digits-tiny", "--devices", "2", "--seq_len", "64", "--batch", "8"], "vlm-digits-tiny"),
    # zoo consolidate
    (["consolidate", "{missing}", "--out", "{tmp}/x.ckpt"], "{missing}"),
    (["consolidate", "{file}", "--out", "{tmp}/x.ckpt"], "{file}"),
    (["consolidate", "{dir}"], "out"),
    # zoo fit with an LM config: refused before training
    (["fit", "--config", LM_CONFIG, "--trainer.max_steps", "-5"], "max_steps"),
    (["fit", "--config", LM_CONFIG, "--model.init_args.weight_decay", "nan"], "weight_decay"),
    (["fit", "--config", LM_CONFIG, "--model.init_args.lr", "x"], "lr"),
    (["fit", "--config", LM_CONFIG, "--model.init_args.warmup_steps", "-2"], "warmup_steps"),
    (["fit", "--config", LM_CONFIG, "--data.init_args.paths", "{missing}"], "data.paths"),
    (["fit", "--config", LM_CONFIG, "--data.init_args.batch_size", "0"], "batch_size"),
    (["fit", "--config", LM_CONFIG, "--ckpt_path", "{missing}.ckpt"], "{missing}"),
    # a negative value argparse reads as a flag ('-inf'), a non-finite float: the flag, and what to write
    (["fit", "--config", LM_CONFIG, "--model.init_args.weight_decay", "-inf"], "--model.init_args.weight_decay=-inf"),
    (["fit", "--config", LM_CONFIG, "--model.init_args.weight_decay", "inf"], "weight_decay must be a finite number"),
    (["fit", "--config", LM_CONFIG, "--trainer.max_steps", "-1e3"], "--trainer.max_steps=-1e3"),
    (["plan", "gemma2-tiny", "--devices", "2", "--seq_len", "64", "--batch", "8", "--mfu", "-inf"], "--mfu=-inf"),
    (["eval", "ppl", "--model", "gemma2-tiny", "--seq-len", "-nan"], "--seq-len=-nan"),
    (["eval", "needle", "--model", "vlm-digits-tiny", "--modality", "image", "--images", "1.5"], "--images"),
    # an output folder that is a file, or lies under one
    (["export-hf", "gemma2-tiny", "--out", "{file}"], "--out"),
    (["export-hf", "gemma2-tiny", "--out", "{file}/sub"], "--out"),
]


@pytest.mark.parametrize("argv, names", CASES, ids=[" ".join(c[0][:4]) + f" [{i}]" for i, c in enumerate(CASES)])
def test_a_bad_argument_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, argv, names):
    from zoo.cli import main

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x\n")
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "zoo": {"format": 1, "kind": "image-encoder",
                "arch": "convnet_tiny", "encoders": {"online": "online_encoder."}}}, tmp_path / "declared.ckpt")
    fill = {"{tmp}": str(tmp_path), "{dir}": str(tmp_path / "folder"), "{file}": str(tmp_path / "afile"),
            "{missing}": str(tmp_path / "missing"), "{ckpt}": str(tmp_path / "model.ckpt"),
            "{declared}": str(tmp_path / "declared.ckpt")}

    def sub(text: str) -> str:
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    argv = [sub(a) for a in argv]
    if argv[0] == "fit":
        argv += ["--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.cache_dir",
                 str(tmp_path / "cache")]
    try:
        code = main(argv)
    except SystemExit as exit_:  # a parser that exits is fine, as long as it said one line
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and sub(names) in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
