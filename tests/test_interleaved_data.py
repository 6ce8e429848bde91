"""Interleaved image-text data: token layout, answer-only labels, held-out images, resume, bad input, answer accuracy."""
from __future__ import annotations

import shutil

import lightning.pytorch as pl
import pytest
import torch

from zoo.data import InterleavedDataModule
from zoo.data.interleaved import (IGNORE_INDEX, TASKS, ImageTokens, answer_accuracy, answer_budget,
                                  check_interleaved, encode_interleaved, image_tokens)
from zoo.models.tokenizer import ByteTokenizer
from zoo.train.trainer import UsageError

TPI = 3  # tokens per image in these tests


def small(**kw) -> InterleavedDataModule:
    """A datamodule small enough for the 2-core CI machine, set up."""
    args = dict(tokens_per_image=TPI, image_size=16, train_size=48, val_size=24, batch_size=8, seed=1)
    dm = InterleavedDataModule(**{**args, **kw})
    dm.setup()
    return dm


def test_image_ids_follow_the_text_vocabulary():
    dm = InterleavedDataModule()
    assert dm.image_tokens == ImageTokens(image=259, boi=260, eoi=261) == image_tokens(ByteTokenizer.vocab_size)
    assert dm.vocab_size == 262 and dm.pad_id == ByteTokenizer.pad_id


def test_batch_layout_answer_only_labels_and_image_order():
    dm = small()
    tok = dm.image_tokens
    batch = next(iter(dm.train_dataloader()))
    ids, labels, images = batch["input_ids"], batch["labels"], batch["images"]
    b, t = ids.shape
    assert b == 8 and labels.shape == (b, t) and images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
    assert torch.equal(batch["loss_mask"], labels != IGNORE_INDEX)
    assert int(batch["image_counts"].sum()) == images.shape[0] == batch["image_ids"].numel()
    check_interleaved(ids, images, tok, TPI, image_size=16)
    # no loss on image positions, BOI/EOI, or as a target an image token; none on the prompt either
    image_like = (ids == tok.image) | (ids == tok.boi) | (ids == tok.eoi)
    assert not batch["loss_mask"][image_like].any()
    assert not ((labels == tok.image) | (labels == tok.boi) | (labels == tok.eoi)).any()
    # the IMAGE positions, flattened row by row, are the images in order, tokens_per_image each
    runs = (ids == tok.image).nonzero()[::TPI]
    assert torch.equal(runs, batch["image_positions"])
    rows = batch["image_positions"][:, 0]
    assert torch.equal(torch.bincount(rows, minlength=b), batch["image_counts"])
    pool = dm.train_set.pool
    assert torch.equal(images, pool.images[batch["image_ids"]])  # each image is the pool image its id names
    byte = ByteTokenizer()
    start = 0
    for r in range(b):
        k = int(batch["image_counts"][r])
        names = [str(int(pool.labels[j])) for j in batch["image_ids"][start: start + k]]
        start += k
        answer = byte.decode(labels[r][labels[r] != IGNORE_INDEX].tolist())
        assert labels[r][labels[r] != IGNORE_INDEX][-1] == byte.eos_id  # the answer ends with EOS
        prompt = byte.decode(ids[r][: int(batch["loss_mask"][r].nonzero()[0]) + 1].tolist())
        task = TASKS[int(batch["task"][r])]
        if task == "caption":
            assert (prompt, answer) == (" this is a", f" {names[0]}")
        elif task == "sum":
            assert (prompt, answer) == (" +  =", f" {int(names[0]) + int(names[1])}")
        else:
            which = ("first", "second", "third").index(prompt.split()[-1].rstrip("?"))
            assert prompt.startswith("   which is the") and answer == f" {names[which]}" and k == 3


def test_seq_len_pads_to_a_fixed_shape_and_longest_is_reported():
    dm = small(seq_len=48)
    assert dm.max_length == max(len(dm.train_set.encode(i)[0]) - 1 for i in range(len(dm.train_set)))
    for batch in dm.val_dataloader():
        assert batch["input_ids"].shape[1] == 48
    with pytest.raises(UsageError, match=f"data.seq_len=10 is shorter than the longest sequence, {dm.max_length}"):
        small(seq_len=10)


def test_splits_are_by_image_and_seeded():
    dm = small()
    train_pool, val_pool = dm.train_set.pool, dm.val_set.pool
    assert len(train_pool) + len(val_pool) == 1797
    seen = torch.cat([b["image_ids"] for b in dm.train_dataloader()])
    assert int(seen.max()) < len(train_pool)
    # the held-out images never enter a training sequence: only val sequences draw from the val pool
    assert all(int(j) < len(val_pool) for b in dm.val_dataloader() for j in b["image_ids"])
    again = small()
    assert all((again.train_set.plan[k] == dm.train_set.plan[k]).all() for k in dm.train_set.plan)
    assert torch.equal(again.val_set.pool.images, val_pool.images)
    other = small(split_seed=1)
    assert not torch.equal(other.val_set.pool.images, val_pool.images)  # another split seed holds out other digits
    assert not (small(seed=2).train_set.plan["images"] == dm.train_set.plan["images"]).all()


def test_imagefolder_no_test_image_in_training_and_resized(tiny_imagefolder):
    dm = small(dataset=f"imagefolder:{tiny_imagefolder}", tasks=["caption", "question"])
    train_imgs = torch.cat([b["images"] for b in dm.train_dataloader()])
    val_imgs = torch.cat([b["images"] for b in dm.val_dataloader()])
    assert train_imgs.shape[1:] == (3, 16, 16)  # 40x40..60x40 JPEGs, resized and centre-cropped
    train_bytes = {bytes(x.numpy()) for x in train_imgs}
    assert not any(bytes(x.numpy()) in train_bytes for x in val_imgs)
    sample = dm.val_set[0]
    assert sample.answer.strip() in {"n01440764", "n01443537", "n01484850"}


def test_unreadable_image_drops_its_sequence_and_names_the_file(tiny_imagefolder):
    bad = tiny_imagefolder / "val" / "n01440764" / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    dm = small(dataset=f"imagefolder:{tiny_imagefolder}", tasks=["caption"], val_size=40)
    batches = list(dm.val_dataloader())
    skipped = [p for b in batches for p in b["skipped"]]
    assert skipped and set(skipped) == {str(bad)}
    assert sum(b["input_ids"].shape[0] for b in batches) + len(skipped) == 40
    for b in batches:
        check_interleaved(b["input_ids"], b["images"], dm.image_tokens, TPI, 16)


def test_task_mix_is_configurable():
    assert set(small(tasks={"sum": 1}).train_set.plan["task"].tolist()) == {TASKS.index("sum")}
    dm = small(tasks={"caption": 3, "question": 1, "sum": 0}, train_size=800)
    tasks = dm.train_set.plan["task"]
    assert TASKS.index("sum") not in tasks.tolist()
    assert abs((tasks == TASKS.index("caption")).mean() - 0.75) < 0.06
    assert set(small(tasks="caption, question").train_set.plan["task"].tolist()) == {0, 2}
    assert small(question_images=5, tasks=["question"]).train_set[0].images.shape[0] == 5


def test_exact_resume_inside_an_epoch():
    dm = small()
    ref = dm.train_dataloader()
    ref.load_state_dict({"epoch": 1, "batches": 0})
    epoch1 = [b["image_ids"] for b in ref]
    resumed = small().train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    rest = [b["image_ids"] for b in resumed]
    assert len(rest) == len(epoch1) - 2 and all(torch.equal(a, b) for a, b in zip(rest, epoch1[2:]))
    fresh = small().train_dataloader()
    assert not torch.equal(next(iter(fresh))["image_ids"], epoch1[0])  # epoch 0's order is another permutation


class Recorder(pl.LightningModule):
    """Trains nothing; records the images each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["image_ids"].tolist())
        return self.w * batch["images"].float().mean() + (batch["labels"] != IGNORE_INDEX).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint_resume_replays_the_remaining_batches(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root, ckpt=None) -> Recorder:
        module = Recorder()
        # a checkpoint after step 4 = batch 1 of epoch 1 (3 batches an epoch), written while training runs
        saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=4, save_top_k=-1)
        trainer = pl.Trainer(accelerator="cpu", max_steps=6, limit_train_batches=3, limit_val_batches=0,
                             logger=False, callbacks=[saver], enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(root))
        trainer.fit(module, small(), ckpt_path=ckpt)
        return module

    ref = fit(tmp_path / "ref")
    saved = torch.load(tmp_path / "ref" / "step=4.ckpt", weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "samples": 8, "global_batch": 8}]
    resumed = fit(tmp_path / "resumed", ckpt=str(tmp_path / "ref" / "step=4.ckpt"))
    assert len(ref.seen) == 6 and resumed.seen == ref.seen[4:]


def test_encode_interleaved_refuses_marker_image_mismatch():
    tok, ids = ByteTokenizer(), image_tokens(259)
    seq, n_prompt = encode_interleaved("<image> and <image>?", " yes", 2, tok, ids, 2)
    assert seq[:5] == [tok.bos_id, ids.boi, ids.image, ids.image, ids.eoi] and seq[n_prompt:] == [32, 121, 101, 115,
                                                                                                    tok.eos_id]
    with pytest.raises(ValueError, match="has 1 <image> marker\\(s\\) but 2 image\\(s\\)"):
        encode_interleaved("<image> alone", "x", 2, tok, ids, 2)
    with pytest.raises(ValueError, match="has 2 <image> marker\\(s\\) but 1 image\\(s\\)"):
        encode_interleaved("<image> <image>", "x", 1, tok, ids, 2)
    with pytest.raises(ValueError, match="answer '<image>' holds"):
        encode_interleaved("<image>", "<image>", 1, tok, ids, 2)


def test_check_interleaved_names_what_disagrees():
    tok = image_tokens(259)
    seq, _ = encode_interleaved("<image> + <image> =", " 3", 2, ByteTokenizer(), tok, TPI)
    ids = torch.tensor([seq])
    two = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    check_interleaved(ids, two, tok, TPI, 16)
    with pytest.raises(ValueError, match="2 image marker\\(s\\) \\(BOI id 260\\) but 3 image\\(s\\)"):
        check_interleaved(ids, torch.zeros(3, 3, 16, 16, dtype=torch.uint8), tok, TPI)  # more images than markers
    with pytest.raises(ValueError, match="2 image marker\\(s\\) \\(BOI id 260\\) but 1 image\\(s\\)"):
        check_interleaved(ids, two[:1], tok, TPI)  # a marker with no image
    with pytest.raises(ValueError, match="images are 16x16 but the encoder takes 32x32; set data.image_size=32"):
        check_interleaved(ids, two, tok, TPI, image_size=32)
    with pytest.raises(ValueError, match="tokens_per_image=4 = 8"):
        check_interleaved(ids, two, tok, 4)
    broken = ids.clone()
    broken[0, 1 + TPI + 1] = 65  # the first block's EOI overwritten
    with pytest.raises(ValueError, match="image block at row 0, position 1 is not BOI"):
        check_interleaved(broken, two, tok, TPI)
    with pytest.raises(ValueError, match="images must be \\[N, C, H, W\\], got shape \\(3, 16, 16\\)"):
        check_interleaved(ids, two[0], tok, TPI)


def test_bad_configuration_is_one_clear_line(tmp_path, tiny_imagefolder):
    with pytest.raises(UsageError, match="unknown task 'count' in data.tasks; choose from caption, sum, question"):
        InterleavedDataModule(tasks=["caption", "count"])
    with pytest.raises(UsageError, match="selects no task"):
        InterleavedDataModule(tasks={"caption": 0})
    with pytest.raises(UsageError, match="weight of 'sum' is -1"):
        InterleavedDataModule(tasks={"sum": -1})
    with pytest.raises(UsageError, match="data.question_images must be in \\[2, 10\\], got 11"):
        InterleavedDataModule(question_images=11)
    with pytest.raises(UsageError, match="data.tokens_per_image must be >= 1, got 0"):
        InterleavedDataModule(tokens_per_image=0)
    with pytest.raises(UsageError, match="data.batch_size 64 times 1 devices is larger than data.train_size=10"):
        InterleavedDataModule(train_size=10).setup()
    with pytest.raises(UsageError, match="task 'sum' needs integer class names but .* has class 'n01440764'"):
        small(dataset=f"imagefolder:{tiny_imagefolder}")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        small(dataset="mnist")
    with pytest.raises(ValueError, match="is 40x40 but the encoder takes 16x16; set data.resize=true"):
        small(dataset=f"imagefolder:{tiny_imagefolder}", tasks=["caption"], resize=False).train_set[0]


def test_empty_folders_are_named(tmp_path, tiny_imagefolder):
    (tmp_path / "bare" / "train").mkdir(parents=True)
    (tmp_path / "bare" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no class folders in {tmp_path / 'bare' / 'train'}"):
        small(dataset=f"imagefolder:{tmp_path / 'bare'}")
    empty = tiny_imagefolder / "train" / "n01443537"
    shutil.rmtree(empty)
    empty.mkdir()
    with pytest.raises(ValueError, match=f"empty class folder {empty}"):
        small(dataset=f"imagefolder:{tiny_imagefolder}", tasks=["caption"])


def test_numeric_imagefolder_supports_sum(tiny_imagefolder):
    for split in ("train", "val"):
        for k, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
            (tiny_imagefolder / split / wnid).rename(tiny_imagefolder / split / str(k))
    dm = small(dataset=f"imagefolder:{tiny_imagefolder}", tasks=["sum"])
    s = dm.val_set[0]
    labels = [dm.val_set.labels[j] for j in s.image_ids]
    assert s.answer == f" {sum(labels)}" and s.images.shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------------------ answer accuracy
def oracle(dm: InterleavedDataModule, tasks=TASKS):
    """A fake model that reads each digit off its pixels (a lookup into the pool), then answers like the data."""
    byte, pool = ByteTokenizer(), dm.val_set.pool
    label_of = {bytes(img.numpy()): int(y) for img, y in zip(pool.images, pool.labels)}

    def generate(input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        counts = (input_ids == dm.image_tokens.boi).sum(1).tolist()  # rows of one batch may differ in images
        out, start = [], 0
        for row, k in zip(input_ids, counts):
            digits = [label_of[bytes(x.numpy())] for x in images[start: start + k]]
            start += k
            text = byte.decode(row.tolist())
            if "this is a" in text:
                task, answer = "caption", digits[0]
            elif "+" in text:
                task, answer = "sum", digits[0] + digits[1]
            else:
                task, answer = "question", digits[("first", "second", "third").index(text.split()[-1][:-1])]
            answer = answer if task in tasks else "x"
            new = (byte.encode(f" {answer}") + [byte.eos_id] * 4)[:4]  # a fixed budget, as a batched generate has
            out.append(row.tolist() + new)
        return torch.tensor(out)

    return generate


def test_answer_accuracy_oracle_wrong_and_partial():
    dm = small(val_size=30)
    samples = [dm.val_set[i] for i in range(len(dm.val_set))]
    assert answer_budget(samples) == max(len(s.answer) for s in samples) + 1  # bytes of the answer and EOS
    report = answer_accuracy(oracle(dm), samples, batch_size=4)
    assert report["all"] == {"accuracy": 1.0, "correct": 30, "total": 30}
    assert set(report) == {"caption", "sum", "question", "all"}
    assert sum(report[t]["total"] for t in TASKS) == 30

    def wrong(input_ids, images):
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 3), ord("x"))], 1)

    assert answer_accuracy(wrong, samples)["all"]["accuracy"] == 0.0
    partial = answer_accuracy(oracle(dm, tasks=("caption",)), samples)
    assert partial["caption"]["accuracy"] == 1.0 and partial["sum"]["accuracy"] == 0.0
    assert partial["all"]["correct"] == partial["caption"]["total"]
    with pytest.raises(ValueError, match="must return the prompt followed by the new tokens"):
        answer_accuracy(lambda ids, images: ids[:, :2], samples)


def test_check_model_fits_counts_the_image_tokens():
    dm = small()
    dm.check_model_fits(vocab_size=262, max_seq_len=dm.max_length + 1)
    with pytest.raises(UsageError, match="vocab_size=259 has no room for the image tokens: the data needs 262"):
        dm.check_model_fits(vocab_size=259, max_seq_len=512)
    with pytest.raises(UsageError, match=f"longest sequence has {dm.max_length + 1} tokens with tokens_per_image=3 "
                                         f"but the model's max_seq_len={dm.max_length}"):
        dm.check_model_fits(vocab_size=262, max_seq_len=dm.max_length)
