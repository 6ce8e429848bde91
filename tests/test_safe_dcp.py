"""Sharded (DCP) checkpoint folders are read through one allow-list reader (zoo.weights.safe_dcp) on every path:
``zoo consolidate``, ``zoo.load_lm``, ``zoo export-hf`` and a sharded ``--ckpt_path`` resume. A crafted folder is
refused in one line naming the global (or the shard); no pickled code runs."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hostile_dcp as H
import zoo
from lm_testutil import TINY

ROOT = Path(__file__).resolve().parents[1]


def _reference_model() -> torch.nn.Module:
    """The weights ``hostile_dcp.lm_checkpoint_folder`` saves (same seed, same single AdamW step)."""
    torch.manual_seed(0)
    model = zoo.create(H.MODEL, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 200, (1, 8))).float().mean().backward()
    opt.step()
    return model.eval()


def test_the_allow_list_is_exactly_what_dcp_writes(tmp_path):
    """Every global a real DCP save (model + AdamW state + Python values) puts in .metadata is allowed, and the
    folder reads back to the saved weights and optimizer values."""
    from zoo.weights.safe_dcp import ALLOWED, read_sharded_checkpoint

    folder = H.lm_checkpoint_folder(tmp_path / "last.ckpt")
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            if (module, name) not in ALLOWED:
                raise AssertionError(f"DCP wrote {module}.{name}, which the reader refuses")
            return ALLOWED[(module, name)]

    with open(folder / ".metadata", "rb") as f:
        Recorder(f).load()
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in seen
    # nothing outside torch's checkpoint classes, torch.Size/dtypes/layout and the path of the checkpoint id
    assert all(m.startswith(("torch", "pathlib")) for m, _ in ALLOWED)

    ckpt = read_sharded_checkpoint(folder)
    assert ckpt["zoo"]["model"] == H.MODEL and ckpt["global_step"] == 1
    ref = _reference_model()
    for name, value in ref.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"model.{name}"], value), name
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["lr"] == 1e-3  # byte items, read with weights_only=True
    x = torch.randint(0, 259, (1, 8))
    torch.testing.assert_close(zoo.load_lm(str(folder))(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(zoo.load_lm(str(folder.parent))(x), ref(x), rtol=0, atol=0)  # the run folder too


def _consolidate_cli(folder: Path, tmp: Path, capsys) -> tuple[int, str]:
    from lm.cli.consolidate import main as consolidate_main

    code = consolidate_main([str(folder), "--out", str(tmp / "out.ckpt")])
    return code, capsys.readouterr().err


def _export_hf_cli(folder: Path, tmp: Path, capsys) -> tuple[int, str]:
    from zoo.weights.hf_cli import main

    code = main([str(folder), "--out", str(tmp / "hf")])
    return code, capsys.readouterr().err


def _raises(fn) -> tuple[int, str]:
    from zoo.weights.safe_load import UnreadableFileError

    with pytest.raises(UnreadableFileError) as err:
        fn()
    return 2, f"error: {err.value}\n"


READERS = {
    "zoo consolidate": _consolidate_cli,
    "zoo export-hf": _export_hf_cli,
    "zoo.load_lm": lambda folder, tmp, capsys: _raises(lambda: zoo.load_lm(str(folder))),
    # what FSDP2Strategy.load_checkpoint (a sharded --ckpt_path resume) calls
    "resume": lambda folder, tmp, capsys: _raises(lambda: _load_sharded(folder)),
}


def _load_sharded(folder: Path) -> None:
    from lm.parallel.sharding import load_sharded

    module = torch.nn.ModuleDict({"model": zoo.create(H.MODEL, **TINY)})  # keys "model.*", as a LightningModule's
    load_sharded(folder, module, [torch.optim.AdamW(module.parameters())])


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("variant", sorted(H.HOSTILE))
def test_every_reader_refuses_a_hostile_folder_in_one_line(tmp_path, capsys, reader, variant):
    folder, marker, expect = H.hostile_folder(tmp_path, variant)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    code, err = READERS[reader](folder, tmp_path, capsys)
    assert not marker.exists(), f"{reader} ran code from a crafted folder ({variant})"
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], (expect, lines[0])
    if variant in H.CODE_EXECUTION:
        assert "references" in lines[0] or "not allowed" in lines[0], lines[0]
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "hf" / "model.safetensors").exists()
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_consolidate_refuses_an_out_that_is_a_folder_or_inside_the_input(tmp_path, capsys):
    """``--out`` an existing folder, the input folder itself, or any path inside it: one line, exit 2, the shards
    untouched; a plain file next to the folder is written."""
    from lm.cli.consolidate import main as consolidate_main

    folder = H.lm_checkpoint_folder(tmp_path / "last.ckpt")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    (tmp_path / "somewhere").mkdir()
    shard = next(folder.glob("*.distcp"))
    for out, says in ((tmp_path / "somewhere", "is an existing folder"), (folder, "inside the input folder"),
                      (shard, "inside the input folder"), (folder / "meta.pt", "inside the input folder"),
                      (folder / "new.ckpt", "inside the input folder"),
                      (folder / ".." / folder.name / "x.ckpt", "inside the input folder")):
        assert consolidate_main([str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("zoo consolidate: error: --out ") and says in err[0], err
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert consolidate_main([str(folder), "--out", str(tmp_path / "one.ckpt")]) == 0
    ckpt = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["optimizer_states"][0]["state"]


def test_a_sharded_resume_of_a_hostile_folder_stops_before_training_in_one_line(tmp_path):
    """``zoo fit --trainer.strategy fsdp2 --ckpt_path <crafted folder>``: exit 2, one line naming the global, no
    code run, no training step."""
    import yaml

    from lm_testutil import tiny_corpus

    folder, marker, expect = H.hostile_folder(tmp_path, "metadata-os.system")
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "fsdp2", "max_steps": 2, "logger": False,
                       "limit_val_batches": 0, "enable_progress_bar": False, "default_root_dir": str(run)},
           "model": {"class_path": "lm.CausalLM", "init_args": {"model": H.MODEL, "model_overrides": TINY}},
           "data": {"class_path": "zoo.data.text.TextDataModule", "init_args": {
               "paths": str(tiny_corpus(tmp_path / "corpus")), "seq_len": 32, "batch_size": 2,
               "cache_dir": str(tmp_path / "cache"), "progress": False}}}
    (run / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", str(run / "cfg.yaml"),
                           "--ckpt_path", str(folder)], cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("zoo fit: error: ") and expect in errors[0], done.stderr[-2000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_no_other_reader_of_distributed_checkpoints_in_the_source():
    """torch's DCP readers (FileSystemReader, dcp.load, dcp_to_torch_save, the default planners) are used only inside
    zoo/weights/safe_dcp.py, which subclasses them with the allow-list."""
    import re

    offenders = []
    pattern = re.compile(r"FileSystemReader|dcp_to_torch_save|checkpoint\.load\(|dcp\.load\(|_load_state_dict\(|"
                         r"DefaultLoadPlanner|_EmptyStateDictLoadPlanner|\.metadata\b")
    for path in [*ROOT.glob("zoo/**/*.py"), *ROOT.glob("byol/**/*.py"), *ROOT.glob("lm/**/*.py"),
                 *ROOT.glob("simsiam/**/*.py")]:
        if path.relative_to(ROOT).as_posix() == "zoo/weights/safe_dcp.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "importlib.metadata" not in code and "f.metadata()" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
