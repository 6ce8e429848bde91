"""``decode: device`` batches decoded one step ahead: nvjpeg in a side stream while the previous step runs.

``DevicePrefetcher(batches, device)`` iterates a loader's batches (``collate_with_paths`` dicts whose ``image`` is a
list of raw byte tensors) and yields them with ``image`` a list of decoded uint8 ``[3, H, W]`` tensors on
``device``. A background thread fetches the next batch from the loader and queues its decode
(``augment.device_decode.DeviceDecoder``: bytes in pinned host memory once, nvjpeg in the decoder's own stream) while
the training thread runs the current step; handing a batch over only makes the training stream wait for its decode
(an event, no host sync). Lightning does not fetch ahead for a loader with a length, so the lookahead is ours.

Files that do not decode are dropped from the batch here, their names (``path``) appended to ``skipped`` and their
labels removed: the training module counts them as it counts files a worker could not read. The order of batches and
samples is the loader's, so the seeded order and the mid-epoch resume of ``zoo.data.loaders`` hold unchanged.
``ResumableLoader`` uses it only when CUDA is available (``use_device_prefetch``); otherwise the raw bytes go on to
the training module, which decodes them on the CPU as before.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from augment.device_decode import DeviceDecoder, cuda_decode_available

__all__ = ["DevicePrefetcher", "use_device_prefetch", "drop_undecodable"]

_END = object()


def use_device_prefetch(dataset: Any, device: torch.device | str | None) -> bool:
    """A dataset that yields raw bytes (``decode="device"``) and a usable CUDA device: the pinned/stream path."""
    return getattr(dataset, "decode", None) == "device" and cuda_decode_available(device)


def _is_raw(images: Any) -> bool:
    return isinstance(images, list) and bool(images) and all(torch.is_tensor(x) and x.dim() == 1 for x in images)


def drop_undecodable(batch: dict[str, Any], bad: list[int]) -> dict[str, Any]:
    """Remove the samples at ``bad`` from the batch's labels and paths, naming them in ``skipped``."""
    if not bad:
        return batch
    n = len(batch["label"])
    paths = batch.get("path") or [f"<batch item {i}>" for i in range(n)]
    drop = set(bad)
    keep = [i for i in range(n) if i not in drop]
    batch["skipped"] = list(batch.get("skipped", [])) + [paths[i] for i in bad]
    batch["label"] = batch["label"][keep]
    if "path" in batch:
        batch["path"] = [paths[i] for i in keep]
    return batch


def _produce(batches: Iterator, decoder: DeviceDecoder, out: queue.Queue, stop: threading.Event) -> None:
    """The background thread: fetch, queue the decode, hand over; an error (a dead loader worker) is handed over too."""
    try:
        if decoder.cuda:
            torch.cuda.set_device(decoder.device)
        for batch in batches:
            if isinstance(batch, dict) and _is_raw(batch.get("image")):
                decoded = decoder.submit(batch["image"])
                batch = drop_undecodable(batch, decoded.bad)
                batch["image"] = decoded
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        item: Any = _END
    except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread, where it can be handled
        item = err
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class DevicePrefetcher(Iterator):
    """The batches of ``batches``, their raw image bytes decoded on ``device`` ``ahead`` batches in advance.

    Args:
        batches: an iterator of collated batches (a DataLoader's iterator).
        device: where the images are decoded (CUDA: nvjpeg in a side stream; CPU: ``decode_batch`` as before).
        ahead: batches fetched and decoded before they are asked for (GPU memory holds ``ahead + 1`` batches of
            decoded images).
    """

    def __init__(self, batches: Iterator, device: torch.device | str, ahead: int = 1) -> None:
        self.decoder = DeviceDecoder(device, buffers=ahead + 2)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(ahead)))
        self._stop = threading.Event()
        self._done = False
        # The thread holds the iterator, decoder and queue, not this object: dropping the prefetcher stops it.
        self._thread = threading.Thread(target=_produce, args=(batches, self.decoder, self._queue, self._stop),
                                        name="zoo-device-decode", daemon=True)
        self._thread.start()

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item
        if isinstance(item, dict) and hasattr(item.get("image"), "ready"):
            item["image"] = item["image"].ready()
        return item

    def close(self) -> None:
        """Stop the thread (after the batch it is fetching) and wait for it: the loader's iterator is free again."""
        self._stop.set()
        self._done = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
