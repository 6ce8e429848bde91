"""Issue 27's audit, the classes it fixed: a refused start leaves no folder (the model's own inputs and the data's
image sizes are checked in the preflight), ``load_backbone`` refuses integer and NaN/Inf weights like the LM and HF
loaders (encoder and classifier), and every ``head=True`` refusal names the file."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.train.errors import UsageError

sys.path.insert(0, str(Path(__file__).parent))
from test_multimodal import OVERRIDES, module  # noqa: E402

torch.set_num_threads(1)


def _fit_refused(tmp_path: Path, lit, dm, match: str) -> None:
    """``ZooTrainer.fit`` refuses in one line and leaves no output folder (not even the root)."""
    from zoo.train.trainer import build_trainer

    root = tmp_path / "run"
    trainer = build_trainer(default_root_dir=str(root), max_steps=1, accelerator="cpu", enable_progress_bar=False)
    with pytest.raises(UsageError, match=match) as err:
        trainer.fit(lit, datamodule=dm)
    assert "\n" not in str(err.value)
    assert not root.exists(), sorted(p.name for p in root.rglob("*"))


def _lm_checkpoint(path: Path) -> Path:
    from lm_testutil import TINY

    torch.save({"state_dict": {f"model.{k}": v for k, v in zoo.create("gemma2-tiny", **TINY).state_dict().items()},
                "zoo": {"format": 1, "kind": "lm"}, "hyper_parameters": {"model": "gemma2-tiny"}}, path)
    return path


@pytest.mark.parametrize("case", ["missing", "lm-checkpoint", "folder", "integer"])
def test_unusable_encoder_weights_refused_before_any_folder(tmp_path, case):
    from zoo.data.interleaved import InterleavedDataModule
    from zoo.weights.safe_load import write_safetensors

    if case == "missing":
        path, match = tmp_path / "nope.ckpt", "does not exist"
    elif case == "lm-checkpoint":
        path, match = _lm_checkpoint(tmp_path / "lm.ckpt"), "language-model checkpoint"
    elif case == "folder":
        path, match = tmp_path, "encoder_weights"
        (tmp_path / "readme.txt").write_text("no weights here")
    else:
        enc = zoo.create("convnet_tiny", **OVERRIDES["encoder_overrides"])
        sd = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in enc.state_dict().items()}
        meta = {"format": "zoo-backbone", "arch": "convnet_tiny", "arch_overrides": OVERRIDES["encoder_overrides"]}
        path, match = write_safetensors(tmp_path / "int.safetensors", sd, meta), "is int64 but the model holds"
    dm = InterleavedDataModule(train_size=32, val_size=12, batch_size=4)
    _fit_refused(tmp_path, module(encoder_weights=str(path)), dm, match)


def test_interleaved_images_of_another_size_refused_before_any_folder(tmp_path):
    from zoo.data.interleaved import InterleavedDataModule

    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for c in ("1", "2"):
            (root / split / c).mkdir(parents=True)
            for i, (size, fmt) in enumerate([(32, "PNG"), (32, "JPEG"), (40 if split == "val" else 32, "WEBP")]):
                Image.fromarray(np.full((size, size, 3), 99, np.uint8)).save(
                    root / split / c / f"{i}.{fmt.lower()}", fmt)
    dm = InterleavedDataModule(dataset=f"imagefolder:{root}", resize=False, train_size=32, val_size=12, batch_size=4)
    _fit_refused(tmp_path, module(), dm, r"val/1/2.webp is 40x40 but the encoder takes 32x32")
    dm.resize = True  # resized, the same folder is accepted by the check
    dm.check_data()


def test_load_backbone_refuses_integer_and_nonfinite_weights(tmp_path):
    """Encoder tensors and the classifier of head=True, through every file kind the plain path reads."""
    import torchvision

    sd = torchvision.models.resnet18(num_classes=3).state_dict()
    for how, match in (("int", "is int64 but the model holds float32"), ("nan", "NaN/Inf")):
        for key in ("layer1.0.conv1.weight", "fc.weight"):
            bad = dict(sd)
            bad[key] = torch.zeros(sd[key].shape, dtype=torch.int64) if how == "int" else \
                sd[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
            path = tmp_path / f"{how}_{key}.pth"
            torch.save(bad, path)
            with pytest.raises(ValueError, match=match) as err:
                zoo.load_backbone(path, arch="resnet18", head=key.startswith("fc"))
            named = "classifier.weight" if key.startswith("fc") else key
            assert str(path) in str(err.value) and repr(named) in str(err.value) and "\n" not in str(err.value)


def _small_release(path: Path, classifier: dict | None) -> None:
    from torchvision.models.resnet import Bottleneck, ResNet

    from test_official_byol import _ByolExperimentState, _install_fake_modules, to_haiku

    op, os_ = to_haiku(ResNet(Bottleneck, [1, 1, 1, 1]), "res_net50")
    if classifier is not None:
        op = {**op, "classifier": classifier}
    with pytest.MonkeyPatch.context() as mp:
        _install_fake_modules(mp)
        with open(path, "wb") as f:
            pickle.dump({"experiment_state": _ByolExperimentState(op, op, os_, os_, ()), "step": 1,
                         "rng": np.zeros(2, np.uint32)}, f, protocol=2)


@pytest.mark.parametrize("classifier, match", [
    (None, "no 'classifier' module"),
    ({"w": np.zeros(5, np.float32)}, "a Haiku linear weight is 2-D"),
    ({"w": np.zeros((2048, 3), np.int64)}, "is int64 but the model holds float32"),
    ({"w": np.full((2048, 3), np.inf, np.float32), "b": np.zeros(3, np.float32)}, "NaN/Inf"),
])
def test_official_release_head_refusals_name_the_file(tmp_path, classifier, match):
    from torchvision.models.resnet import Bottleneck, ResNet

    path = tmp_path / "release.pkl"
    _small_release(path, classifier)
    arch = ResNet(Bottleneck, [1, 1, 1, 1])
    arch.fc = torch.nn.Identity()
    with pytest.raises(ValueError, match=match) as err:
        zoo.load_backbone(path, arch=arch, head=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["hardlink", "folder", "fifo", "symlink-to-folder"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_nothing_is_written(tmp_path, kind):
    import os

    from zoo.files import LOCK_NAME, LockRefused, RunLock

    target, lock = tmp_path / "precious.txt", tmp_path / "run" / LOCK_NAME
    target.write_text("keep me")
    lock.parent.mkdir()
    {"hardlink": lambda: os.link(target, lock), "folder": lock.mkdir, "fifo": lambda: os.mkfifo(lock),
     "symlink-to-folder": lambda: lock.symlink_to(tmp_path)}[kind]()
    with pytest.raises(LockRefused, match="remove it") as err:
        RunLock(lock.parent).acquire()
    assert str(lock) in str(err.value) and "\n" not in str(err.value)
    assert target.read_text() == "keep me" and os.path.lexists(lock)


@pytest.mark.parametrize("name", ["torch_set_dag_key.pt", "torch_bytearray_size.pt", "torch_deflated_storage.pt",
                                  "torch_encode_amplify.pt", "torch_zip_os_system.pt", "zip_garbage.pt"])
def test_zoo_fit_ckpt_path_of_a_hostile_file_is_one_line_before_lightning_reads_it(tmp_path, capsys, name):
    """LightningCLI reads --ckpt_path's hyper-parameters with its own torch.load before any of our code: the safe
    loader's dry run comes first (a tuple-DAG key would hang that load, a bytearray bomb allocate 1 GB)."""
    import hostile_files

    from zoo.cli import main

    files = dict(hostile_files.hostile_files(tmp_path / "files", tmp_path / "pwned"))
    config = Path(__file__).resolve().parents[1] / "configs" / "lm" / "stdlib_gemma2_tiny.yaml"
    code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--ckpt_path", str(files[name])])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and str(files[name]) in lines[0], lines
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()
