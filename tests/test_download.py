"""zoo.weights.download against a local HTTP server on 127.0.0.1 (started here, threads): resume, hashes, errors,
redirects, HTML pages, timeouts, two processes at once, file:// URLs and offline mode. Nothing reaches the network."""
from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_http import serve
from zoo.weights.download import DownloadError, cache_path_for, fetch, recorded_sha256

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every byte value
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, list[str | None]] = {}

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _body(self, data: bytes, ctype: str = "application/octet-stream", cut: int | None = None,
              chunk_delay: float = 0.0) -> None:
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:cut] if cut is not None else data[start:]
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i:i + (1 << 16)])
            if chunk_delay:
                time.sleep(chunk_delay)
        if cut is not None:
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        path = self.path
        self.hits.setdefault(path, []).append(self.headers.get("Range"))
        if path == "/w.bin":
            self._body(PAYLOAD)
        elif path == "/trunc.bin":  # the first response stops at a third and closes; later ones honour Range
            self._body(PAYLOAD, cut=len(PAYLOAD) // 3 if len(self.hits[path]) == 1 else None)
        elif path == "/slowly.bin":  # ~0.3 s per download: long enough for a second process to find the lock taken
            self._body(PAYLOAD, chunk_delay=0.02)
        elif path == "/stall.bin":
            time.sleep(2.0)
            self._body(PAYLOAD)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/w.bin")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/page":
            self._body(b"<!DOCTYPE html><html><body>Sign in</body></html>", ctype="application/octet-stream")
        elif path == "/typed-page":
            self._body(b"just text", ctype="text/html; charset=utf-8")
        else:
            self.send_error(404, "Not Found")


@pytest.fixture(scope="module")
def server():
    with serve(_Handler) as url:
        yield url


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    for k in ("ZOO_OFFLINE", "HF_HUB_OFFLINE", "ZOO_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    _Handler.hits.clear()
    return tmp_path / "cache" / "weights"


def _leftovers(folder: Path) -> list[str]:
    """Files in the cache other than complete downloads (recorded beside in <name>.json) and (empty) lock files."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith((".lock", ".json"))
                  and not (Path(str(p) + ".json").is_file() and p.read_bytes() == PAYLOAD))


def test_download_verifies_caches_and_works_offline(server, cache, monkeypatch, capsys):
    path = fetch(f"{server}/w.bin", sha256=DIGEST)
    assert path.read_bytes() == PAYLOAD and path.parent == cache and recorded_sha256(path) == DIGEST
    assert "downloading" in capsys.readouterr().err  # progress, in line mode off a terminal
    assert fetch(f"{server}/w.bin", sha256=DIGEST) == path and len(_Handler.hits["/w.bin"]) == 1  # from the cache
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert fetch(f"{server}/w.bin") == path and len(_Handler.hits["/w.bin"]) == 1
    monkeypatch.delenv("ZOO_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match=r"HF_HUB_OFFLINE=1 and .*other\.bin is not in the cache") as err:
        fetch(f"{server}/other.bin")
    assert "\n" not in str(err.value) and "/other.bin" not in _Handler.hits
    assert _leftovers(cache) == []


def test_truncated_response_is_resumed_with_range(server, cache, capsys):
    path = fetch(f"{server}/trunc.bin", sha256=DIGEST)
    assert path.read_bytes() == PAYLOAD
    ranges = _Handler.hits["/trunc.bin"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(PAYLOAD) // 3}-" and len(ranges) == 2
    assert "resuming" in capsys.readouterr().err
    assert _leftovers(cache) == []


def test_partial_file_from_an_earlier_run_is_continued(server, cache):
    url = f"{server}/w.bin"
    dest = cache_path_for(url)
    dest.parent.mkdir(parents=True)
    Path(str(dest) + ".part").write_bytes(PAYLOAD[:1000])
    assert fetch(url, sha256=DIGEST).read_bytes() == PAYLOAD
    assert _Handler.hits["/w.bin"] == ["bytes=1000-"]
    assert not Path(str(dest) + ".part").exists()


def test_wrong_hash_deletes_the_file(server, cache):
    with pytest.raises(DownloadError, match="sha256 mismatch .* the file was deleted") as err:
        fetch(f"{server}/w.bin", sha256="0" * 64)
    assert "\n" not in str(err.value)
    assert _leftovers(cache) == [] and not any(p.suffix == ".bin" for p in cache.iterdir())


def test_404_redirect_and_html(server, cache):
    with pytest.raises(DownloadError, match=r"HTTP 404") as err:
        fetch(f"{server}/nope.bin")
    assert "\n" not in str(err.value)
    assert fetch(f"{server}/redirect", sha256=DIGEST).read_bytes() == PAYLOAD
    for page in ("/page", "/typed-page"):
        with pytest.raises(DownloadError, match="serves an HTML page"):
            fetch(f"{server}{page}")
    assert _leftovers(cache) == []


def test_slow_server_times_out_in_one_line(server, cache, monkeypatch):
    monkeypatch.setenv("ZOO_DOWNLOAD_TIMEOUT", "0.3")
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=r"no data for 0.3 s \(timed out\).*ZOO_DOWNLOAD_TIMEOUT") as err:
        fetch(f"{server}/stall.bin")
    assert time.monotonic() - t0 < 1.9 and "\n" not in str(err.value)
    assert _leftovers(cache) == []
    monkeypatch.setenv("ZOO_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(DownloadError, match="ZOO_DOWNLOAD_TIMEOUT='soon' is not a number"):
        fetch(f"{server}/w.bin")


def test_two_processes_download_once(server, cache, tmp_path):
    url = f"{server}/slowly.bin"
    code = ("import sys; from zoo.weights.download import fetch; "
            f"p = fetch({url!r}, sha256={DIGEST!r}); print(p.read_bytes() == bytes(range(256)) * 4096)")
    env = {**os.environ, "ZOO_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].strip() for o in outs] == ["True", "True"], [o[1] for o in outs]
    assert len(_Handler.hits["/slowly.bin"]) == 1  # one process downloaded, the other waited and read the cache
    assert _leftovers(cache) == []


def test_file_urls_and_unwritable_cache(cache, tmp_path, monkeypatch):
    local = tmp_path / "local weights.bin"
    local.write_bytes(PAYLOAD)
    assert fetch(local.as_uri(), sha256=DIGEST) == local  # read in place, verified
    with pytest.raises(DownloadError, match="sha256 mismatch .* left in place"):
        fetch(local.as_uri(), sha256="f" * 64)
    assert local.exists()
    with pytest.raises(DownloadError, match="no such file"):
        fetch((tmp_path / "missing.bin").as_uri())
    if os.geteuid() != 0:  # permission bits bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        monkeypatch.setenv("ZOO_CACHE_DIR", str(locked))
        with pytest.raises(DownloadError, match="cache folder .* is not writable.*ZOO_CACHE_DIR"):
            fetch("http://127.0.0.1:9/w.bin")
        locked.chmod(0o700)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # a cache "folder" that is a file cannot be written by anyone, root included
    monkeypatch.setenv("ZOO_CACHE_DIR", str(blocker))
    # refused where the cache folder is resolved (zoo.files.cache_dir), naming the variable
    with pytest.raises((DownloadError, NotADirectoryError), match="ZOO_CACHE_DIR.*(not writable|not a folder)"):
        fetch("http://127.0.0.1:9/w.bin")
