"""WebDataset shards (zoo.data.shards, zoo data pack): pack -> read equals the folder, shards written by other tools,
bad input skipped and counted or refused in one line, per-rank sharding and an exact mid-epoch resume."""
from __future__ import annotations

import io
import json
import re
import logging
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from local_http import serve
from augment.decode import decode_batch
from zoo.data.images import build_dataset, collate_images
from zoo.data.loaders import EpochShuffleSampler, ImageDataModule, collate_with_paths
from zoo.data.pack_cli import main as data_main
from zoo.data.shards import ShardDataset, expand_braces, split_key


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def packed(tiny_imagefolder, tmp_path) -> Path:
    out = tmp_path / "shards"
    assert data_main(["pack", f"imagefolder:{tiny_imagefolder}", "--out", str(out), "--shard_size", "8KB"]) == 0
    return out


def jpeg(seed: int, mode: str = "RGB", size=(20, 14), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> Path:
    """A shard as another tool writes it (Python's default PAX format unless told)."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_brace_expansion_and_key_split():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("{x}.tar") == ["{x}.tar"]
    assert split_key("dir/n01_1.seg.png") == ("dir/n01_1", "seg.png")
    assert split_key("noext") is None and split_key(".hidden.jpg") is None


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_pack_then_read_equals_the_folder(tiny_imagefolder, packed, decode):
    assert json.loads((packed / "classes.json").read_text()) == ["n01440764", "n01443537", "n01484850"]
    assert len(list((packed / "train").glob("*.tar"))) > 1  # 8 KB shards: several
    for split in ("train", "val"):
        folder = build_dataset(f"imagefolder:{tiny_imagefolder}", split, decode=decode)
        shards = build_dataset(f"wds:{packed}", split, decode=decode)
        assert isinstance(shards, ShardDataset) and len(shards) == len(folder) and shards.classes == folder.classes
        for i in range(len(folder)):
            (a, ya, _), (b, yb, where) = folder[i], shards[i]
            assert ya == yb and torch.equal(a, b), where
    # the same shards by brace pattern with {split}
    n = len(list((packed / "train").glob("*.tar")))
    pattern = f"wds:{packed}/{{split}}/{{split}}-{{000000..{n - 1:06d}}}.tar"
    assert len(build_dataset(pattern, "train")) == 18


def test_pack_is_resumable_verified_and_reports_progress(tiny_imagefolder, packed, capsys):
    shards = sorted((packed / "train").glob("*.tar"))
    shards[1].unlink()
    capsys.readouterr()
    assert data_main(["pack", f"imagefolder:{tiny_imagefolder}", "--out", str(packed), "--shard_size", "8KB"]) == 0
    out, err = capsys.readouterr()
    assert f"18 samples in {len(shards)} shards (1 written, {len(shards) - 1} already there" in out
    assert "pack train" in err and "verify train" in err  # progress lines off a terminal
    # a shard damaged after packing fails verification: one line, exit 2
    data = bytearray(shards[2].read_bytes())
    data[1024 + 100] ^= 0xFF  # inside the first image member
    shards[2].write_bytes(bytes(data))
    assert data_main(["pack", f"imagefolder:{tiny_imagefolder}", "--out", str(packed), "--shard_size", "8KB"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("pack ", "verify "))]
    assert len(err) == 1 and "failed verification" in err[0] and shards[2].name in err[0]
    # another --shard_size for the same output folder is refused, not mixed
    assert data_main(["pack", f"imagefolder:{tiny_imagefolder}", "--out", str(packed), "--shard_size", "1MB"]) == 2
    assert "another --shard_size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["pack", "imagefolder:/nonexistent", "--out", "X"], "/nonexistent"),
    (["pack", "cifar10:/x", "--out", "X"], "imagefolder:<root>"),
    (["pack", "imagefolder:/x", "--out", "X", "--shard_size", "lots"], "--shard_size 'lots'"),
    (["pack", "imagefolder:/x"], "required: out"),
    (["unpack"], "unknown subcommand"),
])
def test_pack_bad_arguments_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err


def test_shards_written_by_other_tools(tmp_path):
    """GNU tar from files on disk, and Python's PAX tarfile with 150-byte names, members in any order, extra members."""
    src = tmp_path / "files"
    src.mkdir()
    for k in range(3):
        (src / f"s{k}.jpg").write_bytes(jpeg(k))
        (src / f"s{k}.cls").write_text(f"{k}\n")
        (src / f"s{k}.json").write_text("{}")
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu-000.tar"), "-C", str(src), *sorted(p.name for p in src.iterdir())],
                   check=True)
    long = "d" * 60 + "/" + "e" * 90
    write_tar(tmp_path / "gnu-001.tar", [(f"{long}.cls", b"1"), (f"{long}.JPG", jpeg(9)), ("other.txt", b"x")])
    ds = build_dataset(f"wds:{tmp_path}/gnu-{{000..001}}.tar", "train")
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 2, 1] and ds.classes == ["0", "1", "2"]
    assert ds.key(3) == long and ds[3][0].shape == (3, 14, 20)
    assert ds.problems == {}
    # a glob works as well as braces
    assert len(build_dataset(f"wds:{tmp_path}/gnu-*.tar", "train")) == 4


def test_bad_shards_are_skipped_and_counted(tmp_path, caplog):
    good = [(f"a{k}.jpg", jpeg(k)) for k in range(4)] + [(f"a{k}.cls", str(k % 2).encode()) for k in range(4)]
    write_tar(tmp_path / "s-0.tar", good)
    write_tar(tmp_path / "s-1.tar", [("nocls.jpg", jpeg(5)), ("badcls.jpg", jpeg(6)), ("badcls.cls", b"cat"),
                                     ("neg.png", jpeg(7, fmt="PNG")), ("neg.cls", b"-3"), ("ok.png", jpeg(8, fmt="PNG")),
                                     ("ok.cls", b"1")])
    full = write_tar(tmp_path / "full.tar", [m for k in range(3) for m in ((f"t{k}.jpg", jpeg(10 + k, size=(64, 64))),
                                                                            (f"t{k}.cls", b"0"))])
    data = full.read_bytes()
    (tmp_path / "s-2.tar").write_bytes(data[: len(data) * 2 // 3])  # cut inside the last samples
    full.unlink()
    (tmp_path / "s-3.tar").write_bytes(b"")  # 0 bytes
    (tmp_path / "s-4.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)  # not a tar (gzip magic)
    with caplog.at_level(logging.WARNING, logger="zoo.data.shards"):
        ds = build_dataset(f"wds:{tmp_path}/s-{{0..4}}.tar", "train")
    kept = [ds.key(i) for i in range(len(ds))]
    assert kept[:5] == ["a0", "a1", "a2", "a3", "ok"] and 5 < len(kept) < 8  # complete samples before the cut kept
    assert set(ds.problems) == {"no_cls", "bad_cls", "truncated", "unreadable"}
    assert ds.problems["bad_cls"] == ["s-1.tar:2"] and ds.problems["unreadable"] == ["s-3.tar:1", "s-4.tar:1"]
    [line] = [r.getMessage() for r in caplog.records]
    assert "1 samples without .cls" in line and "2 truncated" not in line and "s-2.tar" in line
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == [] and len(batch["label"]) == len(ds)


def test_patterns_that_match_nothing_and_all_bad_shards_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_dataset(f"wds:{tmp_path}/none-*.tar", "train")
    with pytest.raises(FileNotFoundError, match=r"shard .*x-002.tar does not exist"):
        (tmp_path / "x-001.tar").write_bytes(b"")
        build_dataset(f"wds:{tmp_path}/x-{{001..002}}.tar", "train")
    (tmp_path / "x-002.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no usable samples .* unreadable or empty shards"):
        build_dataset(f"wds:{tmp_path}/x-{{001..002}}.tar", "train")
    with pytest.raises(FileNotFoundError, match=r"expected <dir>/train/\*.tar"):
        build_dataset(f"wds:{tmp_path}", "train")
    dm = ImageDataModule(f"wds:{tmp_path}/none-{{0..3}}.tar", batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"data.dataset=.*cannot be read: shard .*none-0.tar does not exist"):
        dm.check_data()


def test_mixed_image_modes_and_corrupt_members_in_a_shard(tmp_path):
    rgba = jpeg(1, "RGBA", fmt="PNG")
    grey = jpeg(2, "L")
    cmyk = jpeg(3, "CMYK")
    pal = jpeg(4, "P", fmt="GIF")
    deep = io.BytesIO()
    Image.fromarray((np.arange(14 * 20, dtype=np.uint16).reshape(14, 20) * 200)).save(deep, format="PNG")
    members = [("rgba.png", rgba), ("grey.jpg", grey), ("cmyk.jpg", cmyk), ("pal.gif", pal), ("deep.png", deep.getvalue()),
               ("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("empty.jpg", b"")]
    write_tar(tmp_path / "m.tar", members + [(n.split(".")[0] + ".cls", b"0") for n, _ in members])
    ds = build_dataset(f"wds:{tmp_path}/m.tar", "train")
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert sorted(p.rsplit(":", 1)[1] for p in batch["skipped"]) == ["broken", "empty"]
    assert all(p.startswith(str(tmp_path / "m.tar")) for p in batch["skipped"])
    assert all(im.dtype == torch.uint8 and im.shape == (3, 14, 20) for im in batch["image"])
    assert len(batch["image"]) == 5


def test_a_shard_that_vanishes_or_shrinks_after_indexing_is_named(tmp_path):
    write_tar(tmp_path / "v-0.tar", [("a.jpg", jpeg(0)), ("a.cls", b"0")])
    write_tar(tmp_path / "v-1.tar", [("b.jpg", jpeg(1)), ("b.cls", b"1")])
    ds = build_dataset(f"wds:{tmp_path}/v-{{0..1}}.tar", "train", decode="device")
    (tmp_path / "v-0.tar").unlink()
    (tmp_path / "v-1.tar").write_bytes((tmp_path / "v-1.tar").read_bytes()[:700])
    batch = collate_with_paths([ds[0], ds[1]])
    assert batch["skipped"] == [f"{tmp_path}/v-0.tar:a", f"{tmp_path}/v-1.tar:b"]


def test_ranks_take_disjoint_shares_of_one_seeded_order(packed):
    ds = build_dataset(f"wds:{packed}", "train", decode="device")
    names = []
    for rank in range(2):
        sampler = EpochShuffleSampler(len(ds), seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        names.append([ds.where(i) for i in sampler])
    assert len(names[0]) == len(names[1]) == 9 and not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == sorted(ds.where(i) for i in range(len(ds)))


def test_plain_pattern_trains_without_validation_and_probe_refuses_val_in_one_line(packed):
    pattern = f"wds:{packed}/train/train-*.tar"
    dm = ImageDataModule(pattern, batch_size=6, num_workers=0, decode="device")
    dm.check_data()
    assert dm.val_set is None and dm.val_dataloader() == [] and len(dm.train_set) == 18
    with pytest.raises(ValueError, match=r"names the training shards only; .*\{split\}"):
        build_dataset(pattern, "val")


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_mid_epoch_resume_on_shards_is_bit_exact(packed, tmp_path, decode, monkeypatch):
    """zoo fit on shards (3 batches per epoch), SIGTERM at step 4 (epoch 1, batch 1), --ckpt_path last: the final
    weights, optimizer state and loss trace equal the run left alone. ``device``: raw bytes decoded one step ahead
    (zoo.data.prefetch, with its CPU stand-in for the GPU decoder)."""
    from test_resume import CONFIG, assert_same_tree, last, loss_trace, zoo_fit

    if decode == "device":
        import zoo.data.prefetch

        decoder = zoo.data.prefetch.DeviceDecoder
        monkeypatch.setattr(zoo.data.prefetch, "cuda_decode_available", lambda device: True)
        monkeypatch.setattr(zoo.data.prefetch, "DeviceDecoder", lambda device, buffers: decoder("cpu"))
    steps = 6
    CONFIG_SHARDS = {**CONFIG, "trainer": {**CONFIG["trainer"], "max_steps": steps, "limit_train_batches": 3},
                     "data": {"class_path": "zoo.data.ImageDataModule", "init_args": {
                         "dataset": f"wds:{packed}", "batch_size": 6, "num_workers": 0, "decode": decode}}}
    import test_resume

    saved = test_resume.CONFIG
    test_resume.CONFIG = CONFIG_SHARDS
    try:
        ref = zoo_fit(tmp_path / "ref")
        root = tmp_path / "preempted"
        with pytest.raises(SystemExit):
            zoo_fit(root, callbacks=[{"class_path": "fault_callbacks.SigtermAt", "init_args": {"step": 4}}])
        assert last(root)["global_step"] == 4
        resumed = zoo_fit(root, "--ckpt_path", "last")
    finally:
        test_resume.CONFIG = saved
    assert resumed.trainer.global_step == steps
    assert_same_tree(ref.model.state_dict(), resumed.model.state_dict(), "model")
    assert_same_tree(last(tmp_path / "ref")["optimizer_states"], last(root)["optimizer_states"], "optimizer")
    assert loss_trace(root) == loss_trace(tmp_path / "ref")


def test_http_and_pipe_shards_are_fetched_once_then_read_locally(tmp_path):
    import functools
    import http.server
    
    served = tmp_path / "served"
    served.mkdir()
    write_tar(served / "r-0.tar", [("a.jpg", jpeg(0)), ("a.cls", b"2")])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    with serve(handler) as base:
        ds = build_dataset(f"wds:{base}/r-{{0..0}}.tar", "train")
        assert len(ds) == 1 and ds.labels.tolist() == [2] and ds[0][0].shape == (3, 14, 20)
        assert Path(ds.shards[0]).parent == tmp_path / "cache" / "shards"
    ds = build_dataset(f"wds:pipe:cat {served}/r-0.tar", "train")
    assert len(ds) == 1 and ds.key(0) == "a"
    with pytest.raises(FileNotFoundError, match="cannot fetch shard 'pipe:false': the command failed"):
        build_dataset("wds:pipe:false", "train")


def test_a_worker_that_fails_names_the_shard(packed, monkeypatch):
    import augment.decode

    def boom(*a, **k):
        raise MemoryError("out of memory")

    monkeypatch.setattr(augment.decode, "decode_batch", boom)
    ds = build_dataset(f"wds:{packed}", "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_with_paths)
    with pytest.raises(RuntimeError, match=r"reading .*train-000000.tar:n01440764_0 failed: MemoryError"):
        next(iter(loader))


def test_spawned_workers_map_the_shard_index_and_the_cli_parser_imports_no_torch(packed, tmp_path):
    import os
    import pickle
    import sys
    import time

    t = time.time() - 60
    for shard in (packed / "train").glob("*.tar"):
        os.utime(shard, (t, t))
    ds = build_dataset(f"wds:{packed}", "train", decode="device")
    assert ds.source is not None and len(pickle.dumps(ds)) < 4000  # paths and names only, no per-sample arrays
    back = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(back.labels, ds.labels) and back.where(5) == ds.where(5) and torch.equal(back[5][0], ds[5][0])
    code = "import sys, zoo.data.pack_cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_zoo_probe_reads_shards(packed, tmp_path):
    from zoo.eval.probe_cli import main as probe_main
    from zoo.weights.export import export_backbone

    ckpt = tmp_path / "enc.safetensors"
    export_backbone("random:convnet_tiny", ckpt)
    out = tmp_path / "knn"
    n = len(list((packed / "val").glob("*.tar")))
    assert probe_main(["--backbone", str(ckpt), "--image-size", "32", "--resize", "36", "--num-workers", "0",
                       "--cache-dir", str(tmp_path / "fcache"), "--no-progress", "--batch-size", "8",
                       "--data", f"wds:{packed}/{{split}}/{{split}}-*.tar", "--mode", "knn", "--k", "3",
                       "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"]["train"] == 18 and n >= 1 and m["dataset"].startswith("wds:")


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_worker_killed_by_a_signal_names_the_shard(packed, monkeypatch, prefetch):
    """SIGKILL (the OOM killer's signal) in the worker reading one sample: the error names that sample's shard."""
    import os
    import signal
    import types

    from zoo.data.loaders import resumable_loader
    import zoo.data.prefetch

    ds = build_dataset(f"wds:{packed}", "train", decode="device")
    victim = ds.where(3)
    real = ShardDataset._item

    def deadly(self, i):
        if self.where(i) == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(ShardDataset, "_item", deadly)
    if prefetch:  # the same through the decode-ahead thread (its CPU stand-in)
        decoder = zoo.data.prefetch.DeviceDecoder
        monkeypatch.setattr(zoo.data.prefetch, "cuda_decode_available", lambda device: True)
        monkeypatch.setattr(zoo.data.prefetch, "DeviceDecoder", lambda device, buffers: decoder("cpu"))
    loader = resumable_loader(types.SimpleNamespace(trainer=None), ds, 2, train=False, num_workers=1,
                              collate_fn=collate_with_paths, decode_device="cuda" if prefetch else None)
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*while reading " + re.escape(victim)):
        for _ in loader:
            pass


def _writer_tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> Path:
    """What webdataset's TarWriter writes: members ``key + "." + field`` in sorted field order, mode 0444, ustar/GNU
    headers (its default tarfile format), uname/gname "bigdata", mtime set."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for key, img, cls in samples:
            for field, data in sorted({"cls": cls, "jpg": img}.items()):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 1.7e9, "bigdata", "bigdata"
                tf.addfile(info, io.BytesIO(data))
    return path


def test_keys_with_dots_nested_folders_and_newlines_as_other_tools_write_them(tmp_path):
    """Keys with dots (webdataset splits at the first dot of the basename), members in nested folders, names over 100
    bytes (GNU long-name headers), .cls with a trailing newline: from a TarWriter-like tar and GNU tar of a tree."""
    samples = [("n01/img.0001", jpeg(1), b"2\n"), ("n01/img.0002", jpeg(2), b"0\n"), ("a.b/c/plain", jpeg(3), b" 1 \n"),
               ("deep/x/y/z/q.v2.final", jpeg(4), b"1"), ("L" * 60 + "/" + "m" * 70 + ".k", jpeg(5), b"2\r\n")]
    _writer_tar(tmp_path / "w-0.tar", samples)
    src = tmp_path / "tree"
    for key, img, cls in samples:
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{src / key}.jpg").write_bytes(img)
        Path(f"{src / key}.cls").write_bytes(cls)
    subprocess.run(["tar", "-cf", str(tmp_path / "w-1.tar"), "-C", str(src), "."], check=True)  # ./n01/..., dirs too
    for shard, prefix in (("w-0.tar", ""), ("w-1.tar", "./")):
        ds = build_dataset(f"wds:{tmp_path}/{shard}", "train")
        got = {ds.key(i): (int(ds.labels[i]), ds[i][0]) for i in range(len(ds))}
        assert sorted(got) == sorted(prefix + k for k, _, _ in samples) and ds.problems == {}
        for key, img, cls in samples:
            label, image = got[prefix + key]
            assert label == int(cls) and torch.equal(image, decode_batch([img])[0][0])
    # a webdataset sample with a compound extension next to plain ones keeps webdataset's reading: x.jpg + x.cls
    write_tar(tmp_path / "c.tar", [("x.seg.png", jpeg(5, fmt="PNG")), ("x.jpg", jpeg(6)), ("x.cls", b"0"),
                                   ("y.seg.png", jpeg(7, fmt="PNG")), ("y.cls", b"1")])
    ds = build_dataset(f"wds:{tmp_path}/c.tar", "train")
    assert [ds.key(i) for i in range(len(ds))] == ["x"] and ds.problems == {"no_image": ["c.tar:1"]}
    assert torch.equal(ds[0][0], decode_batch([jpeg(6)])[0][0])


def test_shards_written_by_the_webdataset_library(tmp_path):
    """Optional (webdataset installed, e.g. the [shards] dev extra): its own TarWriter, keys with dots included."""
    wds = pytest.importorskip("webdataset")
    samples = [("s0", jpeg(0), 3), ("cls.dot.key", jpeg(1), 1), ("dir/s2", jpeg(2, fmt="PNG"), 0)]
    with wds.TarWriter(str(tmp_path / "lib-000.tar")) as sink:
        for key, img, label in samples:
            sink.write({"__key__": key, "png" if key == "dir/s2" else "jpg": img, "cls": label})
    ds = build_dataset(f"wds:{tmp_path}/lib-000.tar", "train")
    assert [(ds.key(i), int(ds.labels[i])) for i in range(len(ds))] == [(k, c) for k, _, c in samples]
    assert all(torch.equal(ds[i][0], decode_batch([img])[0][0]) for i, (_, img, _) in enumerate(samples))
