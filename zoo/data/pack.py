"""``zoo data pack``: an image folder (ImageNet layout) written as WebDataset tar shards, resumably, then verified.

Layout written: ``<out>/classes.json`` (the class names, index = label), and per split ``<out>/<split>/<split>-
000000.tar ...`` plus ``<out>/<split>/manifest.json`` (the plan: which samples go to which shard, and each finished
shard's count and hashes). A sample is ``<key>.<ext>`` with the file's bytes unchanged (``ext`` from its suffix,
``jpeg`` written as ``jpg``) and ``<key>.cls`` with the class index in ASCII; keys are the file stems with ``.`` and
``/`` made ``_`` (a duplicate gets ``_<n>``), since webdataset splits a member name at its first dot.

Resumable: the plan (from the listing and the file sizes) is fixed on the first run and kept in the manifest; each
shard is written to a temporary name and renamed when complete, so a rerun skips the shards that exist and are in
the manifest. Verified: every shard is read back through the reader training uses (``zoo.data.shards``) and its
sample count, keys, labels and a SHA-256 of the image bytes compared with what was written.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from zoo.files import atomic_path, atomic_write_text

__all__ = ["parse_size", "pack_folder", "verify_shard"]

_TAR_BLOCK = 512
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from ``1GB`` / ``500MB`` / ``1GiB`` / ``123456`` (decimal units, ``iB`` for binary ones)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--shard_size {text!r} is not a size: use e.g. 1GB, 500MB, 2GiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 10 * _TAR_BLOCK:
        raise ValueError(f"--shard_size {text!r} is too small: at least {10 * _TAR_BLOCK} bytes")
    return size


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _keys(paths: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for i, p in enumerate(paths):
        stem = os.path.basename(p)
        dot = stem.rfind(".")
        key = re.sub(r"[./]", "_", stem[:dot] if dot > 0 else stem) or f"sample{i}"
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        out.append(key)
    return out


def _ext(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(suffix, suffix) or "jpg"


def _plan(sizes: list[int], shard_size: int) -> list[list[int]]:
    """[start, end) sample ranges per shard: members (image + .cls) fill a shard up to ``shard_size`` bytes."""
    bounds, start, used = [], 0, 2 * _TAR_BLOCK  # the end-of-archive blocks
    for i, s in enumerate(sizes):
        need = _member_bytes(s) + _member_bytes(4)
        if i > start and used + need > shard_size:
            bounds.append([start, i])
            start, used = i, 2 * _TAR_BLOCK
        used += need
    bounds.append([start, len(sizes)])
    return bounds


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, rows: list[tuple[str, str, int]]) -> dict[str, Any]:
    """Write one shard atomically; returns its record (count, keys/labels hash, image bytes hash, files skipped)."""
    data_hash, key_hash = hashlib.sha256(), hashlib.sha256()
    count, missing = 0, []
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
            for src, key, label in rows:
                try:
                    data = Path(src).read_bytes()
                except OSError:  # vanished or unreadable since listing: left out and counted, as training would
                    missing.append(src)
                    continue
                _add(tf, f"{key}.{_ext(src)}", data)
                _add(tf, f"{key}.cls", str(label).encode())
                data_hash.update(hashlib.sha256(data).digest())
                key_hash.update(f"{key}\t{label}\n".encode())
                count += 1
    return {"name": path.name, "count": count, "keys_sha256": key_hash.hexdigest(),
            "data_sha256": data_hash.hexdigest(), "skipped": missing}


def verify_shard(path: Path, record: dict[str, Any]) -> str | None:
    """Re-read ``path`` with the training reader; None when it matches ``record``, else what differs."""
    from zoo.data.shards import _index_shard

    cols, problems = _index_shard(str(path), 0)
    bad = {k: v for k, v in problems.items() if v}
    if bad:
        return f"{path.name}: {bad}"
    keys, labels = cols.get("key", []), cols.get("label", [])
    if len(keys) != record["count"]:
        return f"{path.name}: {len(keys)} samples read back, {record['count']} written"
    key_hash, data_hash = hashlib.sha256(), hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, label, off, size in zip(keys, labels, cols["offset"], cols["size"]):
            key_hash.update(f"{key}\t{label}\n".encode())
            data_hash.update(hashlib.sha256(os.pread(fd, size, off)).digest())
    finally:
        os.close(fd)
    if key_hash.hexdigest() != record["keys_sha256"]:
        return f"{path.name}: keys or labels differ from what was written"
    if data_hash.hexdigest() != record["data_sha256"]:
        return f"{path.name}: image bytes differ from what was written"
    return None


def pack_folder(source: str, out: str, shard_size: int, splits: list[str], verify: bool = True) -> dict[str, Any]:
    """Pack ``imagefolder:<root>`` (or a bare root) into ``out``; returns a summary per split."""
    from zoo.data.images import ImageFolderDataset
    from zoo.progress import track

    root = source.split(":", 1)[1] if source.startswith("imagefolder:") else source
    if ":" in source and not source.startswith("imagefolder:"):
        raise ValueError(f"zoo data pack reads image folders: use 'imagefolder:<root>', got {source!r}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    classes: list[str] | None = None
    for split in splits:
        ds = ImageFolderDataset(root, split, decode="device")
        if classes is None:
            classes = ds.classes
            prev = outdir / "classes.json"
            if prev.exists() and json.loads(prev.read_text()) != classes:
                raise ValueError(f"{prev} lists other classes than {root}: pack into an empty folder")
            atomic_write_text(prev, json.dumps(classes, ensure_ascii=False, indent=0) + "\n")
        paths = [str(p) for p, _ in ds.samples]
        folder = outdir / split
        folder.mkdir(exist_ok=True)
        manifest_path = folder / "manifest.json"
        listing = hashlib.sha256("\n".join(f"{p}\t{y}" for p, y in zip(paths, ds.labels.tolist())).encode()).hexdigest()
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if manifest is not None and (manifest["listing_sha256"], manifest["shard_size"]) != (listing, shard_size):
            raise ValueError(f"{manifest_path} was written for another listing of {root} or another --shard_size; "
                             f"pack into an empty folder (or delete {folder})")
        if manifest is None:
            sizes = [os.stat(p).st_size if os.path.exists(p) else 0 for p in paths]  # one stat per file: packing only
            manifest = {"source": root, "split": split, "listing_sha256": listing, "shard_size": shard_size,
                        "plan": _plan(sizes, shard_size), "shards": {}}
            atomic_write_text(manifest_path, json.dumps(manifest) + "\n")
        keys, labels = _keys(paths), ds.labels.tolist()
        plan = manifest["plan"]
        written = reused = 0
        for k in track(range(len(plan)), f"pack {split}", total=len(plan)):
            name = f"{split}-{k:06d}.tar"
            if name in manifest["shards"] and (folder / name).exists():
                reused += 1
                continue
            a, b = plan[k]
            manifest["shards"][name] = _write_shard(folder / name, list(zip(paths[a:b], keys[a:b], labels[a:b])))
            atomic_write_text(manifest_path, json.dumps(manifest) + "\n")
            written += 1
        failures = []
        if verify:
            for name, record in track(sorted(manifest["shards"].items()), f"verify {split}"):
                problem = verify_shard(folder / name, record)
                if problem:
                    failures.append(problem)
        if failures:
            raise ValueError(f"{len(failures)} shard(s) failed verification ({'; '.join(failures[:3])}): delete them "
                             "and rerun zoo data pack")
        summary[split] = {"shards": len(plan), "written": written, "reused": reused,
                          "samples": sum(r["count"] for r in manifest["shards"].values()),
                          "skipped": sum(len(r["skipped"]) for r in manifest["shards"].values()),
                          "verified": verify}
    return summary
