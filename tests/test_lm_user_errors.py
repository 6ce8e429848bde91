"""One line, no traceback, for the user errors of the LM / multimodal paths that the argument walk
(test_cli_bad_args.py) does not reach: optimiser values, encoder_weights, interleaved images and class names, a
deleted working folder, a cache folder that is a file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.train.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key, value", [("weight_decay", float("inf")), ("weight_decay", float("nan")),
                                        ("lr", float("inf")), ("lr", float("nan")), ("eps", 0.0),
                                        ("betas", (0.9, float("nan"))), ("total_steps", 0)])
def test_non_finite_optimiser_settings_are_refused_before_training(key, value):
    from lm import CausalLM

    with pytest.raises(ValueError, match=f"model.{key}"):
        CausalLM(**{key: value})


def test_encoder_weights_missing_or_a_language_model_is_one_line_naming_the_key(tmp_path):
    import zoo
    from lm import MultimodalLM
    from lm_testutil import TINY

    lm_ckpt = tmp_path / "lm.ckpt"
    model = zoo.create("gemma2-tiny", **TINY)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "zoo": {
        "format": 1, "kind": "lm", "model": "gemma2-tiny", "overrides": TINY, "prefix": "model."}}, lm_ckpt)
    for path, says in ((tmp_path / "nope.ckpt", "does not exist"), (lm_ckpt, "language-model checkpoint"),
                       (tmp_path, "(is a folder|a weights folder needs config.json)")):
        module = MultimodalLM(model="vlm-digits-tiny", encoder_weights=str(path))
        with pytest.raises(UsageError, match=f"model.encoder_weights {str(path)!r} cannot be used: .*{says}") as err:
            module.configure_model()
        assert "\n" not in str(err.value)


def test_sum_needs_ascii_integer_class_names(tiny_imagefolder):
    from zoo.data.interleaved import InterleavedDataModule

    for split in ("train", "val"):
        for wnid, name in zip(sorted(os.listdir(tiny_imagefolder / split)), ("²", "٣", "-4")):
            (tiny_imagefolder / split / wnid).rename(tiny_imagefolder / split / name)
    dm = InterleavedDataModule(dataset=f"imagefolder:{tiny_imagefolder}", tasks=["sum"], image_size=16,
                               train_size=8, val_size=4, batch_size=2)
    with pytest.raises(UsageError, match="task 'sum' needs integer class names but .* has class '²'"):
        dm.check_data()  # before any output folder exists (ZooTrainer.fit calls it first)


def test_an_image_of_another_size_is_one_line_also_from_a_loader_worker():
    from zoo.cli import one_line
    from zoo.data.interleaved import fit_image

    with pytest.raises(UsageError, match=r"image a.png is 40x44 but the encoder takes 32x32") as err:
        fit_image(torch.zeros(3, 40, 44, dtype=torch.uint8), 32, resize=False, where="a.png")
    # what DataLoader re-raises from a worker: the worker's traceback inside the message; one line is kept
    wrapped = UsageError("Caught UsageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\n    raise X\n"
                         f"zoo.train.errors.UsageError: {err.value}\n")
    assert one_line(wrapped) == str(err.value)


def test_zoo_from_a_deleted_folder_is_one_line_and_tool_help_still_prints(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    gone = tmp_path / "gone"

    def zoo(*args: str) -> subprocess.CompletedProcess:
        script = f"mkdir {gone} && cd {gone} && rmdir {gone} && exec {sys.executable} -m zoo.cli {' '.join(args)}"
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)

    for args in (("fit", "--config", "x.yaml"), ("plan", "gemma2-tiny"), ("--trainer.max_steps", "3")):
        done = zoo(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no longer exists" in done.stderr
    done = zoo("plan", "--help")
    assert done.returncode == 0 and "--devices" in done.stdout, done.stderr
    done = zoo("fit", "--help")  # the shipped help when it is current for these sources, else the one line
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr


def test_a_cache_dir_that_is_a_file_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    from zoo.cli import help_cache
    from zoo.files import cache_dir

    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("ZOO_CACHE_DIR", str(blocker))
    with pytest.raises(NotADirectoryError, match=r"\$ZOO_CACHE_DIR='.*cache'.* is a file, not a folder"):
        cache_dir("text")
    monkeypatch.delenv("ZOO_CACHE_DIR")
    monkeypatch.setenv("ZOO_CACHE", str(blocker))  # the older name, still read
    with pytest.raises(NotADirectoryError, match=r"\$ZOO_CACHE="):
        cache_dir()
    from zoo.cli import main  # a command whose cache is the feature cache: one line too, not a traceback

    assert main(["probe", "--backbone", "random:resnet18", "--data", "digits", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("zoo probe: error: $ZOO_CACHE=")
    # help is still printed (not stored) with an unusable cache folder
    assert help_cache.serve(["fit", "--help", "--x"], lambda: print("HELP TEXT") or 0) == 0
    assert "HELP TEXT" in capsys.readouterr().out
