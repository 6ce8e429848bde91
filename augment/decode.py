"""JPEG-bytes decode path: workers ship raw file bytes; the batch is decoded on the GPU (nvjpeg) when there is one.

``decode_batch(bytes_list, device) -> (images, bad)``: ``images`` are uint8 ``[3, H, W]`` RGB on ``device`` in input
order with bad files left out; ``bad`` lists the input indices that could not be decoded. It never raises for bad
data. Routing:

* baseline/progressive 3-component JPEGs -> one batched ``torchvision.io.decode_jpeg(list, device="cuda")`` call
  (CPU ``decode_jpeg`` without a GPU); if the batched call fails, each image is retried alone so one bad file cannot
  sink the batch;
* anything else (PNG saved as .JPEG, CMYK/YCCK or grayscale JPEG, other formats) -> ``torchvision.io.decode_image``
  on CPU with RGB conversion, then PIL as the last resort (PIL converts CMYK with the Adobe inversion);
* zero-byte, unknown or truncated data (a JPEG without its end-of-image marker is checked strictly with PIL, since
  libjpeg would silently fill the missing part with grey) -> reported in ``bad``. A complete file whose entropy-coded
  data is damaged but still decodable gives libjpeg's best effort (it prints "Corrupt JPEG data" to stderr), as PIL
  would; one that libjpeg rejects is reported.

Every image mode ends as uint8 RGB or in ``bad`` -- no decoder's output is passed on unchecked. The rules:

* colour spaces (1, L, P, CMYK, YCbCr, HSV, LAB, ...) are converted to RGB; grey is repeated into three channels;
* alpha (LA, PA, RGBA, P with transparency) is dropped, the colour channels kept as stored -- what torchvision's
  ``ImageReadMode.RGB`` does, so both decoders agree;
* multi-frame files (GIF, TIFF, animated WebP) give their first frame;
* 16-bit data (16-bit PNG, which torchvision returns as uint16; PIL's I;16/I;16B/I;16L) is scaled by its container's
  range: ``round(v / 257)``, so 0 -> 0, 65535 -> 255 and 257 k -> k;
* 32-bit integer (PIL mode I) and float (mode F) images carry no bit depth, so it is taken from the values: the
  smallest of [0, 1] (float only), [0, 255] and [0, 65535] that holds them all is mapped linearly onto [0, 255];
  values outside all three (negative, or above 65535) are stretched min..max onto 0..255. NaN counts as 0, +-inf
  is clipped to the finite range.
"""
from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["decode_batch", "sniff", "jpeg_components", "pil_to_rgb_array", "scale_to_uint8"]

log = logging.getLogger(__name__)

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


def _as_bytes_tensor(data) -> torch.Tensor:
    if torch.is_tensor(data):
        if data.dtype != torch.uint8 or data.ndim != 1:
            raise ValueError(f"encoded image must be a 1-D uint8 tensor; got {data.dtype} {tuple(data.shape)}")
        return data.cpu()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


def sniff(data: torch.Tensor) -> str:
    """Container type from magic bytes: 'jpeg', 'png', 'empty' or 'other'."""
    if data.numel() == 0:
        return "empty"
    head = bytes(data[:8].tolist())
    if head.startswith(_JPEG):
        return "jpeg"
    if head.startswith(_PNG):
        return "png"
    return "other"


def jpeg_components(data: torch.Tensor) -> int | None:
    """Number of colour components from the JPEG frame header (SOFn); None when no header is found."""
    buf = data.numpy().tobytes()
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        seg_len = int.from_bytes(buf[i + 2:i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return buf[i + 9] if i + 9 < n else None
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        i += 2 + seg_len
    return None


def _complete_jpeg(data: torch.Tensor) -> bool:
    """True when the data ends with the EOI marker (trailing zero padding allowed)."""
    tail = data[-64:].numpy().tobytes().rstrip(b"\x00")
    return tail.endswith(b"\xff\xd9")


def _u16_to_u8(x):
    """16-bit -> 8-bit by the full range: round(v / 257) in exact integer arithmetic (numpy array or torch tensor)."""
    if torch.is_tensor(x):
        return ((x.to(torch.int32) + 128) // 257).to(torch.uint8)
    return ((x.astype(np.int64) + 128) // 257).astype(np.uint8)


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8 by the rules in the module docstring (uint16: /257; int and float: by value range)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 or arr.dtype == np.dtype(">u2") or arr.dtype == np.dtype("<u2"):
        return _u16_to_u8(arr.astype(np.uint16))
    is_float = arr.dtype.kind == "f"
    x = arr.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        lo, hi = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (0.0, 0.0)
        x = np.nan_to_num(x, nan=0.0, posinf=hi, neginf=lo)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo >= 0 and hi <= 65535:
        top = 1.0 if (is_float and hi <= 1.0) else 255.0 if hi <= 255 else 65535.0
        y = x * (255.0 / top)
    else:  # no standard range holds the values: stretch min..max
        y = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _lab_to_rgb(im):
    from PIL import ImageCms

    t = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(im, t)


def pil_to_rgb_array(im) -> np.ndarray:
    """A loaded PIL image of any mode -> uint8 ``[H, W, 3]`` RGB (first frame; rules in the module docstring)."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;"):  # single-channel high bit depth: PIL's convert would clip at 255
        grey = scale_to_uint8(np.asarray(im))
        if grey.ndim != 2:
            raise ValueError(f"unexpected {mode} array shape {grey.shape}")
        return np.repeat(grey[:, :, None], 3, axis=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with Transparency ... should be converted to RGBA"
        if mode == "LAB":
            rgb = _lab_to_rgb(im)
        elif mode == "RGB":
            rgb = im
        else:
            rgb = im.convert("RGB")
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"mode {mode} did not convert to 8-bit RGB (got {arr.dtype} {arr.shape})")
    return arr


def _pil_decode(data: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        im.load()  # strict: raises on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES is False by default)
        arr = pil_to_rgb_array(im)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _rgb_uint8(img: torch.Tensor) -> torch.Tensor | None:
    """A decoder's output as uint8 ``[3, H, W]``: first frame of a stack, 16-bit scaled; None when it is not RGB."""
    if img.ndim == 4:  # animated GIF / WebP: [frames, C, H, W]
        img = img[0]
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] == 0 or img.shape[2] == 0:
        return None
    if img.dtype == torch.uint16:
        img = _u16_to_u8(img)
    return img if img.dtype == torch.uint8 else None


def _cpu_decode(data: torch.Tensor) -> torch.Tensor:
    """torchvision CPU decode with RGB conversion; PIL when torchvision cannot handle the file (or gives no uint8
    RGB image after scaling)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its io module
            img = _rgb_uint8(decode_image(data, mode=ImageReadMode.RGB))
        if img is not None:
            return img
    except Exception:  # noqa: BLE001 - any decoder failure falls through to PIL
        pass
    return _pil_decode(data)


def _gpu_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def decode_batch(byte_tensors: Sequence[torch.Tensor | bytes], device: torch.device | str = "cpu"
                 ) -> tuple[list[torch.Tensor], list[int]]:
    """Decode encoded images to uint8 RGB ``[3, H, W]`` on ``device``; returns (images, indices of bad inputs)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    use_gpu = _gpu_available(device)
    if device.type == "cuda" and not use_gpu:
        log.warning("decode_batch: CUDA requested but not available; decoding on CPU")
        device = torch.device("cpu")
    out: dict[int, torch.Tensor] = {}
    bad: list[int] = []
    fast: list[int] = []
    datas: list[torch.Tensor] = []
    for i, raw in enumerate(byte_tensors):
        try:
            data = _as_bytes_tensor(raw)
        except (ValueError, TypeError):
            bad.append(i)
            datas.append(torch.empty(0, dtype=torch.uint8))
            continue
        datas.append(data)
        kind = sniff(data)
        if kind == "empty":
            bad.append(i)
        elif kind == "jpeg" and jpeg_components(data) == 3 and _complete_jpeg(data):
            fast.append(i)
        else:
            try:
                out[i] = _cpu_decode(data).to(device)
            except Exception:  # noqa: BLE001 - corrupt file: count it, never crash the loader
                bad.append(i)
    if fast:
        dev = "cuda" if use_gpu else "cpu"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                imgs = decode_jpeg([datas[i] for i in fast], mode=ImageReadMode.RGB, device=dev)
            for i, img in zip(fast, imgs):
                out[i] = img.to(device)
        except Exception:  # noqa: BLE001 - one bad file fails the batched call: retry one by one
            for i in fast:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        out[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=dev).to(device)
                except Exception:  # noqa: BLE001
                    try:
                        out[i] = _pil_decode(datas[i]).to(device)
                    except Exception:  # noqa: BLE001
                        bad.append(i)
    for i in sorted(out):  # the contract, whatever a decoder returned: uint8 [3, H, W] or reported as bad
        img = _rgb_uint8(out[i])
        if img is None:
            try:
                img = _rgb_uint8(_pil_decode(datas[i]))
            except Exception:  # noqa: BLE001
                img = None
        if img is None:
            del out[i]
            bad.append(i)
        else:
            out[i] = img.to(device)
    bad.sort()
    if bad:
        log.warning("decode_batch: skipped %d undecodable image(s) at batch indices %s", len(bad), bad)
    return [out[i] for i in sorted(out)], bad
