"""Shard readers compared on evidence: ours (``zoo.data.shards``) vs webdataset's ``WebDataset`` and ``wids``.

    pip install --target /tmp/libs webdataset wids     # optional: a reader that is not installed is reported so
    PYTHONPATH=/tmp/libs python bench/shard_libs.py --n 4000 [--root /tmp/zdb-libs] [--out libs.json]

Shards: ``zoo data pack`` of a generated ImageNet-like folder (``bench/data.py``'s, 500x375 JPEGs). Throughput is
raw image bytes per second, one process, in a seeded shuffled order for the indexed readers (ours, wids; what the
training order needs) and shard-shuffled streaming for ``WebDataset`` (which cannot read in a global order); the
first pass warms the page cache and is not timed. The checks are run, not read from docs: each reader gets the same
small hostile tars (a member name over 100 bytes as Python's tarfile writes it, with a PAX header; a key with dots;
a truncated shard; a 0-byte shard; a sample without ``.cls``) and what it does is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def hostile(root: Path) -> dict[str, Path]:
    """One small tar per check; each should give its good samples (2) and skip or count the bad one."""
    root.mkdir(parents=True, exist_ok=True)
    good = [("g0.jpg", _jpeg(0)), ("g0.cls", b"0"), ("g1.jpg", _jpeg(1)), ("g1.cls", b"1\n")]
    long = "d" * 70 + "/" + "e" * 60
    out = {"long name (PAX)": _tar(root / "long.tar", good + [(f"{long}.jpg", _jpeg(2)), (f"{long}.cls", b"1")]),
           "key with dots": _tar(root / "dots.tar", good + [("a.b.jpg", _jpeg(3)), ("a.b.cls", b"0")]),
           "no .cls": _tar(root / "nocls.tar", good + [("x.jpg", _jpeg(4))])}
    full = _tar(root / "full.tar", good + [("t.jpg", _jpeg(5) * 40), ("t.cls", b"0")])
    with tarfile.open(full) as tf:
        big = tf.getmember("t.jpg")
    (root / "cut.tar").write_bytes(full.read_bytes()[:big.offset_data + big.size // 2])  # cut inside t.jpg
    out["truncated"] = root / "cut.tar"
    (root / "empty.tar").write_bytes(b"")
    out["0-byte shard"] = root / "empty.tar"
    return out


@contextlib.contextmanager
def _quiet():
    """Capture what a reader prints on stdout/stderr (wids prints on every construction)."""
    import contextlib as c

    buf = io.StringIO()
    with c.redirect_stdout(buf), c.redirect_stderr(buf):
        yield buf


def ours_samples(path: Path) -> list[tuple[str, int]]:
    from zoo.data.shards import ShardDataset

    ds = ShardDataset(str(path), "train", decode="device")
    return [(ds.key(i), int(ds.labels[i])) for i in range(len(ds))]


def wids_samples(path: Path) -> list[tuple[str, int]]:
    import wids

    n = sum(1 for m in tarfile.open(path) if m.name.endswith(".jpg")) if path.stat().st_size else 0
    ds = wids.ShardListDataset([{"url": str(path), "nsamples": n}], transformations=[], cache_dir=str(path.parent))
    return [(ds[i]["__key__"], int(_raw(ds[i][".cls"]).decode())) for i in range(len(ds))]


def _raw(v) -> bytes:
    return v.getvalue() if hasattr(v, "getvalue") else v


def webdataset_samples(path: Path) -> list[tuple[str, int]]:
    import webdataset as wds

    ds = wds.WebDataset(str(path), shardshuffle=False)
    return [(s["__key__"], int(s["cls"].decode())) for s in ds]


def check(reader, cases: dict[str, Path]) -> dict[str, str]:
    """What ``reader`` does with each hostile tar: its samples, or the exception's first line; and its printing."""
    out = {}
    for name, path in cases.items():
        with _quiet() as printed:
            try:
                got = reader(path)
                res = f"{len(got)} samples: {', '.join(f'{k}={c}' for k, c in got)[:90]}"
            except BaseException as err:  # noqa: BLE001 - recording what a library does is the point
                res = f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
        out[name] = res + (f" [printed {len(printed.getvalue().splitlines())} lines]" if printed.getvalue() else "")
    return out


def throughput(kind: str, shards: list[str], samples: int, seed: int = 0) -> float:
    """Raw image bytes read per second (samples/s), after one untimed warm-up pass."""
    if kind == "ours":
        from zoo.data.shards import ShardDataset

        ds = ShardDataset(os.path.dirname(os.path.dirname(shards[0])), "train", decode="device")
        get = lambda i: ds.read(i)  # noqa: E731
        n = len(ds)
    elif kind == "wids":
        import wids

        counts = [sum(1 for m in tarfile.open(s) if m.name.endswith(".cls")) for s in shards]
        with _quiet():
            ds = wids.ShardListDataset([{"url": s, "nsamples": c} for s, c in zip(shards, counts)],
                                       transformations=[], cache_dir=os.path.dirname(shards[0]), lru_size=64)
        get = lambda i: ds[i][".jpg"]  # noqa: E731
        n = len(ds)
    else:
        import webdataset as wds

        def stream():
            for s in wds.WebDataset(shards, shardshuffle=len(shards), seed=seed):
                yield s["jpg"]
        for k, _ in enumerate(stream()):  # warm-up
            if k >= samples:
                break
        t0, k = time.perf_counter(), 0
        for k, _ in enumerate(stream(), 1):
            if k >= samples:
                break
        return k / (time.perf_counter() - t0)
    order = np.random.default_rng(seed).permutation(n)[:samples].tolist()
    for i in order:
        get(i)
    t0 = time.perf_counter()
    for i in order:
        get(i)
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    from bench.data import make_imagenet_like
    from zoo.data.pack_cli import main as data_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="files of the generated set")
    ap.add_argument("--samples", type=int, default=2000, help="samples read per timed pass")
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("ZOO_CACHE_DIR", tempfile.mkdtemp(prefix="zoo-cache-"))
    root = Path(args.root or tempfile.mkdtemp(prefix="zoo-libs-"))
    folder = make_imagenet_like(root / f"inet{args.n}", args.n)
    packed = root / f"shards{args.n}"
    if not (packed / "classes.json").exists():
        with _quiet():
            data_main(["pack", f"imagefolder:{folder}", "--out", str(packed), "--shard_size", "64MB"])
    shards = sorted(str(p) for p in (packed / "train").glob("*.tar"))
    cases = hostile(root / "hostile")
    readers = {"ours": ours_samples, "wids": wids_samples, "webdataset": webdataset_samples}
    result = {"bench": "shard_libs", "n": args.n, "shards": len(shards), "samples": args.samples,
              "load": os.getloadavg()[0], "readers": {}}
    for name, reader in readers.items():
        mod = {"ours": "zoo", "wids": "wids", "webdataset": "webdataset"}[name]
        try:
            version = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            result["readers"][name] = {"installed": False}
            continue
        try:
            speed = throughput(name, shards, args.samples)
        except Exception as err:  # noqa: BLE001
            speed = f"{type(err).__name__}: {err}"
        result["readers"][name] = {"version": version, "samples_per_s": speed, "checks": check(reader, cases)}
    line = json.dumps(result, indent=1)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
