"""Multimodal decoder and lm.MultimodalLM: shapes, image placement, text-only loss, cached generation, encoder
switches, FLOPs, bad input, exact resume, DDP, and the checkpoint read back by zoo.load_backbone / zoo.load_lm."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import zoo
from lm import MultimodalLM
from zoo.data.interleaved import IGNORE_INDEX, InterleavedDataModule
from zoo.models.multimodal import ImageProjector, MultimodalDecoder
from zoo.train.trainer import UsageError

# A decoder small enough for a few CPU steps per test; the encoder is the tiny CNN (4x4 grid at 32 px).
DEC = {"n_layers": 2, "d_model": 64, "d_ff": 128, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "window": 16,
       "max_seq_len": 64}
ENC = {"widths": [8, 16, 16, 32]}
OVERRIDES = {"decoder_overrides": DEC, "encoder_overrides": ENC}


def tiny(**kw) -> MultimodalDecoder:
    torch.manual_seed(0)
    return zoo.create("vlm-digits-tiny", **{**OVERRIDES, **kw})


def data(**kw) -> InterleavedDataModule:
    dm = InterleavedDataModule(**{"train_size": 32, "val_size": 12, "batch_size": 4, **kw})
    dm.setup()
    return dm


def batch_of(dm: InterleavedDataModule, n: int = 0) -> dict:
    for i, b in enumerate(dm.train_dataloader()):
        if i == n:
            return b
    raise IndexError(n)


def trainer(root: Path, steps: int, **kw) -> pl.Trainer:
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                      log_every_n_steps=1, **kw)


def module(**kw) -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM(**{"model": "vlm-digits-tiny", "model_overrides": OVERRIDES, "lr": 3e-3, "warmup_steps": 1,
                           "total_steps": 20, "eval_samples": 8, **kw})


# -- the model ---------------------------------------------------------------------------------------------------
def test_shapes_vocab_and_registry():
    m, dm = tiny(), data()
    assert "vlm-digits-tiny" in zoo.available() and "vlm-digits-tiny-routed" in zoo.available()
    assert m.config.vocab_size == 259 + 3 == dm.vocab_size
    assert (m.image_id, m.boi_id, m.eoi_id) == (dm.image_tokens.image, dm.image_tokens.boi, dm.image_tokens.eoi)
    assert m.grid == (4, 4) and m.tokens_per_image == 4
    b = batch_of(dm)
    assert m.encode_images(b["images"]).shape == (b["images"].shape[0], 4, 64)
    assert m(b["input_ids"], b["images"]).shape == (*b["input_ids"].shape, 262)
    assert tiny(tokens_per_image=None).tokens_per_image == 16  # the whole grid
    meta = zoo.create("vlm-digits-tiny", device="meta", **OVERRIDES)
    assert meta.grid == (4, 4) and next(meta.parameters()).is_meta


def test_pooling_is_the_mean_of_each_grid_quadrant():
    m = tiny()
    tokens = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 3)  # grid row-major 0..15
    pooled = m.pool(tokens)[0, :, 0]
    # 2x2 pooling of a 4x4 grid: quadrant means
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]


def test_image_tokens_replace_image_positions_in_reading_order():
    m, dm = tiny(), data(tasks=["question"])
    b = batch_of(dm)
    ids, images = b["input_ids"], b["images"]
    m.eval()
    embeds = m.embed_inputs(ids, images)
    img = m.encode_images(images)
    mask = ids == m.image_id
    assert torch.equal(embeds[mask], img.reshape(-1, img.shape[-1]))
    assert torch.equal(embeds[~mask], m.decoder.embed(ids)[~mask])
    for k, (row, pos) in enumerate(b["image_positions"].tolist()):
        assert torch.equal(embeds[row, pos: pos + 4], img[k])  # image k sits at its marker


def test_cached_generation_matches_uncached_dense_and_routed():
    dm = data(tasks=["question", "sum"])
    samples = [dm.val_set[i] for i in range(4)]
    for name in ("vlm-digits-tiny", "vlm-digits-tiny-routed"):
        torch.manual_seed(1)
        m = zoo.create(name, **OVERRIDES).eval()
        for s in samples:
            prompt = torch.tensor([s.prompt_ids])
            cached = m.generate(prompt, s.images, 6, use_cache=True)
            plain = m.generate(prompt, s.images, 6, use_cache=False)
            assert torch.equal(cached, plain), name
            assert (cached[:, prompt.shape[1]:] < m.text_vocab_size).all()  # image ids are never generated
        # image tokens enter the cache once: the next-token logits after the prefill equal the full forward's
        s = samples[0]
        ids = torch.tensor([s.ids[:-1]])
        full = m(ids, s.images)
        cache = m.new_cache(1, ids.shape[1])
        n = s.n_prompt
        m(ids[:, :n], s.images, kv_cache=cache)
        step = m(ids[:, n:n + 1], None, kv_cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, n], atol=1e-5, rtol=1e-5)


def test_encoder_switches_frozen_last_full():
    dm = data()
    b = batch_of(dm)
    for mode, trained in (("frozen", set()), ("last", {"features.9.weight", "features.10.weight",
                                                       "features.10.bias"}), ("full", None)):
        m = tiny(train_encoder=mode).train()
        bn_before = m.encoder.features[1].running_mean.clone()
        m(b["input_ids"], b["images"]).sum().backward()
        got = {n for n, p in m.encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if trained is None:
            assert got == {n for n, _ in m.encoder.named_parameters()}
        else:
            assert got == trained, mode
        first_bn_moved = not torch.equal(bn_before, m.encoder.features[1].running_mean)
        assert first_bn_moved == (mode == "full")  # frozen layers keep their batch-norm statistics
        assert m.projector.net[0].weight.grad is not None


def test_image_flops_counted_per_encoder_switch():
    f = tiny().image_flops()
    assert f["encoder"] > 0 and f["projector"] == 2 * (32 * 64 + 64 * 64) * 4  # two matmuls per token, 4 tokens
    frozen = tiny(train_encoder="frozen").training_flops_per_image()
    last = tiny(train_encoder="last").training_flops_per_image()
    full = tiny(train_encoder="full").training_flops_per_image()
    assert frozen == pytest.approx(f["encoder"] + 3 * f["projector"])
    assert full == pytest.approx(3 * f["encoder"] + 3 * f["projector"])
    assert frozen < last < full


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input_is_one_clear_line():
    m, dm = tiny(), data()
    b = batch_of(dm)
    with pytest.raises(ValueError, match=r"image placeholder tokens .* but 0 image"):
        m(b["input_ids"], None)  # markers without images
    extra = torch.cat([b["images"], b["images"][:1]])
    with pytest.raises(ValueError, match=r"image\(s\) x tokens_per_image=4"):
        m(b["input_ids"], extra)  # more images than markers
    with pytest.raises(ValueError, match="images are 16x16 but the encoder takes 32x32"):
        m.encode_images(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="32-wide feature tokens but the projector was built for 48"):
        ImageProjector(48, 64)(torch.zeros(1, 4, 32))
    m.encoder = zoo.create("convnet_tiny", widths=[8, 16, 16, 48])  # an encoder the projector was not built for
    with pytest.raises(ValueError, match="48-wide feature tokens but the projector was built for 32"):
        m(b["input_ids"], b["images"])
    with pytest.raises(ValueError, match="tokens_per_image=5 does not fit"):
        tiny(tokens_per_image=5)
    with pytest.raises(ValueError, match="train_encoder='half'"):
        tiny(train_encoder="half")


def test_module_refuses_data_that_does_not_fit_before_training():
    dm = data()
    with pytest.raises(UsageError, match="data.tokens_per_image=9 but model"):
        module().check_data(data(tokens_per_image=9))
    with pytest.raises(UsageError, match="data.image_size=16"):
        module().check_data(data(image_size=16))
    bigger = module(model_overrides={**OVERRIDES, "decoder_overrides": {**DEC, "vocab_size": 300}})
    with pytest.raises(UsageError, match="the data's IMAGE id is 259"):
        bigger.check_data(dm)
    short = module(model_overrides={**OVERRIDES, "decoder_overrides": {**DEC, "max_seq_len": 16}})
    with pytest.raises(UsageError, match="max_seq_len=16"):
        short.check_data(dm)
    with pytest.raises(UsageError, match="not a multimodal decoder"):
        MultimodalLM(model="gemma2-tiny")
    with pytest.raises(UsageError, match="nan_policy"):
        module(nan_policy="ignore")


# -- training ----------------------------------------------------------------------------------------------------
def test_loss_only_on_text_targets_never_image_positions():
    lit, dm = module(), data()
    lit.configure_model()
    b = batch_of(dm)
    out, nll, mask = lit.text_nll(b)
    out.logits.retain_grad()
    nll.sum().backward()
    has_grad = out.logits.grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, mask)  # the loss reads exactly the target positions
    image_like = b["input_ids"] >= lit.model.image_id  # IMAGE, BOI, EOI
    assert image_like.any() and not (mask & image_like).any()
    assert torch.equal(mask, b["labels"] != IGNORE_INDEX)
    loss = lit.training_step(b, 0)
    torch.testing.assert_close(loss, nll[mask].mean())


def test_trains_logs_answer_accuracy_and_mfu(tmp_path):
    lit, dm = module(peak_flops=1e12, throughput_every=2), data()
    lit.configure_model()
    frozen = {k: v.clone() for k, v in lit.model.encoder.state_dict().items()}
    t = trainer(tmp_path, 6, limit_val_batches=2, val_check_interval=3)
    t.fit(lit, dm)
    for k, v in lit.model.encoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # a frozen encoder: weights and batch-norm statistics untouched
    m = t.callback_metrics
    for key in ("val/loss", "val/answer_acc", "val/answer_acc_caption", "val/answer_acc_sum", "perf/mfu"):
        assert key in m, key
    assert 0.0 <= float(m["val/answer_acc"]) <= 1.0
    # MFU counts the encoder and projector: more FLOPs per step than the decoder alone would give
    assert lit._flops_per_token > 0 and lit.model.training_flops_per_image() > 0


def test_nan_policy_stop_and_skip(tmp_path):
    dm = data()
    lit = module()
    lit.configure_model()
    with torch.no_grad():
        lit.model.projector.net[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer(tmp_path, 1).fit(lit, dm)
    lit = module(nan_policy="skip")
    lit.configure_model()
    with torch.no_grad():
        lit.model.projector.net[0].weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in lit.model.decoder.state_dict().items()}
    trainer(tmp_path, 2).fit(lit, dm)
    assert lit.nonfinite_steps == 2
    for k, v in lit.model.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # skipped steps change nothing


def test_exact_resume_mid_epoch(tmp_path):
    def fit(root: Path, ckpt: str | None = None) -> MultimodalLM:
        lit = module()
        saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
        t = trainer(root, 5, enable_checkpointing=True, callbacks=[saver], limit_train_batches=4)
        t.fit(lit, data(train_size=16), ckpt_path=ckpt)
        return lit

    ref = fit(tmp_path / "ref")
    resumed = fit(tmp_path / "resumed", str(tmp_path / "ref" / "step=3.ckpt"))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_read_by_load_backbone_and_load_lm(tmp_path):
    lit, dm = module(model_overrides={**OVERRIDES, "train_encoder": "full"}), data()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[saver]).fit(lit, dm)
    path = tmp_path / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["zoo"]["kind"] == "lm" and ckpt["zoo"]["image_encoder"]["encoders"] == {"online": "model.encoder."}
    enc = zoo.load_backbone(path)
    for k, v in lit.model.encoder.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    assert enc.zoo_arch == "convnet_tiny"
    full = zoo.load_lm(str(path))
    assert isinstance(full, MultimodalDecoder)
    b = batch_of(dm)
    lit.model.eval()
    torch.testing.assert_close(full(b["input_ids"], b["images"]), lit.model(b["input_ids"], b["images"]))


def test_encoder_weights_from_a_backbone_file(tmp_path):
    from zoo.weights import EXPORT_FORMAT
    from zoo.weights.safe_load import write_safetensors

    def export(widths: list[int], name: str) -> tuple[torch.nn.Module, str]:
        enc = zoo.create("convnet_tiny", widths=widths)
        meta = {"format": EXPORT_FORMAT, "arch": "convnet_tiny", "arch_overrides": {"widths": widths}}
        return enc, str(write_safetensors(tmp_path / name, enc.state_dict(), meta))

    src, path = export([8, 16, 16, 32], "enc.safetensors")
    lit = module(encoder_weights=path)
    lit.configure_model()
    for k, v in src.state_dict().items():
        assert torch.equal(lit.model.encoder.state_dict()[k], v), k
    _, wide = export([8, 16, 16, 48], "wide.safetensors")
    with pytest.raises(UsageError, match="48-wide features but the projector"):
        module(encoder_weights=wide).configure_model()


class DumpState(pl.Callback):
    """Each rank writes its final state dict to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, module) -> None:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow  # two spawned processes: about a minute on 2 CPU cores
def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    def run(folder: Path, devices: int, batch: int) -> None:
        folder.mkdir()
        pl.seed_everything(0)
        t = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                       max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False, limit_val_batches=0, callbacks=[DumpState(str(folder))])
        t.fit(module(), InterleavedDataModule(train_size=32, val_size=8, batch_size=batch))

    run(tmp_path / "one", 1, 8)
    run(tmp_path / "two", 2, 4)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, ref in one.items():
        # the loss is the global token mean: unequal answer lengths per rank still give the single-process gradient
        torch.testing.assert_close(r0[k], ref, atol=1e-5, rtol=0, msg=k)
        assert torch.equal(r0[k], r1[k]), k


# -- multimodal needle -------------------------------------------------------------------------------------------
def test_image_needle_oracle_chance_model_and_report(tmp_path):
    import re

    from lm.evals.needle_image import image_needle, image_needle_for_model, needle_prompt, write_image_needle_report

    dm = data(val_size=8)
    pool, labels, classes = dm.val_set.pool, dm.val_set.labels, dm.val_set.classes
    label_of = {pool[i][0].numpy().tobytes(): classes[labels[i]] for i in range(len(pool))}
    tok = dm.tokenizer
    asked: list[tuple[int, int]] = []

    def oracle(prompts, images, new):
        k = images.shape[0] // prompts.shape[0]
        rows = []
        for b, p in enumerate(prompts.tolist()):
            text = tok.decode([t for t in p if t < tok.vocab_size])
            j = int(re.search(r"which digit is image (\d+)\?", text).group(1))
            asked.append((k, j))
            answer = tok.encode(" " + label_of[images[b * k + j - 1].numpy().tobytes()])
            rows.append(p + answer + [tok.eos_id] * (new - len(answer)))
        return torch.tensor(rows)

    rows = image_needle(oracle, dm, counts=[1, 3, 5], depths=[0.0, 0.5, 1.0], trials=3)
    assert [r["accuracy"] for r in rows] == [1.0] * 9
    assert {(r["images"], r["depth"], r["asked"]) for r in rows} >= {(5, 0.0, 1), (5, 0.5, 3), (5, 1.0, 5)}
    assert (5, 3) in asked and rows[-1]["length"] > rows[0]["length"]  # more images, a longer context
    assert needle_prompt(2, 1).count("<image>") == 2
    wrong = image_needle(lambda p, i, n: torch.cat([p, torch.full((p.shape[0], n), 1)], 1), dm, [2], [0.5], trials=2)
    assert wrong[0]["accuracy"] == 0.0
    paths = write_image_needle_report(rows, tmp_path / "needle")
    assert "| 50% | 100% | 100% | 100% |" in paths["md"].read_text() and paths["png"].stat().st_size > 0
    model = tiny()  # the real generator runs end to end on the model's length budget
    got = image_needle_for_model(model, dm, counts=[2], depths=[1.0], trials=2)
    assert got[0]["trials"] == 2 and 0.0 <= got[0]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="max_seq_len=64"):
        image_needle_for_model(model, dm, counts=[20], depths=[0.0], trials=1)


def test_zoo_eval_needle_modality_image_writes_the_grid_and_refuses_a_text_model(tmp_path, capsys):
    import json

    from lm.cli.evals import main as eval_main

    out = tmp_path / "needle"
    assert eval_main(["needle", "--model", "vlm-digits-tiny", "--modality", "image", "--images", "2,3",
                      "--depths", "0,1", "--trials", "2", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["modality"] == "image" and line["cells"] == 4 and 0.0 <= line["accuracy"] <= 1.0
    assert {p.name for p in out.iterdir()} == {"needle_image.csv", "needle_image.md", "needle_image.png"}
    assert eval_main(["needle", "--model", "gemma2-tiny", "--modality", "image", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "text-only language model" in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
