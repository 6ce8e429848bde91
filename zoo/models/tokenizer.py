"""Tokenizers behind one small interface: encode(str) -> list[int], decode(list[int]) -> str, vocab_size, bos_id,
eos_id.

- ``ByteTokenizer``: UTF-8 bytes 0..255 plus pad/bos/eos (no files; the default).
- ``HFTokenizer``: a Hugging Face ``tokenizer.json`` through the ``tokenizers`` package.
- ``SentencePieceTokenizer``: a SentencePiece ``tokenizer.model`` (Gemma, Gopher-style vocabularies).
``load_tokenizer(spec)`` picks one from ``None``/``"byte"``, a file path, or a folder holding one of those files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data modules and generation code rely on."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no special tokens added)."""

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens dropped)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; pad = 256, bos = 257, eos = 258 (vocab_size 259)."""

    pad_id, bos_id, eos_id, vocab_size = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of text."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Names special tokens commonly carry, used when no tokenizer_config.json says which ones are bos/eos.
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "[BOS]")
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "[EOS]")


class HFTokenizer:
    """A Hugging Face fast-tokenizer file (``tokenizer.json``)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} not found; pass a tokenizer.json path or 'byte'")
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as err:  # the Rust error text is cryptic; say which file and what it should be
            raise ValueError(f"{self.path} is not a valid Hugging Face tokenizer.json: {err}") from err
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(("bos_token",), _BOS_NAMES)
        self.eos_id = self._special(("eos_token",), _EOS_NAMES)

    def _special(self, config_keys: tuple[str, ...], names: tuple[str, ...]) -> int | None:
        cfg_file = self.path.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            for key in config_keys:
                tok = cfg.get(key)
                tok = tok.get("content") if isinstance(tok, dict) else tok
                if isinstance(tok, str) and self._tok.token_to_id(tok) is not None:
                    return self._tok.token_to_id(tok)
        for name in names:
            if self._tok.token_to_id(name) is not None:
                return self._tok.token_to_id(name)
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece model file (``tokenizer.model``)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.path} not found; pass a tokenizer.model path or 'byte'")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except Exception as err:
            raise ValueError(f"{self.path} is not a valid SentencePiece model: {err}") from err
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no special tokens added)."""
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | Path | None = None) -> ByteTokenizer | HFTokenizer | SentencePieceTokenizer:
    """``None``/``"byte"`` -> bytes; ``*.json`` -> Hugging Face; ``*.model`` -> SentencePiece; a folder -> its file."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise FileNotFoundError(f"folder {path} has neither tokenizer.json nor tokenizer.model; "
                                "pass one of those files, or 'byte' for the byte tokenizer")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} not found: expected 'byte', a tokenizer.json, "
                                "a SentencePiece .model file, or a folder holding one")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"cannot tell the tokenizer type of {path}: use a .json (Hugging Face) or .model "
                     "(SentencePiece) file, or 'byte'")


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet of Hugging Face's ByteLevel pre-tokenizer: printable bytes stand for themselves, the
    others (controls, space, ...) for the characters U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: int | None = None) -> list[Path]:
    """Write ``tokenizer`` as files ``transformers.AutoTokenizer.from_pretrained(folder)`` reads; returns them.

    The byte tokenizer becomes a byte-level BPE with no merges (each UTF-8 byte one token, same ids; pad/bos/eos as
    256/257/258), so encode and decode match ``ByteTokenizer`` exactly; a tokenizer.json or SentencePiece model is
    copied as it is.
    """
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        written = [Path(shutil.copyfile(tokenizer.path, folder / "tokenizer.json"))]
        cfg = tokenizer.path.parent / "tokenizer_config.json"
        if cfg.is_file():
            written.append(Path(shutil.copyfile(cfg, folder / "tokenizer_config.json")))
        return written
    if isinstance(tokenizer, SentencePieceTokenizer):
        return [Path(shutil.copyfile(tokenizer.path, folder / "tokenizer.model"))]
    if not isinstance(tokenizer, ByteTokenizer):
        raise TypeError(f"cannot write {tokenizer!r} as Hugging Face tokenizer files; "
                        "expected ByteTokenizer, HFTokenizer or SentencePieceTokenizer")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    vocab = {ch: b for b, ch in _byte_to_char().items()}
    tok = _Tok(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text maps to its bytes one to one, as ByteTokenizer.encode does.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = {"<pad>": ByteTokenizer.pad_id, "<bos>": ByteTokenizer.bos_id, "<eos>": ByteTokenizer.eos_id}
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    assert all(tok.token_to_id(n) == i for n, i in specials.items()), "special ids must follow the 256 bytes"
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
           "eos_token": "<eos>", "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]
