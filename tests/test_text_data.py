"""TextDataModule: corpus discovery, tokenise-once cache, split by document, windows, tokenizers, bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import zoo.data.text as text
from zoo.data.text import TextDataModule, find_documents, split_of


def make_corpus(root: Path, n: int = 12, size: int = 300) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = f"# doc {i:03d} marker-{i:03d}\n" + "".join(f"x{i}_{j} = {j}\n" for j in range(size // 10))
        (root / f"mod{i:02d}.py").write_text(body)
    return root


def dm_for(tmp_path: Path, **kw) -> TextDataModule:
    if "paths" not in kw:
        kw["paths"] = str(make_corpus(tmp_path / "corpus"))
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 4)
    kw.setdefault("val_fraction", 0.25)
    dm = TextDataModule(cache_dir=str(tmp_path / "cache"), progress=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_tokenise_once_windows_and_split_by_document(tmp_path):
    dm = dm_for(tmp_path)
    meta = dm.meta["splits"]
    assert meta["train"]["docs"] + meta["val"]["docs"] == 12
    assert meta["val"]["docs"] >= 1 and meta["train"]["docs"] >= 1
    # Byte tokenizer: one token per byte plus one EOS per document.
    for s in ("train", "val"):
        assert meta[s]["tokens"] == meta[s]["bytes"] + meta[s]["docs"]
        assert dm.bytes_per_token(s) == pytest.approx(meta[s]["bytes"] / meta[s]["tokens"])
    # A document's text lives in exactly one split.
    train_text = dm.tokenizer.decode(np.asarray(dm.train_set.tokens()).tolist())
    val_text = dm.tokenizer.decode(np.asarray(dm.val_set.tokens()).tolist())
    for i in range(12):
        marker = f"marker-{i:03d}"
        assert (marker in train_text) != (marker in val_text)
    # Windows: seq_len + 1 int64 tokens, consecutive windows share their boundary token.
    w0, w1 = dm.train_set[0], dm.train_set[1]
    assert w0.dtype == torch.int64 and w0.shape == (17,)
    assert w0[-1] == w1[0]
    assert len(dm.train_set) == (meta["train"]["tokens"] - 1) // 16
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 17)
    assert next(iter(dm.val_dataloader())).shape[1] == 17


def test_split_is_deterministic_and_stable_when_files_are_added(tmp_path):
    assert split_of("/a/b.py", 0.3, 0) == split_of("/a/b.py", 0.3, 0)
    paths = [f"/x/{i}.py" for i in range(2000)]
    val = [p for p in paths if split_of(p, 0.1, 0) == "val"]
    assert 150 < len(val) < 250  # ~10%
    # Seeds give different splits; the split of a path never depends on which other files exist.
    assert val != [p for p in paths if split_of(p, 0.1, 1) == "val"]


def test_cache_is_reused_and_keyed_by_options(tmp_path, monkeypatch):
    corpus = str(make_corpus(tmp_path / "corpus"))
    dm = dm_for(tmp_path, paths=corpus)
    first = dm.data_dir
    calls = []
    real = text.build_token_files
    monkeypatch.setattr(text, "build_token_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = dm_for(tmp_path, paths=corpus)
    assert again.data_dir == first and calls == []  # nothing re-tokenised
    capped = dm_for(tmp_path, paths=corpus, max_bytes=1500)
    assert capped.data_dir != first and calls == [1]
    total = sum(capped.meta["splits"][s]["bytes"] for s in ("train", "val"))
    assert total <= 1500
    make_corpus(tmp_path / "corpus")  # files rewritten (new mtimes): the cache must not be trusted
    assert dm_for(tmp_path, paths=corpus).data_dir != first


def test_tokenizer_json_and_sentencepiece(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(p) for p in sorted(corpus.glob("*.py"))],
              trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    dm = dm_for(tmp_path, paths=str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=8)
    assert dm.vocab_size == tok.get_vocab_size()
    assert dm.meta["eos_id"] == tok.token_to_id("</s>")
    assert dm.bytes_per_token("train") > 1.5  # words, not bytes
    assert int(dm.train_set[0].max()) < dm.vocab_size

    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus / "mod00.py"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, model_type="char", minloglevel=2)
    dm_sp = dm_for(tmp_path, paths=str(corpus), tokenizer=str(tmp_path / "sp.model"), seq_len=8)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert dm_sp.vocab_size == sp.get_piece_size() > 4
    assert dm_sp.meta["eos_id"] == sp.eos_id()
    assert dm_sp.data_dir not in (dm.data_dir,)


def test_stdlib_default_corpus_and_globs(tmp_path):
    files = find_documents(None)
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    dm = TextDataModule(max_bytes=30_000, seq_len=32, cache_dir=str(tmp_path), progress=False)
    dm.setup("fit")
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    corpus = make_corpus(tmp_path / "c2", n=3)
    assert len(find_documents(str(corpus / "mod0[01].py"))) == 2
    assert len(find_documents([str(corpus / "mod00.py"), str(corpus)])) == 3


def test_bad_inputs_name_the_value(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="text corpus is empty.*empty"):
        dm_for(tmp_path, paths=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nope"):
        dm_for(tmp_path, paths=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 100001"):
        dm_for(tmp_path, seq_len=100_000)
    with pytest.raises(ValueError, match="max_bytes"):
        TextDataModule(max_bytes=0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        dm_for(tmp_path, tokenizer=str(tmp_path / "missing.json"))
