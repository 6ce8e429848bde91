"""Interleaved image-text sequences for a multimodal decoder: digits (or any ImageFolder) in the token stream.

Token layout. The text tokenizer is left as it is; three ids are appended after its vocabulary (``image_tokens``):
``IMAGE = V``, ``BOI = V + 1`` (begin of image), ``EOI = V + 2`` (end of image), so the model's vocabulary must hold
``V + 3`` rows (``InterleavedDataModule.vocab_size``; 262 for the byte tokenizer: 259, 260, 261). Every ``<image>``
marker of a text is expanded *here*, by the data, to ``BOI, IMAGE x tokens_per_image, EOI``: sequences have their
final length before the model sees them (fixed shapes, positions and KV-cache sizes known up front), and the model
only overwrites the embeddings at the IMAGE positions with the projected encoder tokens::

    embeds[input_ids == IMAGE] = projector(encoder(images)).reshape(-1, d_model)

which is correct because images are listed in reading order (row by row, left to right within a row) and each
contributes ``tokens_per_image`` consecutive IMAGE positions. BOI/EOI keep ordinary learned embeddings.

Loss. A sequence is ``BOS, prompt, answer, EOS``; ``labels`` (already shifted: ``labels[:, t]`` is the target of the
logits at position ``t``, -100 where there is none) covers only the answer and its EOS. Never image positions, BOI
or EOI (nothing to predict there), and never the prompt: its text is a fixed template, so predicting it teaches the
model nothing about the images and would dilute the answer loss (the usual visual-instruction-tuning choice).

Batch (``collate_interleaved``): ``input_ids`` [B, T] and ``labels`` [B, T] (right-padded with the tokenizer's pad
id), ``loss_mask`` [B, T], ``images`` uint8 [N, 3, S, S] in reading order (normalised by the model on the device,
as the image datamodules leave augmentation and normalisation to the device), ``image_counts`` [B],
``image_positions`` [N, 2] (row, first IMAGE position), ``image_ids`` [N] (pool indices), ``task`` [B] (index into
``TASKS``) and ``skipped`` (files that could not be read; their sequences are dropped, as the image data does).

Tasks (each needs the image): ``caption`` (``<image> this is a`` -> `` 7``), ``sum`` (``<image> + <image> =`` ->
`` 12``, class names must be integers) and ``question`` (``<image> <image> <image> which is the second?`` -> `` 4``).
Held-out images: a sequence draws its images only from its split's pool (digits: a seeded stratified split by image,
``split_seed``; an ImageFolder: its ``train/`` and ``val/`` folders), so no validation image is in any training
sequence. Sequence ``i`` of a split is fixed by (``seed``, split, ``i``); the order comes from the shared resumable
loader, so a run resumed mid-epoch replays exactly the batches it had not trained on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zoo.data.images import build_dataset, digits_dataset
from zoo.data.loaders import resumable_loader
from zoo.models.tokenizer import load_tokenizer
from zoo.errors import UsageError

TASKS = ("caption", "sum", "question")
IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


@dataclass(frozen=True)
class ImageTokens:
    """The ids of the image placeholder, begin-of-image and end-of-image tokens."""

    image: int
    boi: int
    eoi: int

    @property
    def vocab_size(self) -> int:
        """Rows the model's embedding needs: the text vocabulary plus these three."""
        return self.eoi + 1


def image_tokens(text_vocab_size: int) -> ImageTokens:
    """The three image ids appended after a text vocabulary of ``text_vocab_size`` ids."""
    return ImageTokens(text_vocab_size, text_vocab_size + 1, text_vocab_size + 2)


@dataclass
class InterleavedSample:
    """One sequence: ``ids`` = BOS, prompt (markers expanded), answer, EOS; the first ``n_prompt`` are the prompt."""

    ids: list[int]
    n_prompt: int
    images: Tensor | None  # [k, 3, H, W] uint8; None when one of its files could not be read or decoded
    image_ids: list[int]  # indices into the split's image pool
    task: str
    answer: str
    skipped: list[str] = field(default_factory=list)

    @property
    def prompt_ids(self) -> list[int]:
        """What a model is given to answer."""
        return self.ids[: self.n_prompt]

    @property
    def answer_ids(self) -> list[int]:
        """What it should generate: the answer's tokens and EOS."""
        return self.ids[self.n_prompt:]


def encode_interleaved(prompt: str, answer: str, n_images: int, tokenizer: Any, tokens: ImageTokens,
                       tokens_per_image: int) -> tuple[list[int], int]:
    """(BOS, prompt with each ``<image>`` -> BOI, IMAGE x tokens_per_image, EOI, answer, EOS) and the prompt length."""
    parts = prompt.split(IMAGE_MARKER)
    if len(parts) - 1 != n_images:
        raise ValueError(f"prompt {prompt!r} has {len(parts) - 1} {IMAGE_MARKER} marker(s) but {n_images} image(s) "
                         f"were given; put exactly one {IMAGE_MARKER} where each image should stand")
    if IMAGE_MARKER in answer:
        raise ValueError(f"answer {answer!r} holds an {IMAGE_MARKER} marker; images belong in the prompt")
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    ids = [bos] if bos is not None else []
    block = [tokens.boi] + [tokens.image] * tokens_per_image + [tokens.eoi]
    for k, text in enumerate(parts):
        if k:
            ids += block
        ids += tokenizer.encode(text)
    n_prompt = len(ids)
    ids += tokenizer.encode(answer) + ([eos] if eos is not None else [])
    return ids, n_prompt


def check_interleaved(input_ids: Tensor, images: Tensor, tokens: ImageTokens, tokens_per_image: int,
                      image_size: int | None = None) -> None:
    """Raise a one-line ValueError unless every image block is BOI, IMAGE x tokens_per_image, EOI and images match."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n_img = images.shape[0]
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the encoder takes "
                         f"{image_size}x{image_size}; set data.image_size={image_size} or build the encoder for "
                         f"{images.shape[-2]}x{images.shape[-1]}")
    boi = (input_ids == tokens.boi).nonzero().tolist()
    if len(boi) != n_img:
        raise ValueError(f"the batch has {len(boi)} image marker(s) (BOI id {tokens.boi}) but {n_img} image(s); "
                         "each marker needs exactly one image and each image one marker")
    placeholders = int((input_ids == tokens.image).sum())
    if placeholders != n_img * tokens_per_image:
        raise ValueError(f"the batch has {placeholders} image placeholder tokens (id {tokens.image}) but "
                         f"{n_img} image(s) x tokens_per_image={tokens_per_image} = {n_img * tokens_per_image}; "
                         "build the data and the model with the same tokens_per_image")
    want = torch.tensor([tokens.image] * tokens_per_image + [tokens.eoi], device=input_ids.device)
    for row, pos in boi:
        got = input_ids[row, pos + 1: pos + 2 + tokens_per_image]
        if got.shape != want.shape or not bool((got == want).all()):
            raise ValueError(f"the image block at row {row}, position {pos} is not BOI, {tokens_per_image} x IMAGE, "
                             f"EOI (ids {input_ids[row, pos: pos + 2 + tokens_per_image].tolist()}); "
                             "expand each marker with encode_interleaved")


def fit_image(image: Tensor, size: int, resize: bool, where: str) -> Tensor:
    """``image`` as uint8 [3, size, size]: shorter side resized to ``size`` then centre-cropped, or refused."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    if not resize:  # a UsageError: zoo fit prints the one line (also when a loader worker raised it)
        raise UsageError(f"image {where} is {image.shape[-2]}x{image.shape[-1]} but the encoder takes {size}x{size}; "
                         "set data.resize=true or data.image_size to the images' size")
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top: top + size, left: left + size].round().clamp(0, 255).to(torch.uint8)


def plan_sequences(n: int, mix: dict[str, float], pool_size: int, question_images: int, seed: int,
                   split: str) -> dict[str, np.ndarray]:
    """Task, images (pool indices, -1 padded) and asked-about slot of each of ``n`` sequences, fixed by the seed."""
    rng = np.random.default_rng([seed, ("train", "val").index(split)])
    names = list(mix)
    p = np.asarray([mix[t] for t in names], dtype=np.float64)
    task = np.asarray([TASKS.index(t) for t in names])[rng.choice(len(names), size=n, p=p / p.sum())]
    images = rng.integers(0, pool_size, size=(n, question_images))
    slots = np.asarray([{"caption": 1, "sum": 2, "question": question_images}[TASKS[t]] for t in task])
    images[np.arange(question_images)[None, :] >= slots[:, None]] = -1
    which = rng.integers(0, question_images, size=n)
    which[task != TASKS.index("question")] = 0
    return {"task": task, "images": images, "which": which}


class InterleavedDataset(Dataset):
    """Sequences of one split, built on demand from its image pool and its plan (see ``plan_sequences``)."""

    def __init__(self, pool: Dataset, labels: Sequence[int], classes: Sequence[str], plan: dict[str, np.ndarray],
                 tokenizer: Any, tokens: ImageTokens, tokens_per_image: int, image_size: int,
                 resize: bool = True) -> None:
        self.pool, self.labels, self.classes, self.plan = pool, list(labels), list(classes), plan
        self.tokenizer, self.tokens, self.tokens_per_image = tokenizer, tokens, tokens_per_image
        self.image_size, self.resize = image_size, resize

    def __len__(self) -> int:
        return len(self.plan["task"])

    def text(self, i: int) -> tuple[str, str, str, list[int]]:
        """(task, prompt, answer, pool indices of its images) of sequence ``i``; no image is read."""
        task = TASKS[int(self.plan["task"][i])]
        idx = [int(j) for j in self.plan["images"][i] if j >= 0]
        names = [self.classes[self.labels[j]] for j in idx]
        if task == "caption":
            return task, f"{IMAGE_MARKER} this is a", f" {names[0]}", idx
        if task == "sum":
            return task, f"{IMAGE_MARKER} + {IMAGE_MARKER} =", f" {int(names[0]) + int(names[1])}", idx
        which = int(self.plan["which"][i])
        prompt = " ".join([IMAGE_MARKER] * len(idx)) + f" which is the {ORDINALS[which]}?"
        return task, prompt, f" {names[which]}", idx

    def encode(self, i: int) -> tuple[list[int], int]:
        """Token ids and prompt length of sequence ``i`` without reading its images."""
        _, prompt, answer, idx = self.text(i)
        return encode_interleaved(prompt, answer, len(idx), self.tokenizer, self.tokens, self.tokens_per_image)

    def __getitem__(self, i: int) -> InterleavedSample:
        task, prompt, answer, idx = self.text(i)
        ids, n_prompt = encode_interleaved(prompt, answer, len(idx), self.tokenizer, self.tokens,
                                           self.tokens_per_image)
        images, skipped = [], []
        for j in idx:
            item = self.pool[j]
            where = str(item[2]) if len(item) > 2 else f"{j} of the pool"
            if item[0] is None:  # unreadable or undecodable file: the sequence is dropped and the file named
                skipped.append(where)
                continue
            images.append(fit_image(item[0], self.image_size, self.resize, where))
        stacked = torch.stack(images) if not skipped else None
        return InterleavedSample(ids, n_prompt, stacked, idx, task, answer, skipped)


def collate_interleaved(samples: list[InterleavedSample], tokens: ImageTokens, pad_id: int,
                        seq_len: int | None = None) -> dict[str, Any]:
    """Pad samples into the batch the multimodal model trains on; samples with an unreadable image are dropped."""
    skipped = [p for s in samples for p in s.skipped]
    kept = [s for s in samples if s.images is not None]
    width = seq_len if seq_len is not None else max((len(s.ids) - 1 for s in kept), default=0)
    input_ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(kept):
        n = len(s.ids) - 1  # inputs are ids[:-1], targets ids[1:]
        if n > width:
            raise ValueError(f"a {s.task} sequence has {n} tokens (image tokens included) but data.seq_len={width}; "
                             "raise seq_len or lower tokens_per_image / question_images")
        ids = torch.tensor(s.ids, dtype=torch.long)
        input_ids[r, :n] = ids[:-1]
        labels[r, s.n_prompt - 1: n] = ids[s.n_prompt:]  # the answer and its EOS, nothing else
    boi = (input_ids == tokens.boi).nonzero()  # row-major: the order of ``images``
    shape = kept[0].images.shape[1:] if kept else (3, 0, 0)
    return {
        "input_ids": input_ids,  # [B, T] with BOI, IMAGE x tokens_per_image, EOI where each image stands
        "labels": labels,  # [B, T] target of the logits at t (already shifted), IGNORE_INDEX where no loss
        "loss_mask": labels != IGNORE_INDEX,  # [B, T] bool
        "images": torch.cat([s.images for s in kept]) if kept else torch.empty((0, *shape), dtype=torch.uint8),
        "image_counts": torch.tensor([len(s.image_ids) for s in kept], dtype=torch.long),  # [B]
        "image_positions": boi + torch.tensor([0, 1]),  # [N, 2]: (row, first IMAGE position) of each image
        "image_ids": torch.tensor([j for s in kept for j in s.image_ids], dtype=torch.long),  # [N] pool indices
        "task": torch.tensor([TASKS.index(s.task) for s in kept], dtype=torch.long),  # [B] index into TASKS
        "skipped": skipped,  # files that could not be read or decoded (their sequences were dropped)
    }


def parse_tasks(tasks: dict[str, float] | Sequence[str] | str | None) -> dict[str, float]:
    """The task mix as {name: weight}: None -> all tasks equally, names (list or comma-separated) -> equal weights."""
    if tasks is None:
        tasks = list(TASKS)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    mix = dict(tasks) if isinstance(tasks, dict) else {t: 1.0 for t in tasks}
    unknown = [t for t in mix if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r} in data.tasks; choose from {', '.join(TASKS)}")
    bad = [t for t, w in mix.items() if not (float(w) >= 0 and np.isfinite(float(w)))]
    if bad:
        raise UsageError(f"data.tasks weight of {bad[0]!r} is {mix[bad[0]]}; weights must be finite and >= 0")
    mix = {t: float(w) for t, w in mix.items() if float(w) > 0}
    if not mix:
        raise UsageError(f"data.tasks {tasks!r} selects no task; give at least one of {', '.join(TASKS)} a "
                         "positive weight")
    return mix


class InterleavedDataModule(pl.LightningDataModule):
    """Interleaved image-text sequences (caption, sum, question) for a multimodal decoder.

    Args:
        dataset: ``digits`` (embedded), ``imagefolder:<root>`` (``train/`` and ``val/`` class folders) or
            ``cifar10:<dir>`` / ``cifar100:<dir>``.
        tasks: the mix: ``{"caption": 2, "sum": 1}``, a list of names (equal weights) or None (all three).
        tokens_per_image: IMAGE placeholder positions per image (what the projector must output).
        image_size: the encoder's input side; digits are rendered at it, other images resized (``resize``).
        question_images: images in a ``question`` sequence (2..10).
        train_size / val_size: sequences per split (an epoch of training is ``train_size`` sequences).
        seq_len: pad every batch to this length (None: to the batch's longest); longer sequences are refused.
        tokenizer: ``byte`` or a tokenizer file / folder (``zoo.models.tokenizer.load_tokenizer``).
        batch_size: sequences per device and step.
        num_workers: loader worker processes.
        resize: resize images of another size to ``image_size`` (False: refuse them).
        seed: which sequences are drawn and their order; split_seed: which digits are held out.
    """

    def __init__(self, dataset: str = "digits", tasks: dict[str, float] | list[str] | str | None = None,
                 tokens_per_image: int = 4, image_size: int = 32, question_images: int = 3,
                 train_size: int = 10_000, val_size: int = 1_000, seq_len: int | None = None,
                 tokenizer: str = "byte", batch_size: int = 64, num_workers: int = 0, resize: bool = True,
                 seed: int = 0, split_seed: int = 0) -> None:
        super().__init__()
        for name, value, low in (("tokens_per_image", tokens_per_image, 1), ("image_size", image_size, 1),
                                 ("train_size", train_size, 1), ("val_size", val_size, 1),
                                 ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if value < low:
                raise UsageError(f"data.{name} must be >= {low}, got {value}")
        if not 2 <= question_images <= len(ORDINALS):
            raise UsageError(f"data.question_images must be in [2, {len(ORDINALS)}], got {question_images}")
        if seq_len is not None and seq_len < 1:
            raise UsageError(f"data.seq_len must be >= 1 or null, got {seq_len}")
        self.mix = parse_tasks(tasks)
        self.dataset, self.tokens_per_image, self.image_size = dataset, tokens_per_image, image_size
        self.question_images, self.train_size, self.val_size = question_images, train_size, val_size
        self.seq_len, self.tokenizer_spec, self.batch_size = seq_len, tokenizer, batch_size
        self.num_workers, self.resize, self.seed, self.split_seed = num_workers, resize, seed, split_seed
        self._tokenizer: Any = None
        self.train_set: InterleavedDataset | None = None
        self.val_set: InterleavedDataset | None = None
        self.max_length: int | None = None  # longest model input of either split (set by setup)

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def image_tokens(self) -> ImageTokens:
        """The IMAGE / BOI / EOI ids, right after the tokenizer's vocabulary."""
        return image_tokens(int(self.tokenizer.vocab_size))

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: the tokenizer's vocabulary plus the three image ids."""
        return self.image_tokens.vocab_size

    @property
    def pad_id(self) -> int:
        """Id written into padding (never a target): the tokenizer's pad, else its EOS, else 0."""
        for name in ("pad_id", "eos_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0

    def check_model_fits(self, vocab_size: int, max_seq_len: int) -> None:
        """Raise a one-line UsageError when a model's vocabulary or maximum length cannot take these sequences."""
        if vocab_size < self.vocab_size:
            raise UsageError(f"the model's vocab_size={vocab_size} has no room for the image tokens: the data needs "
                             f"{self.vocab_size} (tokenizer {self.tokenizer_spec!r} plus IMAGE, BOI, EOI); set "
                             f"model_overrides: {{vocab_size: {self.vocab_size}}}")
        if self.max_length is None:
            self.setup()
        if self.max_length + 1 > max_seq_len:  # + 1: generating the answer's EOS needs one more position
            raise UsageError(f"the longest sequence has {self.max_length + 1} tokens with tokens_per_image="
                             f"{self.tokens_per_image} but the model's max_seq_len={max_seq_len}; set model_overrides: "
                             f"{{max_seq_len: {self.max_length + 1}}} or lower tokens_per_image / question_images")

    def check_data(self) -> None:
        """Load the tokenizer and open both image splits now (``ZooTrainer.fit`` calls this before creating any
        output folder): a missing dataset folder or tokenizer is one ``UsageError`` line naming its key."""
        try:
            self.tokenizer
        except (OSError, ValueError) as err:
            raise UsageError(f"data.tokenizer={self.tokenizer_spec!r} cannot be loaded: {err}") from None
        for split in ("train", "val"):
            try:
                classes = self._pool(split)[2]
            except (OSError, ValueError) as err:
                raise UsageError(f"data.dataset={self.dataset!r} cannot be read: {err}") from None
            self._check_classes(classes)

    def _check_classes(self, classes: Sequence[str]) -> None:
        # ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() refuses or the answer would not spell
        if "sum" in self.mix:
            words = [c for c in classes if not re.fullmatch(r"-?[0-9]+", c)]
            if words:
                raise UsageError(f"task 'sum' needs integer class names but {self.dataset!r} has class {words[0]!r} "
                                 "(ASCII digits such as 7 or -2 only); drop 'sum' from data.tasks or name the class "
                                 "folders by number")

    def _pool(self, split: str) -> tuple[Dataset, list[int], list[str]]:
        if self.dataset == "digits":
            ds = digits_dataset(split, size=self.image_size, seed=self.split_seed)
        else:
            ds = build_dataset(self.dataset, split, decode="worker", image_size=self.image_size)
        labels = ds.labels.tolist() if hasattr(ds, "labels") else [y for _, y in ds.samples]
        return ds, labels, list(ds.classes)

    def _build(self, split: str, size: int) -> InterleavedDataset:
        pool, labels, classes = self._pool(split)
        self._check_classes(classes)
        plan = plan_sequences(size, self.mix, len(pool), self.question_images, self.seed, split)
        return InterleavedDataset(pool, labels, classes, plan, self.tokenizer, self.image_tokens,
                                  self.tokens_per_image, self.image_size, self.resize)

    def setup(self, stage: str | None = None) -> None:
        """Build both splits (once), then check lengths and the batch against the device count."""
        if self.train_set is None:
            self.train_set = self._build("train", self.train_size)
            self.val_set = self._build("val", self.val_size)
            self.max_length = max(len(ds.encode(i)[0]) - 1 for ds in (self.train_set, self.val_set)
                                  for i in range(len(ds)))
        if self.seq_len is not None and self.max_length > self.seq_len:
            raise UsageError(f"data.seq_len={self.seq_len} is shorter than the longest sequence, {self.max_length} "
                             f"tokens with tokens_per_image={self.tokens_per_image}; raise seq_len to "
                             f"{self.max_length} or lower tokens_per_image / question_images")
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.train_size < self.batch_size * world:
            raise UsageError(f"data.batch_size {self.batch_size} times {world} devices is larger than "
                             f"data.train_size={self.train_size} sequences; lower it")

    def _loader(self, ds: InterleavedDataset | None, train: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        collate = partial(collate_interleaved, tokens=self.image_tokens, pad_id=self.pad_id, seq_len=self.seq_len)
        return resumable_loader(self, ds, self.batch_size, train, self.seed, drop_last=train,
                                num_workers=self.num_workers, collate_fn=collate,
                                pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches of training sequences (training images only)."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation sequences in order (held-out images only)."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out sequences (the same as validation)."""
        return self._loader(self.val_set, train=False)


def answer_budget(samples: Iterable[InterleavedSample]) -> int:
    """New tokens a generator must produce to be judged on every sample (longest answer plus EOS)."""
    return max((len(s.answer_ids) for s in samples), default=0)


def answer_accuracy(generate: Callable[[Tensor, Tensor], Tensor], samples: Iterable[InterleavedSample],
                    batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Exact-match answer accuracy per task and over ``all`` of greedy ``generate(input_ids, images)``.

    ``generate`` gets prompts [B, T] (equal-length prompts are batched, so no padding) and their images [N, C, H, W]
    in reading order, and returns the prompt followed by the new tokens [B, T + L], as ``Transformer.generate`` does;
    it should produce ``answer_budget(samples)`` tokens. Inputs come on the CPU (move them to the model's device inside
    ``generate``). A sample counts as correct when its first new tokens are its
    answer and EOS; samples whose images could not be read are left out.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, list[InterleavedSample]] = {}
    for s in samples:
        if s.images is not None:
            groups.setdefault(s.n_prompt, []).append(s)
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for n_prompt, group in sorted(groups.items()):
        for k in range(0, len(group), batch_size):
            chunk = group[k: k + batch_size]
            prompts = torch.tensor([s.prompt_ids for s in chunk], dtype=torch.long)
            out = torch.as_tensor(generate(prompts, torch.cat([s.images for s in chunk])))
            if out.dim() != 2 or out.shape[0] != len(chunk) or out.shape[1] < n_prompt or \
                    not torch.equal(out[:, :n_prompt].cpu().long(), prompts):
                raise ValueError(f"generate returned shape {tuple(out.shape)} for prompts of shape "
                                 f"{tuple(prompts.shape)}; it must return the prompt followed by the new tokens")
            new = out[:, n_prompt:].cpu().tolist()
            for s, got in zip(chunk, new):
                want = s.answer_ids
                total[s.task] = total.get(s.task, 0) + 1
                correct[s.task] = correct.get(s.task, 0) + int(got[: len(want)] == want)
    report = {t: {"accuracy": correct[t] / total[t], "correct": correct[t], "total": total[t]}
              for t in TASKS if t in total}
    n = sum(total.values())
    report["all"] = {"accuracy": sum(correct.values()) / n if n else float("nan"), "correct": sum(correct.values()),
                     "total": n}
    return report
