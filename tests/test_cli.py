"""The `zoo` command: LightningCLI with the shared trainer, configs shipped, tool subcommands."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo.cli import main, main_help, run_cli
from zoo.cli.commands import registered_commands

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


def test_validate_runs_through_the_cli_and_every_help_section_title_is_whole():
    import re

    from zoo.cli import help_cache

    cli = run_cli(["validate", "--config", str(ROOT / "configs/byol/digits.yaml"), "--trainer.limit_val_batches", "1",
                   "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                   "--data.init_args.batch_size", "16", "--model.init_args.projector_hidden", "32"])
    assert "val/online_top1" in cli.trainer.callback_metrics  # ZooTrainer.validate is Lightning's, retitled
    for name in help_cache.SHIPPED_COMMANDS:
        text = (help_cache.SHIPPED_DIR / f"{name}.txt").read_text()
        titles = re.findall(r"^([^ \n].*):$", text, flags=re.M)  # argparse section titles end with ":"
        assert len(titles) >= 5, titles
        for title in titles:
            # whole sentences within 80 columns: no docstring cut at its first line, no bare <class '...'>
            assert len(title) < 80 and not title.startswith("<class") and title.count("(") == title.count(")"), title
            assert not title.rstrip(".").endswith((" your", " to", " the", " is")), title


def test_print_config_and_unknown_key_via_console_script():
    out = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", "configs/byol/digits.yaml", "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "class_path: byol.BYOL" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", "configs/byol/digits.yaml",
                          "--model.init_args.no_such_key", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr


def test_tools_are_registered_as_entry_points_in_pyproject():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["byol_zoo.commands"]
    assert set(declared) == {"probe", "export", "export-hf", "pretrained", "eval", "scaling", "plan", "consolidate",
                             "data"}
    commands = registered_commands()
    for name, target in declared.items():
        assert commands[name].target == target
        if name == "plan" and not commands[name].available():
            continue  # lm/parallel/plan.py arrives with the planner's branch
        assert callable(commands[name].load()), target


def test_zoo_never_imports_byol_or_lm_and_its_cli_never_names_them():
    import re

    for path in (ROOT / "zoo").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) (byol|lm)\b", text, re.M), path
        if path.parent.name == "cli":  # the subcommand table lives in pyproject.toml, not in import strings
            assert not re.search(r"[\"'](byol|lm)\.\w", text), path


def test_a_command_registered_by_entry_point_is_listed_described_and_dispatched(monkeypatch, tmp_path, capsys):
    # a fake distribution's entry point: the registry reads importlib.metadata, so patch what it returns
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "tool.py").write_text(
        'import sys\n\ndef main(argv):\n    """Say hello to the arguments."""\n    print("hello", *argv)\n    return 3\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import zoo.cli.commands as commands

    monkeypatch.setattr(commands, "_from_metadata", lambda: {"hello": "fakepkg.tool:main"})
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n")[0].replace("\n", "").replace(" ", "")
    assert "{fit,validate,test,predict,consolidate,data,eval,export,export-hf,hello,plan," in usage, usage
    assert re.search(r"^  hello +Say hello to the arguments\.$", out, flags=re.M), out
    assert "fakepkg" not in sys.modules  # described from its source, not imported
    assert main(["hello", "a", "b"]) == 3
    assert capsys.readouterr().out == "hello a b\n"


def test_unknown_or_uninstalled_subcommand_is_one_line(monkeypatch, capsys):
    import zoo.cli.commands as commands

    assert main(["probee"]) == 2
    assert _one_line(capsys) == "zoo: error: unknown subcommand 'probee'; did you mean probe? zoo --help lists them all"
    monkeypatch.setattr(commands, "_from_metadata", lambda: {"gone": "no_such_package.cli:main"})
    assert main(["gone"]) == 2
    assert "no_such_package.cli that provides it is not installed" in _one_line(capsys)


def test_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys; from zoo.cli import main; rc = main(['--help']); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    usage = out.stdout.split("\n\n")[0].replace("\n", "").replace(" ", "")
    assert "{fit,validate,test,predict,consolidate,data,eval,export,export-hf,plan,pretrained,probe,scaling}" in usage, usage
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    test_line = out.stdout[out.stdout.index("  test "):out.stdout.index("  predict ")]
    assert test_line.rstrip().endswith("when you ask)."), test_line
    for name in ("eval", "export", "probe", "scaling"):
        assert next(ln for ln in out.stdout.splitlines() if ln.startswith(f"  {name} ")).split(name, 1)[1].strip()


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
    assert "`Trainer.fit` stopped" not in text  # it lands on a live bar; the summary's last line says it instead
    assert "run finished at step 1 (max_steps=1 reached)" in text


def test_fit_help_describes_the_subcommand_and_the_overwrite_flag():
    out = subprocess.run([sys.executable, "-m", "zoo.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0
    fit_line = next(line for line in out.stdout.splitlines() if line.strip().startswith("fit "))
    assert "Train the model" in fit_line, fit_line
    fit = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "ZOO_HELP_CACHE": "0"})  # the live help
    assert "--overwrite" in fit.stdout and "start a fresh run" in fit.stdout


def test_eval_and_its_subcommands_are_described(capsys):
    from lm.cli.evals import main as eval_main

    for argv, words in ((["--help"], ["needle in a haystack (Gemini 1.5 protocol)", "perplexity and bits per byte"]),
                        (["needle", "--help"], ["hide a fact at each depth"]),
                        (["ppl", "--help"], ["Perplexity and bits per byte of a language model"])):
        with pytest.raises(SystemExit) as done:
            eval_main(argv)
        assert done.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        for w in words:
            assert w in out, (argv, w)


@pytest.mark.parametrize("tool, argv, line", [
    ("scaling", ["sweep", "--config", "x.yaml", "--limt", "3"],
     "zoo scaling sweep: error: unknown key limt (from flag --limt); did you mean limit? See zoo scaling sweep --help"),
    ("export", ["x.ckpt", "--out", "y.safetensors", "--wich", "target"],
     "zoo export: error: unknown key wich (from flag --wich); did you mean which? See zoo export --help"),
    ("probe", ["--backbone", "random:resnet18", "--data", "digits", "--epoch", "3"],
     "zoo probe: error: unknown key epoch (from flag --epoch); did you mean epochs? See zoo probe --help"),
])
def test_tools_refuse_unknown_or_abbreviated_flags_in_one_line(capsys, tool, argv, line):
    commands = registered_commands()
    assert commands[tool].load()(argv) == 2
    assert _one_line(capsys) == line


def test_probe_config_file_keys_and_legacy_flags(tmp_path, capsys):
    from zoo.eval.probe_cli import DIGITS_PRESET, parse

    tool, cfg, recipe = parse(["--backbone", "b", "--data", "digits", "--lr", "0.1", "0.2", "--batch-size", "8",
                               "--no-progress", "--k", "3", "5"])
    assert (cfg.lr_grid, cfg.batch_size, cfg.progress, cfg.knn_k) == ((0.1, 0.2), 8, False, (3, 5))
    # the digits preset, as the end-of-fit report uses, named relative to the working folder (the checkout here)
    assert cfg.epochs == 30 and recipe == os.path.relpath(DIGITS_PRESET) and not os.path.isabs(recipe)
    (tmp_path / "p.yaml").write_text("epochs: 3\nfeature_norm: batchnorm\n")
    tool, cfg, recipe = parse(["--backbone", "b", "--data", "cifar10:/x", "--config", str(tmp_path / "p.yaml"),
                               "--epochs", "4"])
    assert (cfg.epochs, cfg.feature_norm, recipe) == (4, "batchnorm", str(tmp_path / "p.yaml"))
    tool, cfg, recipe = parse(["--backbone", "b", "--data", "cifar10:/x"])
    assert (cfg.image_size, cfg.resize, cfg.data_image_size, recipe) == (32, 32, 32, "built-in defaults")
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    from zoo.eval.probe_cli import main as probe_main

    assert probe_main(["--backbone", "b", "--data", "digits", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert _one_line(capsys) == (f"zoo probe: error: unknown key epochz (from file {tmp_path / 'bad.yaml'}); did you "
                                 "mean epochs? See zoo probe --help")


def test_probe_table_flags_a_diverged_learning_rate(capsys):
    import math

    import torch

    from zoo.eval.linear import divergence, train_linear
    from zoo.eval.probe import print_summary

    feats, labels = torch.randn(64, 8) * 100, torch.randint(0, 4, (64,))
    calm = train_linear(feats / 100, labels, 4, 0.1, 3, 16)
    wild = train_linear(feats, labels, 4, 1e6, 3, 16)
    assert divergence(calm, calm.last_loss, 4) is None
    assert divergence(wild, wild.last_loss, 4) is not None
    assert divergence(calm, float("nan"), 4) == "loss nan" and "> 2 ln(4)" in divergence(calm, 3 * math.log(4), 4)
    print_summary({"mode": "fast", "top1": 90.0, "top5": 99.0, "seconds": {"total": 1.0}, "base_lr": 0.1,
                   "heldout_top1": {"0.1": 90.0, "100.0": 25.0}, "diverged": {"100.0": "loss nan"},
                   "recipe": "configs/probe/digits_linear.yaml"})
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "@ base lr 100.0" in line)
    assert "DIVERGED (loss nan)" in row and "DIVERGED" not in next(l for l in out.splitlines() if "@ base lr 0.1" in l)
    assert "configs/probe/digits_linear.yaml" in out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_package_torch_cuda_and_lightning(flag, capsys):
    from importlib.metadata import version

    import lightning
    import torch

    assert main([flag]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["byol-zoo"] == version("byol-zoo") and rows["lightning"] == lightning.__version__
    assert rows["torch"].startswith(torch.__version__ + " (")
    cuda = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    assert cuda in rows["torch"]
    assert flag in main_help()
