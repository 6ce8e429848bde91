"""The `zoo` command: LightningCLI with the shared trainer, configs shipped, tool subcommands."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo.cli import TOOLS, main, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "byol").glob("*.yaml")))
def test_every_byol_config_parses_and_instantiates(config, capsys):
    cli = run_cli(["--config", str(ROOT / config), "--trainer.devices", "1", "--trainer.accelerator", "cpu",
                   "--trainer.precision", "32-true", "--trainer.logger", "false"], run=False)
    assert type(cli.model).__name__ == "BYOL"
    assert cli.model.hparams.base_lr > 0


def test_imagenet_presets_match_the_paper():
    want = {100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}
    for epochs, (lr, wd, tau) in want.items():
        cfg = yaml.safe_load((ROOT / f"configs/byol/imagenet_resnet50_{epochs}ep.yaml").read_text())
        args = cfg["model"]["init_args"]
        assert (args["base_lr"], args["weight_decay"], args["tau_base"]) == (lr, wd, tau)
        assert cfg["trainer"]["max_epochs"] == epochs and args["warmup_epochs"] == 10
        assert cfg["trainer"]["devices"] * cfg["trainer"]["num_nodes"] * cfg["data"]["init_args"]["batch_size"] == 4096


def test_fit_through_the_cli_writes_last_checkpoint(tmp_path):
    run_cli(["fit", "--config", str(ROOT / "configs/byol/digits.yaml"), "--trainer.max_steps", "2",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]",
             "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
             "--data.init_args.batch_size", "16", "--model.init_args.projector_hidden", "32"])
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "logs").is_dir() and (tmp_path / "tb").is_dir()  # CSV and TensorBoard loggers


def test_print_config_and_unknown_key_via_console_script():
    out = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", "configs/byol/digits.yaml", "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "class_path: byol.BYOL" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", "configs/byol/digits.yaml",
                          "--model.init_args.no_such_key", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr


def test_tools_are_dispatched_by_import_string():
    assert set(TOOLS) >= {"probe", "export", "export-hf", "eval", "scaling"}
    for target, _ in TOOLS.values():
        module, func = target.split(":")
        mod = __import__(module, fromlist=[func])
        assert callable(getattr(mod, func)), target


def _one_line(capsys):
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "Traceback" not in cap.err + cap.out and len(err.splitlines()) == 1, cap
    return err


@pytest.mark.parametrize("tool", ["probe", "export"])
def test_probe_and_export_refuse_a_folder_missing_or_empty_file_in_one_line(tmp_path, capsys, tool):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04")
    (tmp_path / "bare").mkdir()
    (tmp_path / "empty.ckpt").write_bytes(b"")

    def call(src):
        args = ["--backbone", src, "--data", "digits"] if tool == "probe" else [src, "--out", str(tmp_path / "x.safetensors")]
        return main([tool, *args])

    assert call(str(run)) == 2
    err = _one_line(capsys)
    assert f"zoo {tool}: error: {str(run)!r} is a folder" in err and str(run / "checkpoints" / "last.ckpt") in err
    assert call(str(tmp_path / "bare")) == 2
    assert "is a folder" in _one_line(capsys)
    assert call(str(tmp_path / "nope.ckpt")) == 2
    assert "nope.ckpt' does not exist" in _one_line(capsys)
    assert call(str(tmp_path / "empty.ckpt")) == 2
    assert "is an empty file (0 bytes)" in _one_line(capsys)
    assert not (tmp_path / "x.safetensors").exists()


def test_weight_file_argument_is_found_wherever_it_is_given(tmp_path):
    from zoo.cli import check_weight_file

    d = str(tmp_path)
    assert "is a folder" in check_weight_file("export", ["--out", "x.safetensors", "--which", "target", d])
    assert "is a folder" in check_weight_file("export", ["--arch=resnet18", d, "--out", "x.safetensors"])
    assert "is a folder" in check_weight_file("probe", ["--data", "digits", f"--backbone={d}"])
    assert check_weight_file("probe", ["--backbone", "random:resnet18", "--data", "digits"]) is None
    assert check_weight_file("export-hf", [d, "--out", "o"]) is None  # an HF folder is a valid source there


def test_zoo_fit_prints_none_of_lightnings_chatter(tmp_path):
    # A user's `zoo fit` shows no litlogger tip, GPU/TPU lines or warnings about Lightning's own internals.
    out = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", "configs/byol/digits.yaml",
                          "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0",
                          "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "8",
                          "--model.init_args.projector_hidden", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for chatter in ("Tip:", "GPU available", "TPU available", "LeafSpec", "on_after_batch_transfer",
                    "args parameter is intended", "estimate number of stepping batches"):
        assert chatter not in text, chatter
    assert "max_steps=1" in text  # Lightning's own messages about the run stay


def test_fit_help_describes_the_subcommand_and_the_overwrite_flag():
    out = subprocess.run([sys.executable, "-m", "zoo.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0
    fit_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("fit "))
    assert "Train the model" in fit_line, fit_line
    fit = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert "--overwrite" in fit.stdout and "start a fresh run" in fit.stdout
