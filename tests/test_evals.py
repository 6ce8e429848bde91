"""lm.evals.text: needle-in-a-haystack prompt, scoring, report files, perplexity / bpb, unigram baseline, CLI."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from torch import nn

import zoo
from lm import CausalLM
from lm.cli.evals import main
from lm.evals.text import (build_needle_prompt, byte_unigram_baseline, evaluate_perplexity, needle_in_haystack,
                           write_needle_report)
from lm_testutil import TINY, quiet_trainer, tiny_data
from zoo.data.text import TextDataModule
from zoo.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
HAY = "Essays are long. They go on and on about startups.\nAnother line of filler text here.\n"


class Oracle(nn.Module):
    """Reads the needle from the prompt and types its number (or a wrong one): a model with known recall."""

    def __init__(self, lie: bool = False) -> None:
        super().__init__()
        self.lie = lie

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        text = TOK.decode(ids[0].tolist())
        city = re.findall(r"What is the special magic (\w+) number\?", text)[-1]
        number = re.search(rf"The special magic {city} number is: (\d+)\.", text).group(1)
        if self.lie:
            number = str(int(number) + 1)
        answered = text.rsplit("number is: ", 1)[1]
        target = (number + "\n")[min(len(answered), len(number))]
        logits = torch.full((1, ids.shape[1], 259), -10.0)
        logits[0, -1, TOK.encode(target)[0]] = 10.0
        return logits


def test_needle_prompt_length_depth_and_errors():
    hay = TOK.encode(HAY)
    for depth in (0.0, 0.5, 1.0):
        ids, pos = build_needle_prompt(TOK, hay, 400, depth, "Tokyo", 1234567)
        assert len(ids) == 400
        text = TOK.decode(ids)
        assert " The special magic Tokyo number is: 1234567.\n" in text
        assert text.endswith("What is the special magic Tokyo number? The special magic Tokyo number is: ")
        needle_at = text.index("The special magic Tokyo")
        assert needle_at == pos + 1
    _, p0 = build_needle_prompt(TOK, hay, 400, 0.0, "Tokyo", 1)
    _, p5 = build_needle_prompt(TOK, hay, 400, 0.5, "Tokyo", 1)
    _, p1 = build_needle_prompt(TOK, hay, 400, 1.0, "Tokyo", 1)
    assert p0 == 0 < p5 < p1
    assert TOK.decode(hay * 10)[p5 - 1] == "\n"  # snapped to a line start
    with pytest.raises(ValueError, match="context length 20 is too short"):
        build_needle_prompt(TOK, hay, 20, 0.5, "Tokyo", 1)
    with pytest.raises(ValueError, match="depth=1.5"):
        build_needle_prompt(TOK, hay, 400, 1.5, "Tokyo", 1)


def test_needle_scoring_with_oracles_and_report_files(tmp_path):
    lengths, depths = [200, 300], [0.0, 0.5, 1.0]
    rows = needle_in_haystack(Oracle(), TOK, lengths, depths, haystack=HAY, seed=1)
    assert len(rows) == 6 and all(r["found"] == 1 for r in rows)
    assert len({r["number"] for r in rows}) == 6  # a fresh random needle per cell
    wrong = needle_in_haystack(Oracle(lie=True), TOK, lengths, depths, haystack=HAY, seed=1)
    assert all(r["found"] == 0 for r in wrong)
    paths = write_needle_report(rows[:3] + wrong[3:], tmp_path / "out")
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and [r["found"] for r in table] == ["1"] * 3 + ["0"] * 3
    md = paths["md"].read_text()
    assert "| depth \\ length | 200 | 300 |" in md and "| recall | 100% | 0% |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_needle_on_a_tiny_transformer_and_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.create("gemma2-tiny", **{**TINY, "max_seq_len": 256})
    rows = needle_in_haystack(model, TOK, [140, 160], [0.0, 1.0], haystack=HAY)
    assert {r["found"] for r in rows} <= {0, 1} and len(rows) == 4
    with pytest.raises(ValueError, match="context length 250 \\+ 12 answer tokens exceeds the model's max_seq_len=256"):
        needle_in_haystack(model, TOK, [250], [0.5], haystack=HAY)
    hay = tmp_path / "hay.txt"
    hay.write_text(HAY)
    code = main(["needle", "--model", "gemma2-tiny", "--lengths", "140", "--depths", "0,1", "--haystack", str(hay),
                 "--out", str(tmp_path / "needle"), "--device", "cpu"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["cells"] == 2 and 0 <= result["recall"] <= 1
    # the run says where its results went, in words, before the machine-readable line
    assert lines[-2].startswith("results in ") and "needle.md (table)" in lines[-2] and "needle.png (heatmap)" in lines[-2]
    assert (tmp_path / "needle" / "needle.png").is_file() and (tmp_path / "needle" / "needle.md").is_file()
    assert main(["needle", "--model", str(tmp_path / "nope.ckpt"), "--device", "cpu"]) == 2
    assert "nope.ckpt" in capsys.readouterr().err


def test_perplexity_matches_training_validation_and_cli(tmp_path, capsys):
    dm = tiny_data(tmp_path)
    module = CausalLM(model_overrides=TINY, warmup_steps=1)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=None)
    trainer.fit(module, dm)
    result = evaluate_perplexity(module.model, dm)
    assert result["loss"] == pytest.approx(trainer.callback_metrics["val/loss"].item(), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2) / dm.bytes_per_token("val"))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    # The same split as training, read from a `zoo fit`-style YAML's data.init_args.
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(f"data:\n  class_path: zoo.data.text.TextDataModule\n  init_args:\n"
                   f"    paths: {tmp_path / 'corpus'}\n    seq_len: 32\n    val_fraction: 0.25\n"
                   f"    cache_dir: {tmp_path / 'cache'}\n")
    code = main(["ppl", "--model", str(ckpt), "--config", str(cfg), "--unigram", "--device", "cpu"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["loss"] == pytest.approx(result["loss"], rel=1e-5) and out["tokens"] == result["tokens"]
    assert out["val_cross_entropy_bpb"] > 0


def test_byte_unigram_baseline_by_hand(tmp_path):
    root = tmp_path / "ab"
    root.mkdir()
    for i in range(6):
        (root / f"d{i}.txt").write_text("ab" * 200 if i % 2 else "aabb" * 100)
    dm = TextDataModule(paths=str(root), pattern="*.txt", seq_len=16, val_fraction=0.3,
                        cache_dir=str(tmp_path / "c"), progress=False)
    base = byte_unigram_baseline(dm)
    assert base["train_entropy_bpb"] == pytest.approx(1.0)  # a and b equally often; EOS is not a byte
    # Val (also half a, half b) under add-one-smoothed train counts over 256 byte values.
    n = dm.meta["splits"]["train"]["bytes"]
    assert base["val_cross_entropy_bpb"] == pytest.approx(-math.log2((n / 2 + 1) / (n + 256)))


# ------------------------------------------------------------------------------------------------ hardening
def _one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out and len(err.splitlines()) == 1, captured
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("flag, value, says", [
    ("--lengths", "", "--lengths is empty"), ("--lengths", " , ", "--lengths is empty"),
    ("--lengths", "0", "--lengths value 0 is not a positive integer"),
    ("--lengths", "128,-5", "--lengths value -5"), ("--lengths", "12x", "--lengths value '12x' is not an integer"),
    ("--lengths", "140,140", "--lengths repeats [140]"),
    ("--depths", "", "--depths is empty"), ("--depths", "0,1.5", "--depths value 1.5 is outside [0, 1]"),
    ("--depths", "-0.1", "--depths value -0.1"), ("--depths", "nan", "--depths value 'nan' is not a finite"),
    ("--device", "gpu7", "--device 'gpu7'"),
])
def test_needle_cli_validates_arguments_before_touching_the_report(tmp_path, capsys, flag, value, says):
    out = tmp_path / "needle"
    out.mkdir()
    old = {name: f"old {name}\n" for name in ("needle.csv", "needle.md", "needle.png")}
    for name, text in old.items():
        (out / name).write_text(text)
    argv = {"--model": "gemma2-tiny", "--lengths": "140", "--depths": "0,1", "--out": str(out), "--device": "cpu",
            flag: value}
    assert main(["needle", *[x for kv in argv.items() for x in kv]]) == 2
    _one_line_error(capsys, says)
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # untouched: no truncation, no temp files


def test_needle_cli_other_bad_inputs(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["needle", "--model", "gemma2-tiny", "--out", str(tmp_path / "file"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "--out", "is a file")
    (tmp_path / "empty.txt").write_text("  \n")
    for hay, says in ((tmp_path / "none.txt", "is not a file"), (tmp_path, "is not a file"),
                      (tmp_path / "empty.txt", "holds no text")):
        assert main(["needle", "--model", "gemma2-tiny", "--haystack", str(hay), "--device", "cpu",
                     "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, "--haystack", says)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert main(["needle", "--model", str(tmp_path / "empty.ckpt"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "empty.ckpt", "empty file")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    assert main(["needle", "--model", str(tmp_path / "junk.ckpt"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "junk.ckpt", "truncated, corrupt or in another format")
    assert not (tmp_path / "o").exists()


def test_needle_refuses_a_tokenizer_that_does_not_fit_like_ppl(tmp_path, capsys):
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel()
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(["import os\nimport sys\n", "def main():\n    return 0\n"] * 20, trainer=trainer)
    rust.save(str(tmp_path / "tokenizer.json"))
    model = zoo.create("gemma2-tiny", **{**TINY, "max_seq_len": 256})
    assert rust.get_vocab_size() > model.config.vocab_size
    from zoo.models.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match=r"has vocab_size=\d+ but model 'Transformer' has vocab_size=259"):
        needle_in_haystack(model, load_tokenizer(tmp_path / "tokenizer.json"), [140], [0.5], haystack=HAY)
    out = tmp_path / "needle"
    assert main(["needle", "--model", "gemma2-tiny", "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--lengths", "140", "--depths", "0.5", "--out", str(out), "--device", "cpu"]) == 2
    _one_line_error(capsys, "tokenizer.json", "vocab_size=259", "use the model's tokenizer")
    assert not out.exists()


def test_needle_report_is_written_atomically(tmp_path, monkeypatch):
    rows = needle_in_haystack(Oracle(), TOK, [200], [0.0, 1.0], haystack=HAY, seed=1)
    out = tmp_path / "out"
    paths = write_needle_report(rows, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="no needle results"):
        write_needle_report([], out)

    def boom(self, rows):
        raise RuntimeError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_needle_report(rows, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old report whole, no temp files left
    assert set(before) == {p.name for p in paths.values()}


def test_plot_titles_wrap_between_folders_never_inside_a_name():
    from lm.evals.report import wrap_title

    title = "needle: /work/walk/runs/lm/stdlib_gemma2_tiny_routed"
    for width in (16, 25, 40):
        lines = wrap_title(title, width).split("\n")
        assert "".join(lines).replace(" ", "") == title.replace(" ", "")  # nothing lost
        names = {n for n in title.replace(" ", "/").split("/") if n}
        assert all(n in {p for line in lines for p in line.replace(" ", "/").split("/")} for n in names), lines
        assert all(len(line) <= width or "/" not in line.rstrip("/") for line in lines), lines
    assert wrap_title("needle: gemma2-tiny", 40) == "needle: gemma2-tiny"
