"""Start-up: every `--help` that needs no model imports no torch; Lightning's help is cached (zoo.cli.help_cache)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from zoo.cli import help_cache

ROOT = Path(__file__).resolve().parents[1]
TOOL_HELP = [["--help"], ["probe", "--help"], ["export", "--help"], ["export-hf", "--help"], ["eval", "--help"],
             ["eval", "ppl", "--help"], ["eval", "needle", "--help"], ["scaling", "--help"],
             ["scaling", "fit", "--help"], ["plan", "--help"], ["consolidate", "--help"]]
# Runs each command's --help in one interpreter and reports, after each, whether torch or Lightning got imported.
PROBE = """
import contextlib, io, json, sys
from zoo.cli import main
report = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    heavy = sorted(m for m in ("torch", "lightning") if m in sys.modules)
    report.append({"argv": argv, "code": code, "usage": "usage:" in out.getvalue(), "heavy": heavy})
print(json.dumps(report))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def test_help_of_every_tool_imports_no_torch():
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(TOOL_HELP)], cwd=ROOT, capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert [r["argv"] for r in report] == TOOL_HELP
    for r in report:
        assert r["code"] == 0 and r["usage"], r
        assert "torch" not in r["heavy"] and "lightning" not in r["heavy"], r


def test_help_requests_are_recognised():
    assert help_cache.is_help_request(["fit", "--help"])
    assert help_cache.is_help_request(["fit", "--config", "x.yaml", "-h"])
    assert help_cache.is_help_request(["fit", "--model.help", "byol.BYOL"])
    assert help_cache.is_help_request(["fit", "--trainer.callbacks.help=ModelCheckpoint"])
    assert not help_cache.is_help_request(["fit", "--config", "x.yaml"])
    assert not help_cache.is_help_request(["fit", "--print_config", "--help"])  # prints a config: never cached
    assert not help_cache.is_help_request(["fit", "--model.init_args.helpful", "1"])


def test_key_follows_source_configs_width_and_arguments(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    module = pkg / "mod.py"
    module.write_text("x = 1\n")
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n")
    monkeypatch.setenv("COLUMNS", "100")
    argv = ["fit", "--config", str(config), "--help"]
    key = help_cache.help_key(argv, [pkg])
    assert help_cache.help_key(argv, [pkg]) == key  # deterministic
    assert help_cache.help_key(["fit", "--help"], [pkg]) != key
    monkeypatch.setenv("COLUMNS", "80")
    assert help_cache.help_key(argv, [pkg]) != key
    monkeypatch.setenv("COLUMNS", "100")
    config.write_text("trainer:\n  max_epochs: 2\n")
    assert help_cache.help_key(argv, [pkg]) != key
    config.write_text("trainer:\n  max_epochs: 1\n")
    assert help_cache.help_key(argv, [pkg]) == key  # back to the same file, the same key
    module.write_text("x = 22\n")  # an edit to the source
    assert help_cache.help_key(argv, [pkg]) != key
    assert help_cache.help_key(["fit", "--config", str(tmp_path / "missing.yaml"), "--help"], [pkg]) is None


def test_package_dirs_cover_our_packages():
    names = {p.name for p in help_cache.package_dirs()}
    assert {"zoo", "augment"} <= names


def test_serve_stores_live_help_and_reprints_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    calls = []

    def live() -> int:
        calls.append(1)
        print("usage: zoo fit [-h]\n\nlive help")
        raise SystemExit(0)

    assert help_cache.serve(["fit", "--help"], live) == 0
    first = capsys.readouterr().out
    assert help_cache.serve(["fit", "--help"], live) == 0
    assert capsys.readouterr().out == first == "usage: zoo fit [-h]\n\nlive help\n" and len(calls) == 1
    monkeypatch.setenv("ZOO_HELP_CACHE", "0")  # turned off: always live
    assert help_cache.serve(["fit", "--help"], live) == 0 and len(calls) == 2


def test_a_failed_help_is_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))

    def bad() -> int:
        raise SystemExit(2)

    assert help_cache.serve(["fit", "--bad", "--help"], bad) == 2
    assert not list(tmp_path.glob("help/*.txt"))


def test_fit_help_second_call_is_the_cached_live_text_without_torch(tmp_path):
    code = ("import sys; from zoo.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    env = _env(ZOO_CACHE_DIR=str(tmp_path), COLUMNS="100")
    runs = [subprocess.run([sys.executable, "-c", code, "fit", "--help"], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=600) for _ in range(2)]
    live, cached = runs
    assert live.returncode == 0 and cached.returncode == 0, live.stderr[-2000:]
    assert "--trainer" in live.stdout and "usage: zoo [options] fit" in live.stdout
    assert live.stderr.strip().splitlines()[-1] == "True"  # the first call renders it with Lightning
    assert cached.stdout == live.stdout
    assert cached.stderr.strip().splitlines()[-1] == "False"  # the second prints it without importing torch
    assert len(list((tmp_path / "help").glob("*.txt"))) == 1


def test_lightning_chatter_is_dropped_and_real_messages_stay():
    import logging

    from zoo.cli import _DropChatter

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 1, msg, None, None)

    keep = _DropChatter().filter
    assert not keep(record("Trainer already configured with model summary callbacks: [ModelTable]. Skipping"))
    assert not keep(record("GPU available: False, used: False"))
    assert keep(record("`Trainer.fit` stopped: `max_steps=6` reached."))
