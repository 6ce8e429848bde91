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


def test_no_help_shows_an_object_repr(capsys):
    """jsonargparse prints a type given together with choices as "<function <lambda> at 0x...>": no tool may."""
    from zoo.cli import main

    for argv in [*TOOL_HELP[1:], ["scaling", "sweep", "--help"], ["scaling", "fit", "--help"]]:
        try:
            main(argv)
        except SystemExit:
            pass
        out = capsys.readouterr().out
        assert "usage:" in out and not any(bad in out for bad in ("<function", "<locals>", " at 0x")), (argv, out)


def test_a_subcommand_error_names_the_subcommand(capsys):
    from zoo.cli import main

    assert main(["scaling", "fit", "runs.csv", "--approach", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo scaling fit: error: argument --approach: invalid choice: '4'"), err
    assert err.rstrip().endswith("see zoo scaling fit --help") and len(err.strip().splitlines()) == 1, err


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
    monkeypatch.setenv("COLUMNS", "70")
    argv = ["fit", "--config", str(config), "--help"]
    key = help_cache.help_key(argv, [pkg])
    assert help_cache.help_key(argv, [pkg]) == key  # deterministic
    assert help_cache.help_key(["fit", "--help"], [pkg]) != key
    monkeypatch.setenv("COLUMNS", "60")
    assert help_cache.help_key(argv, [pkg]) != key
    monkeypatch.setenv("COLUMNS", "100")
    wide = help_cache.help_key(argv, [pkg])
    monkeypatch.setenv("COLUMNS", "200")
    assert help_cache.help_key(argv, [pkg]) == wide != key  # help is at most 80 columns wide: one key above that
    monkeypatch.setenv("COLUMNS", "70")
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

    assert help_cache.serve(["fit", "--model.help", "X"], live) == 0
    first = capsys.readouterr().out
    assert help_cache.serve(["fit", "--model.help", "X"], live) == 0
    assert capsys.readouterr().out == first == "usage: zoo fit [-h]\n\nlive help\n" and len(calls) == 1
    monkeypatch.setenv("ZOO_HELP_CACHE", "0")  # turned off: always live
    assert help_cache.serve(["fit", "--model.help", "X"], live) == 0 and len(calls) == 2


def test_a_failed_help_is_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))

    def bad() -> int:
        raise SystemExit(2)

    assert help_cache.serve(["fit", "--bad", "--help"], bad) == 2
    assert not list(tmp_path.glob("help/*.txt"))


TORCH_PROBE = ("import sys; from zoo.cli import main; rc = main(sys.argv[1:]); "
               "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")


def _zoo_in_fresh_python(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """``zoo argv`` in a fresh interpreter; its last stderr line says whether torch got imported."""
    return subprocess.run([sys.executable, "-c", TORCH_PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                          env=_env(**env), timeout=600)


def test_help_the_shipped_text_does_not_cover_is_cached_after_its_live_rendering(tmp_path):
    # 70 columns: narrower than the shipped rendering, so the first call renders live
    env = {"ZOO_CACHE_DIR": str(tmp_path), "COLUMNS": "70"}
    live, cached = (_zoo_in_fresh_python(["validate", "--help"], **env) for _ in range(2))
    assert live.returncode == 0 and cached.returncode == 0, live.stderr[-2000:]
    assert "--trainer" in live.stdout and "usage: zoo [options] validate" in live.stdout
    assert live.stderr.strip().splitlines()[-1] == "True"  # the first call renders it with Lightning
    assert cached.stdout == live.stdout
    assert cached.stderr.strip().splitlines()[-1] == "False"  # the second prints it without importing torch
    assert len(list((tmp_path / "help").glob("*.txt"))) == 1
    wrapped = [line for line in live.stdout.splitlines() if line.startswith(" " * 20) and line.strip()[:1] != "["]
    assert max(map(len, wrapped)) <= 70  # argparse wrapped the option texts to the terminal's width


def _write_package(root: Path, text: str = "x = 1\n") -> Path:
    pkg = root / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "mod.py").write_text(text)
    return pkg


def _ship_fake(folder: Path, pkg: Path, **manifest_changes) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "fit.txt").write_text("usage: zoo [options] fit\nshipped\n")
    manifest = {**help_cache.expected_manifest([pkg]), "commands": {"fit": "fit.txt"}, **manifest_changes}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_shipped_help_is_printed_only_for_the_environment_and_source_it_was_rendered_for(tmp_path, monkeypatch):
    for var in [k for k in os.environ if k.startswith(("JSONARGPARSE", "LIGHTNING"))]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(help_cache, "gpu_visible", lambda: False)
    monkeypatch.setenv("COLUMNS", "120")  # wider terminals get the 80-column text
    pkg, folder = _write_package(tmp_path), tmp_path / "help"
    _ship_fake(folder, pkg)

    def shipped(argv=("fit", "--help")):
        return help_cache.shipped_text(list(argv), folder, [pkg])

    assert shipped() == "usage: zoo [options] fit\nshipped\n" and shipped(("fit", "-h")) == shipped()
    assert shipped(("fit", "--config", "c.yaml", "--help")) is None  # only the bare request is shipped
    assert shipped(("test", "--help")) is None  # not in this manifest
    monkeypatch.setenv("COLUMNS", "79")
    assert shipped() is None  # narrower than the rendering
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("LIGHTNING_SOMETHING", "1")
    assert shipped() is None  # an environment variable that can change defaults
    monkeypatch.delenv("LIGHTNING_SOMETHING")
    monkeypatch.setattr(help_cache, "gpu_visible", lambda: True)
    assert shipped() is None  # the Trainer's defaults differ with a GPU
    monkeypatch.setattr(help_cache, "gpu_visible", lambda: False)
    (pkg / "mod.py").write_text("x = 2\n")
    assert shipped() is None  # an edited source
    (pkg / "mod.py").write_text("x = 1\n")
    assert shipped() is not None  # contents, not modification times, are compared
    versions = {**help_cache.environment()["versions"], "lightning": "0.0.1"}
    _ship_fake(folder, pkg, versions=versions)
    assert shipped() is None  # another Lightning
    _ship_fake(folder, pkg, python="2.7")
    assert shipped() is None
    (folder / "manifest.json").write_text("{not json")
    assert shipped() is None


def test_gpu_visibility_follows_the_variables_that_hide_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not help_cache.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not help_cache.gpu_visible()


def test_live_help_is_wrapped_to_at_most_80_columns(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")

    def live() -> int:
        print(f"usage: width {shutil.get_terminal_size().columns}")
        return 0

    assert help_cache.serve(["fit", "--model.help", "X"], live) == 0
    assert capsys.readouterr().out == "usage: width 80\n"
    assert os.environ["COLUMNS"] == "200"  # restored


def test_shipped_help_is_current_and_is_what_lightning_prints(tmp_path):
    """The shipped texts were rendered from this source tree; in this environment the first `zoo fit --help`
    prints the shipped text without importing torch, and that text is exactly Lightning's live rendering."""
    manifest = help_cache.shipped_manifest()
    assert manifest is not None, f"zoo/cli/help/manifest.json is missing; run {help_cache.REFRESH_COMMAND}"
    expected = help_cache.expected_manifest()
    assert manifest["source"] == expected["source"], (
        f"the shipped help predates an edit to our sources; run {help_cache.REFRESH_COMMAND} and commit zoo/cli/help")
    assert sorted(manifest["commands"]) == sorted(help_cache.SHIPPED_COMMANDS)
    env = {"ZOO_CACHE_DIR": str(tmp_path), "COLUMNS": "80", "CUDA_VISIBLE_DEVICES": ""}
    first = _zoo_in_fresh_python(["fit", "--help"], **env)
    assert first.returncode == 0, first.stderr[-2000:]
    shipped = (help_cache.SHIPPED_DIR / manifest["commands"]["fit"]).read_text()
    same_environment = {k: manifest[k] for k in ("python", "versions")} == {
        k: expected[k] for k in ("python", "versions")}
    if same_environment:
        assert first.stdout == shipped and first.stderr.strip().splitlines()[-1] == "False"
    else:  # another torch / Lightning / Python: the shipped text is not trusted, the help is rendered live
        assert first.stderr.strip().splitlines()[-1] == "True"
    live = _zoo_in_fresh_python(["fit", "--help"], **env, ZOO_HELP_CACHE="0")
    assert live.returncode == 0 and live.stderr.strip().splitlines()[-1] == "True"
    assert first.stdout == live.stdout
    if same_environment:
        assert live.stdout == shipped


def test_lightning_chatter_is_dropped_and_real_messages_stay():
    import logging

    from zoo.cli import _DropChatter

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 1, msg, None, None)

    keep = _DropChatter().filter
    assert not keep(record("Trainer already configured with model summary callbacks: [ModelTable]. Skipping"))
    assert not keep(record("GPU available: False, used: False"))
    assert not keep(record("`Trainer.fit` stopped: `max_steps=6` reached."))  # RunSummary says why it stopped
    # the process-group banner of a DDP / FSDP start, on every rank
    assert not keep(record("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2"))
    assert not keep(record("-" * 100 + "\ndistributed_backend=gloo\nAll distributed processes registered."))
    assert not keep(record("[rank: 1] Seed set to 0"))
    assert keep(record("[rank: 1] Restoring states from the checkpoint path at x.ckpt"))
    assert keep(record("Restoring states from the checkpoint path at runs/x/checkpoints/last.ckpt"))
