"""Decode a batch of encoded images ahead of the step: bytes in pinned host memory once, nvjpeg in a side CUDA stream.

``DeviceDecoder(device).submit(byte_tensors) -> DecodedBatch`` runs ``augment.decode.decode_batch`` (same routing,
same rules, same ``bad`` indices) with three differences on a CUDA device:

* the bytes are read by nvjpeg from pinned host memory: as they are when the loader pinned them already
  (``pin_memory=True``), else copied once into one of a few reused pinned buffers. They never go to the GPU and back
  (the path of a byte list moved to the device first, then decoded: one device-to-host copy per image);
* the decode is queued on the decoder's own stream, so it overlaps whatever the training stream is running;
* ``DecodedBatch.ready()`` makes the consumer's stream wait for the decode (an event, no host sync) and tells the
  caching allocator the images are used there (``record_stream``), so their memory is not handed out again while
  the training stream still reads it.

Without CUDA (or for a CPU device) ``submit`` is ``decode_batch(byte_tensors, "cpu")``: the CPU fallback as before.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from augment.decode import decode_batch

__all__ = ["DeviceDecoder", "DecodedBatch", "cuda_decode_available"]


def cuda_decode_available(device: torch.device | str | None) -> bool:
    """Whether ``device`` is a CUDA device this process can use (the only case the pinned/stream path is taken)."""
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


class DecodedBatch:
    """Images decoded (or being decoded) by a ``DeviceDecoder``; ``bad`` lists the inputs that could not be."""

    def __init__(self, images: list[torch.Tensor], bad: list[int], event: "torch.cuda.Event | None") -> None:
        self.images, self.bad, self.event = images, bad, event

    def ready(self, stream: "torch.cuda.Stream | None" = None) -> list[torch.Tensor]:
        """The images, safe to use on ``stream`` (default: the current stream of their device)."""
        if self.event is not None and self.images:
            stream = stream or torch.cuda.current_stream(self.images[0].device)
            stream.wait_event(self.event)
            for img in self.images:
                img.record_stream(stream)
        self.event = None
        return self.images


class DeviceDecoder:
    """``decode_batch`` on ``device`` in a side stream from pinned memory (CUDA), or on the CPU (anything else).

    Args:
        device: where the images go.
        buffers: pinned staging buffers reused in turn; a buffer (and the pinned inputs of a batch) is kept until the
            decode that reads it has finished, so at most ``buffers`` batches are in flight.
    """

    def __init__(self, device: torch.device | str, buffers: int = 3) -> None:
        self.device = torch.device(device)
        self.cuda = cuda_decode_available(self.device)
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # each slot: [pinned buffer or None, event of the decode that last read it, inputs kept alive until then]
        self._slots: list[list] = [[None, None, None] for _ in range(max(1, int(buffers)))]
        self._turn = 0

    def _pinned(self, datas: Sequence, slot: list) -> list:
        """The inputs in pinned host memory: as they are when all are pinned already, else one copy into the slot's
        buffer (grown when too small). Anything that is not a 1-D uint8 tensor is passed through for
        ``decode_batch`` to report."""
        tensors = [d for d in datas if torch.is_tensor(d)]
        if all(t.is_pinned() for t in tensors):
            return list(datas)
        ok = [torch.is_tensor(d) and d.dtype == torch.uint8 and d.ndim == 1 and d.device.type == "cpu" for d in datas]
        total = sum(int(d.numel()) for d, good in zip(datas, ok) if good)
        buf = slot[0]
        if buf is None or buf.numel() < total:
            buf = slot[0] = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
        out, pos = [], 0
        for d, good in zip(datas, ok):
            if not good:
                out.append(d)
                continue
            n = int(d.numel())
            view = buf[pos:pos + n]
            view.copy_(d)
            out.append(view)
            pos += n
        return out

    def submit(self, datas: Sequence[torch.Tensor | bytes]) -> DecodedBatch:
        """Queue the decode of ``datas`` (encoded images) and return at once; see ``DecodedBatch.ready``."""
        if not self.cuda:
            images, bad = decode_batch(datas, "cpu" if self.device.type == "cuda" else self.device)
            return DecodedBatch(images, bad, None)
        slot = self._slots[self._turn]
        self._turn = (self._turn + 1) % len(self._slots)
        if slot[1] is not None:
            slot[1].synchronize()  # the decode that last read this buffer is done with it
        pinned = self._pinned(datas, slot)
        # torchvision allocates nvjpeg's outputs on the current stream but decodes on a private one that does not
        # wait for it: a block freed on the current stream with work still queued there could be overwritten. On
        # this side stream nothing else is queued once it is idle (the training stream's blocks are protected by
        # record_stream in ready()); waiting here costs the training thread nothing (callers decode in a thread).
        self.stream.synchronize()
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            images, bad = decode_batch(pinned, self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        slot[1], slot[2] = event, pinned  # inputs (the loader's pinned tensors too) live until the decode is done
        return DecodedBatch(images, bad, event)
