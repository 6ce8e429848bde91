"""zoo.models.tokenizer: byte tokenizer, Hugging Face tokenizer.json, SentencePiece model, and load_tokenizer dispatch."""
from __future__ import annotations

import pytest

from zoo.models.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_unicode_and_drops_specials():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    text = "def f(x):\n    return 'héllo ✓'"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (259, 257, 258)
    assert isinstance(tok, Tokenizer)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel()
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    rust.train_from_iterator(["import os\nimport sys\n", "def main():\n    return 0\n"] * 20, trainer=trainer)
    rust.save(str(tmp_path / "tokenizer.json"))
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        ids = tok.encode("import sys")
        assert ids and tok.decode(ids).strip() == "import sys"
        assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.vocab_size == rust.get_vocab_size()


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=40,
                                   model_type="unigram", minloglevel=2)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 40
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_bad_specs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a b c")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")
