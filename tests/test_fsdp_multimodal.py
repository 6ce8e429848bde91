"""The multimodal model (lm.MultimodalLM: vision encoder + Transformer) under ``--trainer.strategy fsdp2`` on 2 gloo
processes, with the harness of test_fsdp: equal to one process at the same global batch, and its sharded checkpoint
read back as one file by zoo.load_lm and zoo.load_backbone.

With the encoder frozen (the default) its batch norm uses the stored statistics and 2 x B equals one process's 2B
within 1e-5. A trained encoder's batch norm uses batch statistics; the sharded build swaps it for the all-rank batch
norm the Trainer's ``sync_batchnorm`` gives DDP, and the sharded run equals the DDP run bit for bit. (Both are ~1e-3
away from one process after 3 steps: that gap is the all-rank batch norm's own, not sharding's.)
"""
from __future__ import annotations

import copy

import pytest
import torch

from test_fsdp import B, STEPS, assert_matches_one_process, dump, initial_weights, load_ranks, run_sharded, run_single

DEC = {"n_layers": 2, "d_model": 64, "d_ff": 128, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "window": 16,
       "max_seq_len": 64}
MM = {"model": "vlm-digits-tiny", "lr": 0.003, "warmup_steps": 1, "eval_samples": 0,
      "model_overrides": {"decoder_overrides": DEC, "encoder_overrides": {"widths": [8, 16, 16, 32]}}}
DATA = {"class_path": "zoo.data.interleaved.InterleavedDataModule",
        "init_args": {"train_size": 32, "val_size": 8, "batch_size": B}}


def test_fsdp_multimodal_two_processes_match_one_process_and_checkpoint_reads_back(tmp_path):
    import zoo
    from lm import MultimodalLM
    from lm.parallel.sharding import consolidate
    from zoo.data.interleaved import InterleavedDataModule

    init = initial_weights(tmp_path, MM)
    one = run_single(tmp_path, STEPS, init, module=MultimodalLM(**MM),
                     datamodule=InterleavedDataModule(**{**DATA["init_args"], "batch_size": 2 * B}))
    run = run_sharded(tmp_path, "two", STEPS, [dump(tmp_path / "two", str(init))], model=MM,
                      module="lm.MultimodalLM", data=DATA, every_n=STEPS)
    r0, r1 = load_ranks(run)
    assert_matches_one_process(one, r0, r1, STEPS)
    assert r0["buffers"]["mean"].flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # not to_empty garbage

    out = consolidate(run / "checkpoints" / "last.ckpt", tmp_path / "single.ckpt")
    model = zoo.load_lm(str(out))
    for name, value in model.state_dict().items():
        assert torch.equal(value, r0["state"][name]), name
    encoder = zoo.load_backbone(str(out))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, r0["state"]["encoder." + name]), name


@pytest.mark.slow
def test_fsdp_multimodal_with_a_trained_encoder_equals_ddp(tmp_path):
    """train_encoder: full, batch norm on batch statistics over both ranks: FSDP2 == DDP exactly (weights and losses)."""
    model = copy.deepcopy(MM)
    model["model_overrides"]["train_encoder"] = "full"
    init = initial_weights(tmp_path, model)
    runs = {s: run_sharded(tmp_path, s, STEPS, [dump(tmp_path / s, str(init))], model=model,
                           module="lm.MultimodalLM", data=DATA, trainer_args={"strategy": s})
            for s in ("fsdp2", "ddp")}
    (f0, f1), (d0, _) = load_ranks(runs["fsdp2"]), load_ranks(runs["ddp"])
    assert f0["sharded"] and not d0["sharded"]
    assert f0["losses"] == d0["losses"]
    moved = [k for k in d0["state"] if k.endswith("running_mean")]
    assert moved and all(not torch.equal(d0["state"][k], torch.zeros_like(d0["state"][k])) for k in moved)
    for name, value in d0["state"].items():
        assert torch.equal(f0["state"][name], value), name
        assert torch.equal(f1["state"][name], value), name
