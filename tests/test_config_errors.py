"""Bad configuration fails before training starts, with a message that names the key.

Everything goes through ``zoo.cli.run_cli`` (the ``zoo fit`` command line) except the DDP batch check, which is
also exercised on ``build_trainer`` so that no process group has to be started to prove it runs before launch.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from byol import BYOL
from zoo.cli import run_cli
from zoo.data import ImageDataModule
from zoo.train.trainer import ZooTrainer, build_trainer

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "byol" / "digits.yaml")


def zoo_fit(tmp_path: Path, *args: str, config: dict | None = None):
    cfg_args = ["--config", DIGITS]
    if config is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        cfg_args += ["--config", str(path)]
    return run_cli(["fit", *cfg_args, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
                    "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--trainer.accelerator",
                    "cpu", *args])


def assert_not_started(tmp_path: Path) -> None:
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "logs").exists()


@pytest.mark.parametrize("args, config, message", [
    # unknown keys: on the command line, in a YAML file, in the trainer section
    (["--model.init_args.bogus", "1"], None, r"unknown key model\.init_args\.bogus \(from flag --model"),
    ([], {"model": {"init_args": {"projektor_hidden": 64}}}, r"projektor_hidden"),
    ([], {"trainer": {"max_stepz": 3}}, r"max_stepz"),
    # wrong types
    (["--model.init_args.base_lr", "fast"], None, r"model\.init_args\.base_lr must be a float, got 'fast'"),
    (["--data.init_args.batch_size", "1.5"], None, r"data\.init_args\.batch_size must be an integer, got '1\.5'"),
    # impossible values, refused by the constructors while the config is checked
    (["--model.init_args.base_lr", "-0.1"], None, r"model\.base_lr must be positive, got -0\.1"),
    (["--model.init_args.tau_base", "1.5"], None, r"model\.tau_base must be in \[0, 1\], got 1\.5"),
    (["--model.init_args.tau_base", "-0.01"], None, r"model\.tau_base must be in \[0, 1\], got -0\.01"),
    (["--data.init_args.batch_size", "0"], None, r"data\.batch_size must be >= 1, got 0"),
    # impossible values that used to be accepted (NaN / Inf slip through every "< 0" test)
    (["--model.init_args.base_lr", ".nan"], None, r"model\.base_lr must be positive, got nan"),
    (["--model.init_args.base_lr", ".inf"], None, r"model\.base_lr must be positive, got inf"),
    (["--model.init_args.weight_decay", ".nan"], None, r"model\.weight_decay must be >= 0, got nan"),
    (["--model.init_args.warmup_epochs", ".nan"], None, r"model\.warmup_epochs must be >= 0, got nan"),
    (["--model.init_args.lars_eta", "-1"], None, r"model\.lars_eta .* must be positive, got -1"),
    (["--model.init_args.projection_dim", "0"], None, r"model\.projection_dim must be >= 1, got 0"),
    (["--data.init_args.image_size", "0"], None, r"data\.image_size must be >= 1, got 0"),
    (["--trainer.accumulate_grad_batches", "0"], None, r"trainer\.accumulate_grad_batches must be >= 1, got 0"),
    (["--trainer.precision", "64"], None, r"trainer\.precision=64-true is not supported by BYOL"),
    (["--model.init_args.image_size", "100000"], None,
     r"one batch does not fit in memory: [\d.]+ TB \(128 images x 2 views x 3 x 100000\^2 float32, "
     r"model\.image_size=100000\) but the available RAM is [\d.]+ [KMGT]?B; lower model\.image_size or data\.batch_size"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path, capsys, args, config, message):
    # jsonargparse rejects unknown keys and types while parsing (a one-line ConfigError); values our constructors
    # refuse surface as the ValueError raised while the classes are instantiated, before the Trainer exists.
    with pytest.raises(ValueError) as failure:
        zoo_fit(tmp_path, *args, config=config)
    text = capsys.readouterr().err + str(failure.value)
    assert re.search(message, text), text[-1500:]
    assert_not_started(tmp_path)


def test_batch_of_one_per_device_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"data\.batch_size.*1 .* at least 2 images per device"):
        zoo_fit(tmp_path, "--data.init_args.batch_size", "1")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_too_small_for_the_devices_is_refused_before_ddp_launches(tmp_path):
    """2 CPU processes with 1 image each: refused in this process, before any DDP worker is spawned."""
    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=2, strategy="ddp_spawn",
                            max_steps=1, logger=False, enable_progress_bar=False)
    model = BYOL(encoder="convnet_tiny", image_size=16, projector_hidden=16, projection_dim=8)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"data\.batch_size=1 .* 2 device\(s\) the global batch must be at least 4"):
        trainer.fit(model, ImageDataModule("digits", batch_size=1, num_workers=0, image_size=16))
    assert time.perf_counter() - start < 5  # spawning two workers that import torch would take far longer
    assert not (tmp_path / "checkpoints").exists()


def test_zoo_fit_uses_the_checking_trainer(tmp_path):
    """``zoo fit`` must build ``ZooTrainer`` so the check above also runs for command-line DDP runs."""
    cli = run_cli(["--config", DIGITS, "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator",
                   "cpu"], run=False)
    assert isinstance(cli.trainer, ZooTrainer), (
        "zoo.cli.run_cli must pass trainer_class=zoo.train.trainer.ZooTrainer to ZooCLI")


def test_zoo_fit_usage_error_is_one_line_and_exit_status_2(tmp_path, capsys):
    from zoo.cli import main

    code = main(["fit", "--config", DIGITS, "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--model.init_args.base_lr", ".nan"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "zoo fit: error: model.base_lr must be positive, got nan", err
    assert_not_started(tmp_path)


@pytest.mark.parametrize("args, config, line", [
    (["--model.init_args.base_lrr", "1"], None,
     "unknown key model.init_args.base_lrr (from flag --model.init_args.base_lrr); did you mean base_lr? "
     "See zoo fit --model.help byol.BYOL"),
    ([], {"model": {"init_args": {"projektor_hidden": 64}}},
     "unknown key model.init_args.projektor_hidden (from file {bad}); did you mean projector_hidden? "
     "See zoo fit --model.help byol.BYOL"),
    ([], {"trainer": {"max_stepz": 3}},
     "unknown key trainer.max_stepz (from file {bad}); did you mean max_steps or max_time? See zoo fit --help"),
    # an unambiguous abbreviation is refused, not silently taken as max_epochs
    (["--trainer.max_epoch", "1"], None,
     "unknown key trainer.max_epoch (from flag --trainer.max_epoch); did you mean max_epochs or min_epochs? "
     "See zoo fit --help"),
    (["--modell.x", "3"], None, "unknown key modell.x (from flag --modell.x); did you mean model? See zoo fit --help"),
])
def test_config_error_is_one_line_naming_key_origin_and_closest_keys(tmp_path, capsys, args, config, line):
    from zoo.cli import main

    cfg_args = []
    if config is not None:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
        cfg_args = ["--config", str(tmp_path / "bad.yaml")]
    code = main(["fit", "--config", DIGITS, *cfg_args, "--trainer.default_root_dir", str(tmp_path / "run"), *args])
    cap = capsys.readouterr()
    assert code == 2 and cap.err == f"zoo fit: error: {line.format(bad=tmp_path / 'bad.yaml')}\n", cap.err
    assert "usage:" not in cap.out + cap.err
    assert not (tmp_path / "run").exists()


def test_bad_dataset_path_is_one_line_and_creates_no_folder(tmp_path, capsys):
    from zoo.cli import main

    run = tmp_path / "run"
    code = main(["fit", "--config", DIGITS, "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu",
                 "--data.init_args.dataset", f"imagefolder:{tmp_path / 'nope'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"zoo fit: error: data.dataset='imagefolder:{tmp_path / 'nope'}' cannot be read:"), err
    assert not run.exists()  # no logs/, tb/, checkpoints/ or lock left behind


LM = str(ROOT / "configs" / "lm" / "stdlib_gemma2_tiny.yaml")
VLM = str(ROOT / "configs" / "multimodal" / "digits_vlm.yaml")


@pytest.mark.parametrize("command, config, args, start", [
    # every data module checks its inputs before any output folder exists, under fit and under validate / test
    ("fit", LM, ["--data.init_args.paths", "{tmp}/nope"], "data.paths='{tmp}/nope' cannot be read: text corpus path"),
    ("fit", LM, ["--data.init_args.paths", "[{tmp}/empty]"], "data.paths=['{tmp}/empty'] cannot be read: text corpus "
                                                            "is empty"),
    ("fit", LM, ["--data.init_args.tokenizer", "{tmp}/nope.json"], "data.tokenizer='{tmp}/nope.json' cannot be "
                                                                   "loaded: tokenizer"),
    ("fit", LM, ["--data.init_args.paths", "{tmp}/small.py", "--data.init_args.val_fraction", "0"],
     "data: the train split has 4 tokens, fewer than seq_len + 1"),
    ("validate", LM, ["--data.init_args.paths", "{tmp}/nope"], "data.paths='{tmp}/nope' cannot be read"),
    ("fit", VLM, ["--data.init_args.dataset", "imagefolder:{tmp}/nope"],
     "data.dataset='imagefolder:{tmp}/nope' cannot be read: image folder split not found"),
    ("fit", VLM, ["--data.init_args.tokenizer", "nosuch"], "data.tokenizer='nosuch' cannot be loaded"),
    ("test", DIGITS, ["--data.init_args.dataset", "cifar10:{tmp}/nope"], "data.dataset='cifar10:{tmp}/nope' cannot "
                                                                        "be read: CIFAR-10 not found"),
])
def test_every_data_module_refuses_bad_inputs_in_one_line_before_any_folder(tmp_path, capsys, command, config, args,
                                                                          start):
    from zoo.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "small.py").write_text("x=1")
    run = tmp_path / "run"
    code = main([command, "--config", config, "--trainer.default_root_dir", str(run),
                 *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"zoo {command}: error: " + start.replace("{tmp}", str(tmp_path))), err
    assert not run.exists()


def test_missing_model_config_or_data_is_one_line_naming_what_to_pass(tmp_path, capsys):
    from zoo.cli import main

    assert main(["fit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo fit: error: no model given: pass a config that names one") and "--model CLASS_PATH" in err
    assert main(["validate", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zoo validate: error: --config '{tmp_path / 'nope.yaml'}': no such file; see zoo validate")
    (tmp_path / "nodata.yaml").write_text("trainer:\n  max_steps: 1\nmodel:\n  class_path: byol.BYOL\n")
    run = tmp_path / "run"
    assert main(["fit", "--config", str(tmp_path / "nodata.yaml"), "--seed_everything", "0",
                 "--trainer.default_root_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo fit: error: no training data: BYOL needs a data module") and "--data" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not run.exists()


@pytest.mark.parametrize("config, args, start", [
    # a constructor refusing a value or a missing file: jsonargparse wraps it in its union wording; we print it alone
    (DIGITS, ["--model.init_args.encoder", "resnet_nope"],
     "zoo fit: error: byol.BYOL: unknown model 'resnet_nope'. Did you mean resnet50"),
    (DIGITS, ["--model.init_args.encoder", "timm:nope_net"], "zoo fit: error: byol.BYOL: timm has no model 'nope_net'"),
    (DIGITS, ["--model.init_args.augment_overrides", "{crop_sampler: x}"],
     "zoo fit: error: byol.BYOL: crop_sampler='x' is not one of"),
    (str(ROOT / "configs" / "lm" / "stdlib_distill_tiny.yaml"), ["--model.init_args.teacher_ckpt", "nope/last.ckpt"],
     "zoo fit: error: lm.Distill: checkpoint 'nope/last.ckpt' does not exist"),
])
def test_constructor_refusal_is_one_line_without_the_union_wording(tmp_path, capsys, config, args, start):
    from zoo.cli import main

    run = tmp_path / "run"
    code = main(["fit", "--config", config, "--trainer.default_root_dir", str(run), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(start) and len(err.strip().splitlines()) == 1, err
    assert "Union" not in err and "Traceback" not in err
    assert not run.exists()


def test_a_bug_inside_a_constructor_keeps_its_traceback():
    from zoo.cli import constructor_error

    def wrapped(inner: BaseException) -> ValueError:
        try:
            try:
                raise inner
            except BaseException as e:
                raise ValueError("Does not validate against any of the Union subtypes\nGiven value: "
                                 "Namespace(class_path='byol.BYOL')") from e
        except ValueError as outer:
            return outer

    assert constructor_error(wrapped(FileNotFoundError("no such file x"))) == "byol.BYOL: no such file x"
    assert constructor_error(wrapped(AttributeError("'NoneType' object has no attribute 'x'"))) is None
    assert constructor_error(ValueError("a plain error raised while training")) is None
