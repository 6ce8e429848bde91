"""Download weight files into the cache (``zoo.files.cache_dir("weights")``), standard library only.

``fetch(url, sha256=None)`` returns the path of a complete, verified file:
- a file is only ever moved into its cache name once complete and (with ``sha256``) verified; a reader never sees half
  a file. The bytes on their way live in ``<name>.part``, kept only when the download can be *resumed* (the connection
  broke, the server closed early, a timeout, Ctrl-C): the next call continues it with an HTTP ``Range`` request. On
  any other failure (wrong hash, HTML instead of weights, HTTP 404 ...) the partial file is deleted. ``<name>.lock``
  (empty) serialises processes: one downloads, the others wait and then read the cached file, so ranks started
  together download once. ``<name>.json`` records the URL, size and the sha256 measured on the complete file.
- ``ZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network: the cache or one line saying what is missing.
- ``file://`` URLs are read in place (verified, never copied).
- ``ZOO_DOWNLOAD_TIMEOUT`` (seconds, default 60) bounds the wait for any single network read.
Every failure is a ``DownloadError`` (a ``ValueError``) whose message is one line naming the URL and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Iterable

from zoo.files import atomic_write_text, cache_dir

__all__ = ["DownloadError", "fetch", "is_url", "offline", "sha256_file", "recorded_sha256", "cache_path_for"]

OFFLINE_ENVS = ("ZOO_OFFLINE", "HF_HUB_OFFLINE")
TIMEOUT_ENV = "ZOO_DOWNLOAD_TIMEOUT"
_CHUNK = 1 << 20
_MAX_RESUMES = 5  # consecutive attempts that end early; each must bring new bytes
_USER_AGENT = "byol-zoo (urllib)"


class DownloadError(ValueError):
    """A download that could not give a complete, verified file; the message is one line."""


def is_url(source: str) -> bool:
    """Is ``source`` an ``http://``, ``https://`` or ``file://`` URL?"""
    return str(source).lower().startswith(("http://", "https://", "file://"))


def offline() -> bool:
    """True when ``ZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (1/true/yes/on)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENVS)


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        raise DownloadError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set e.g. {TIMEOUT_ENV}=60.") from None
    if value <= 0:
        raise DownloadError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds.")
    return value


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded beside a cached file when it was downloaded (None if there is no record)."""
    try:
        return json.loads(Path(str(path) + ".json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_path_for(url: str, filename: str | None = None) -> Path:
    """Where ``url`` is cached: ``cache_dir("weights")/<filename>``; by default the URL's own file name prefixed by a
    hash of the whole URL, so two URLs ending in the same name never share a file."""
    if filename is None:
        base = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
        filename = f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{base}"
    return cache_dir("weights") / filename


def _file_url_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    return Path(urllib.request.url2pathname(urllib.parse.unquote(parsed.netloc + parsed.path)))


def _check_hash(path: Path, got: str, expected: str | None, url: str, delete: bool) -> None:
    if expected is not None and got.lower() != expected.lower():
        if delete:
            path.unlink(missing_ok=True)
            Path(str(path) + ".json").unlink(missing_ok=True)
        what = "the file was deleted" if delete else "the file was left in place"
        raise DownloadError(f"{url}: sha256 mismatch (got {got}, expected {expected}); {what}. The download was "
                            "corrupt or the file changed upstream: retry, or check the sha256 you pinned.")


class _Progress:
    """Bytes progress on stderr: one redrawn line on a terminal, else a line every tenth of the file or 30 s."""

    def __init__(self, label: str, total: int | None, done: int, enabled: bool | None) -> None:
        self.label, self.total, self.done = label, total, done
        self.tty = sys.stderr.isatty()
        self.enabled = enabled if enabled is not None else True
        self.t0 = self.last = time.monotonic()
        self.next_tenth = 1 + (10 * done // total if total else 0)
        if self.enabled:
            start = f" (resuming at {done / 2**20:.1f} MiB)" if done else ""
            size = f"{total / 2**20:.1f} MiB" if total else "unknown size"
            print(f"downloading {label}: {size}{start}", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self.last >= 0.1:
                self.last = now
                print("\r" + self._line(now), end="", file=sys.stderr, flush=True)
        elif (self.total and 10 * self.done >= self.next_tenth * self.total) or now - self.last >= 30:
            self.last = now
            self.next_tenth = 1 + (10 * self.done // self.total if self.total else 0)
            print(self._line(now), file=sys.stderr, flush=True)

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-6) / 2**20
        pct = f"{100 * self.done / self.total:5.1f}% " if self.total else ""
        return f"  {pct}{self.done / 2**20:.1f} MiB at {rate:.1f} MiB/s"

    def close(self) -> None:
        if self.enabled and self.tty:
            print("\r" + self._line(time.monotonic()), file=sys.stderr, flush=True)


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total_size(resp, offset: int) -> int | None:
    content_range = resp.headers.get("Content-Range", "")
    if resp.status == 206 and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return (int(length) + (offset if resp.status == 206 else 0)) if length and length.isdigit() else None


def _looks_like_html(content_type: str, head: bytes) -> bool:
    """An HTML page (by its first bytes, or labelled text/html and not starting like a pickle, zip or safetensors)."""
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return True
    binary = head[:1] == b"\x80" or head.startswith(b"PK\x03\x04") or head[8:9] == b"{"
    return "text/html" in content_type.lower() and not binary


def _attempt(url: str, part: Path, digest: dict, progress_on: bool | None, label: str, timeout: float) -> bool:
    """One request continuing ``part`` (``digest["h"]``: sha256 of its bytes so far); True when the file is complete,
    False when the server stopped early."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file does not fit the remote one: start over
            part.unlink()
            digest["h"] = hashlib.sha256()
            return _attempt(url, part, digest, progress_on, label, timeout)
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}; check the URL (the file may have moved).") from None
    with resp:
        if offset and resp.status != 206:  # the server ignored Range: start from the beginning
            offset = 0
            digest["h"] = hashlib.sha256()
        total = _total_size(resp, offset)
        first = resp.read(min(_CHUNK, 512))
        if offset == 0 and _looks_like_html(resp.headers.get("Content-Type", ""), first):
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url} serves an HTML page ({resp.headers.get('Content-Type') or 'text/html'}), not "
                                "a weight file: it is probably a web page (sign-in, consent or error page); use the "
                                "direct link to the file.")
        progress = _Progress(label, total, offset, progress_on)
        with open(part, "ab" if offset else "wb") as out:
            chunk = first
            try:
                while chunk:
                    out.write(chunk)
                    digest["h"].update(chunk)
                    progress.update(len(chunk))
                    chunk = resp.read(_CHUNK)
            except HTTPException:  # IncompleteRead and friends: the server closed early
                pass
            finally:
                progress.close()
    size = part.stat().st_size
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"{url}: received {size} bytes but the server announced {total}; the partial file was "
                            "deleted, retry.")
    return total is None or size == total


def _rehash(part: Path):
    h = hashlib.sha256()
    if part.exists():
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    return h


def _timed_out(url: str, timeout: float, part: Path) -> DownloadError:
    kept = f"the partial download is kept in {part.name} and resumes on the next try; " if part.exists() else ""
    return DownloadError(f"{url}: no data for {timeout:g} s (timed out); {kept}raise the limit with "
                         f"{TIMEOUT_ENV}=SECONDS.")


def _download(url: str, dest: Path, sha256: str | None, progress: bool | None) -> None:
    part = Path(str(dest) + ".part")
    digest = {"h": _rehash(part)}  # a resumed download continues the digest of the bytes already on disk
    timeout = _timeout()
    stalls = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _attempt(url, part, digest, progress, dest.name, timeout):
                break
        except (socket.timeout, TimeoutError):
            raise _timed_out(url, timeout, part) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.timeout, TimeoutError)):
                raise _timed_out(url, timeout, part) from None
            raise DownloadError(f"{url}: could not connect ({err.reason}); check the network, or set ZOO_OFFLINE=1 "
                                "to use only cached files.") from None
        except ConnectionError:
            pass  # a connection reset mid-body: resumable like an early close
        except PermissionError:
            raise
        except OSError as err:  # e.g. the disk is full: the partial file stays for a later resume
            raise DownloadError(f"{url}: {err.strerror or err} while writing {part}; the partial download is kept "
                                "and resumes on the next try.") from None
        now = part.stat().st_size if part.exists() else 0
        stalls = 0 if now > before else stalls + 1
        if stalls >= _MAX_RESUMES:
            raise DownloadError(f"{url}: the server stopped sending data {_MAX_RESUMES} times at {now} bytes; the "
                                f"partial download is kept in {part.name} and resumes on the next try.")
        print(f"download of {dest.name} interrupted at {now / 2**20:.1f} MiB; resuming", file=sys.stderr, flush=True)
    got = digest["h"].hexdigest()
    _check_hash(part, got, sha256, url, delete=True)
    if part.stat().st_size == 0:
        part.unlink()
        raise DownloadError(f"{url}: the server sent an empty file; check the URL.")
    os.replace(part, dest)
    atomic_write_text(str(dest) + ".json", json.dumps({"url": url, "sha256": got, "size": dest.stat().st_size},
                                                      indent=1))


def _writable_cache(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise DownloadError(f"cache folder {folder} is not writable ({err.strerror or err}); set ZOO_CACHE_DIR to a "
                            "writable folder.") from None


def _cached(dest: Path, url: str, sha256: str | None) -> Path | None:
    if not dest.is_file():
        return None
    recorded = recorded_sha256(dest)
    if sha256 is not None and (recorded or "").lower() != sha256.lower():
        _check_hash(dest, sha256_file(dest), sha256, url, delete=True)
    if recorded is None:  # a file placed in the cache by hand: record its digest once
        try:
            atomic_write_text(str(dest) + ".json", json.dumps({"url": url, "sha256": sha256_file(dest),
                                                               "size": dest.stat().st_size}, indent=1))
        except OSError:
            pass  # a read-only cache still serves its files
    return dest


def fetch(urls: str | Iterable[str], sha256: str | None = None, filename: str | None = None,
          progress: bool | None = None) -> Path:
    """A local, complete copy of the first of ``urls`` that answers (cached; resumed; verified against ``sha256``)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise DownloadError("no URL given.")
    url = urls[0]
    if url.lower().startswith("file://"):
        path = _file_url_path(url)
        if not path.is_file():
            raise DownloadError(f"{url}: no such file ({path}).")
        if sha256 is not None:
            _check_hash(path, sha256_file(path), sha256, url, delete=False)
        return path
    dest = cache_path_for(url, filename)
    hit = _cached(dest, url, sha256)
    if hit is not None:
        return hit
    if offline():
        flag = next(k for k in OFFLINE_ENVS if os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on"))
        raise DownloadError(f"{flag}=1 and {dest.name} is not in the cache ({dest.parent}); download it once while "
                            f"online, or copy the file to {dest}.")
    _writable_cache(dest.parent)
    from filelock import FileLock, Timeout  # a dependency of torch

    lock = FileLock(str(dest) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process downloading {dest.name}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        hit = _cached(dest, url, sha256)  # the process that held the lock may have finished it
        if hit is not None:
            return hit
        errors = []
        for i, candidate in enumerate(urls):
            try:
                _download(candidate, dest, sha256, progress)
                return dest
            except DownloadError as err:
                errors.append(str(err))
                if i + 1 < len(urls):
                    print(f"{err} Trying the next mirror.", file=sys.stderr, flush=True)
        raise DownloadError(errors[-1] if len(errors) == 1 else " | ".join(errors))
    except PermissionError as err:
        raise DownloadError(f"cache folder {dest.parent} is not writable ({err.strerror}); set ZOO_CACHE_DIR to a "
                            "writable folder.") from None
    finally:
        lock.release()
