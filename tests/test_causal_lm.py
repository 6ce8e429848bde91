"""lm.CausalLM: schedule, parameter groups, FLOPs/MFU, training on CPU, data checks, checkpoints, configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from lm import CausalLM
from lm.modules.causal_lm import load_lm
from lm.parallel.flops import attention_flops_per_token, matmul_params, mfu_flops_per_token
from lm.modules.metrics import bits_per_byte
from lm.parallel.hardware import mfu, peak_flops
from lm.modules.optim import lr_at, param_groups
from lm_testutil import TINY, fit_and_val_losses, quiet_trainer, tiny_data

REPO = Path(__file__).resolve().parents[1]


def test_lr_at_warmup_cosine_floor():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    steps = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, 1.0, 0, 0)


def test_param_groups_no_decay_for_norms_biases_embeddings():
    model = zoo.create("gemma2-tiny", **TINY)
    model.extra = nn.Linear(4, 4, bias=True)
    decay, keep = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    d_ids, k_ids = {id(p) for p in decay["params"]}, {id(p) for p in keep["params"]}
    assert not d_ids & k_ids
    assert d_ids | k_ids == {id(p) for p in model.parameters()}
    assert id(model.embed.weight) in k_ids  # tied embedding: one tensor, no decay
    assert id(model.extra.bias) in k_ids and id(model.extra.weight) in d_ids
    assert all(id(m.weight) in k_ids for m in model.modules() if "Norm" in type(m).__name__)
    assert id(model.layers[0].attn.q_proj.weight) in d_ids


def test_flops_bpb_and_mfu_fallback():
    dense = zoo.create("gemma2-tiny", **TINY)
    c = dense.config
    n = matmul_params(dense, c.vocab_size)
    assert n == dense.num_params(embedding=False) - sum(
        p.numel() for m in dense.modules() if "Norm" in type(m).__name__ for p in m.parameters()
    ) + c.vocab_size * c.d_model
    routed = zoo.create("gemma2-tiny", **TINY, ffn="routed", n_experts=4, routing_frequency=2)
    # One expert per token: active matmul params = dense + the router (d_model x n_experts) per routed layer.
    assert matmul_params(routed, c.vocab_size) == n + c.d_model * 4
    attention = attention_flops_per_token(c.n_layers, c.n_heads, c.head_dim, 100)
    assert attention == 6 * c.n_layers * c.n_heads * c.head_dim * 100
    assert mfu_flops_per_token(dense, 100) == 6 * n + attention
    assert mfu_flops_per_token(c, 100) == 6 * n + attention  # from the config alone (meta-device build)
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 4.0) == pytest.approx(2.0 / math.log(2) / 4)
    assert peak_flops("cpu") is None and mfu(1e9, 1e3, None) is None
    assert mfu(1e9, 1e3, 1e13) == pytest.approx(0.1)


def test_causal_lm_trains_and_logs(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides=TINY, lr=3e-3, warmup_steps=2, throughput_every=2)
    before, trainer = fit_and_val_losses(module, dm, tmp_path, steps=30)
    m = trainer.callback_metrics
    assert m["val/loss"].item() < before - 1.0  # learnt well beyond uniform guessing
    assert m["val/ppl"].item() == pytest.approx(math.exp(m["val/loss"].item()), rel=1e-4)
    bpt = dm.bytes_per_token("val")
    assert m["val/bpb"].item() == pytest.approx(m["val/loss"].item() / math.log(2) / bpt, rel=1e-4)
    assert m["perf/tokens_per_s"].item() > 0
    assert "perf/mfu" not in m  # CPU: no datasheet peak, so no made-up MFU
    # but the achieved FLOP/s is: training FLOPs per token (6N + attention) times tokens per second
    assert m["perf/model_tflops"].item() == pytest.approx(
        module._flops_per_token * m["perf/tokens_per_s"].item() / 1e12, rel=1e-5)
    assert "train/bpb" in m


def test_throughput_is_measured_when_validation_comes_as_often_as_the_window_closes(tmp_path):
    # validating every 2 steps with a 2-step throughput window: validation pauses the window instead of resetting it
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides=TINY, warmup_steps=1, throughput_every=2)
    trainer = quiet_trainer(tmp_path, max_steps=6, val_check_interval=2, limit_val_batches=1)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["perf/tokens_per_s"].item() > 0
    assert trainer.callback_metrics["perf/model_tflops"].item() > 0


def test_mfu_logged_with_a_stated_peak(tmp_path):
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides=TINY, warmup_steps=1, throughput_every=2, peak_flops=1e12)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, dm)
    assert 0 < trainer.callback_metrics["perf/mfu"].item() < 1


def test_bad_vocab_and_seq_len_name_the_value(tmp_path):
    dm = tiny_data(tmp_path)
    small_vocab = CausalLM(model_overrides={**TINY, "vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size=259 but model 'gemma2-tiny' has vocab_size=100"):
        quiet_trainer(tmp_path, max_steps=1).fit(small_vocab, dm)
    long = tiny_data(tmp_path, seq_len=256)
    with pytest.raises(ValueError, match="seq_len=256 exceeds model 'gemma2-tiny'.s max_seq_len=128"):
        quiet_trainer(tmp_path, max_steps=1).fit(CausalLM(model_overrides=TINY), long)
    with pytest.raises(KeyError, match="unknown model"):
        CausalLM(model="gemma2-tinyy")


def test_checkpoint_roundtrip_with_weights_only_load(tmp_path):
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides=TINY, warmup_steps=1)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, dm)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    x = torch.randint(0, 259, (1, 12))
    for spec in (str(path), str(tmp_path / "run")):  # file, or the run folder holding it
        loaded = load_lm(spec)
        torch.testing.assert_close(loaded(x), module.model.eval()(x))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_lm(str(tmp_path / "missing.ckpt"))


def test_configs_parse_and_dense_config_runs(tmp_path, monkeypatch):
    from zoo.cli import main, run_cli

    monkeypatch.chdir(tmp_path)
    cfg = REPO / "configs" / "lm"
    for name, extra in (("stdlib_gemma2_tiny_routed.yaml", []),
                        ("stdlib_distill_tiny.yaml", ["--model.init_args.teacher_ckpt=null",
                                                      "--model.init_args.teacher=gemma2-tiny"])):
        cli = run_cli(["--config", str(cfg / name), *extra], run=False)
        assert cli.model.config.d_model > 0
    main(["fit", "--config", str(cfg / "stdlib_gemma2_tiny.yaml"), "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.init_args.max_bytes=30000",
          "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
          f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("key,value", [("lr", -1e-3), ("weight_decay", -0.1), ("warmup_steps", -1),
                                       ("min_lr_ratio", 1.5), ("betas", (0.9, 1.0))])
def test_impossible_optimiser_settings_are_refused_naming_the_key(key, value):
    from lm.modules.causal_lm import CausalLM

    with pytest.raises(ValueError, match=f"model.{key}"):
        CausalLM(**{key: value})


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_load_lm_bad_files_one_clear_error(tmp_path):
    """load_lm reads through the project's safe loader: truncated, empty and hostile files name the file."""
    from zoo.weights.safe_load import UnsafeFileError

    torch.manual_seed(0)
    model = zoo.create("gemma2-tiny", **TINY).eval()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": "gemma2-tiny", "model_overrides": TINY}}, good)
    x = torch.randint(0, 259, (1, 8))
    torch.testing.assert_close(load_lm(str(good))(x), model(x))
    blob = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    for name, err_type, match in (("cut", ValueError, "truncated"), ("empty", ValueError, "empty"),
                                  ("evil", UnsafeFileError, "system"), ("list", ValueError, "state_dict")):
        path = tmp_path / f"{name}.ckpt"
        with pytest.raises(err_type, match=match) as err:
            load_lm(str(path))
        assert str(path) in str(err.value), name
    assert not marker.exists()
