"""JPEG-bytes decode path: workers ship raw file bytes; the batch is decoded on the GPU (nvjpeg) when there is one.

``decode_batch(bytes_list, device) -> (images, bad)``: ``images`` are uint8 ``[3, H, W]`` RGB on ``device`` in input
order with bad files left out; ``bad`` lists the input indices that could not be decoded. It never raises for bad
data. Routing:

* first, the image's size is read from its header (JPEG frame header, PNG IHDR, PIL's lazy open for anything
  else) and an image of more than ``max_image_pixels()`` pixels (width x height; ``$ZOO_MAX_IMAGE_PIXELS``, default
  PIL's 89,478,485) is reported in ``bad`` without being decoded: a 250 KB PNG can declare 16000x16000 pixels
  (768 MB as RGB). An image whose size cannot be read is reported too;
* baseline/progressive 3-component JPEGs -> one batched ``torchvision.io.decode_jpeg(list, device="cuda")`` call
  (CPU ``decode_jpeg`` without a GPU); if the batched call fails, each image is retried alone so one bad file cannot
  sink the batch;
* other JPEGs (CMYK/YCCK, grayscale) and PNGs (also when saved as .JPEG) -> ``torchvision.io.decode_image`` on CPU
  with RGB conversion, then PIL as the last resort (PIL converts CMYK with the Adobe inversion); every other format
  (GIF, WebP, TIFF, BMP; PIL opens nothing else) -> PIL, which decodes only the first frame (torchvision would
  decode every GIF frame);
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
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["decode_batch", "sniff", "jpeg_components", "image_size", "max_image_pixels", "pil_to_rgb_array",
           "scale_to_uint8", "DEFAULT_MAX_IMAGE_PIXELS", "MAX_PIXELS_ENV"]

log = logging.getLogger(__name__)

# PIL's default limit (1024**3 // 4 // 3: a 1 GiB RGB image at 4 bytes a pixel); ZOO_MAX_IMAGE_PIXELS changes it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_PIXELS_ENV = "ZOO_MAX_IMAGE_PIXELS"

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


def _jpeg_frame(data: torch.Tensor) -> tuple[int, int, int] | None:
    """(height, width, components) from the first JPEG frame header (SOFn); None when there is none.

    Segments are walked by their length fields and junk between markers is skipped, as libjpeg and PIL do, so
    this is the frame header every decoder here uses.
    """
    buf = data.numpy().tobytes()
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:  # junk before a marker (libjpeg warns "extraneous bytes" and skips it)
            i += 1
            continue
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01, 0x00) or 0xD0 <= marker <= 0xD7:  # standalone markers (and stuffed zero)
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header: no frame
            return None
        seg_len = int.from_bytes(buf[i + 2:i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 10 > n:
                return None
            return (int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big"), buf[i + 9])
        i += 2 + seg_len
    return None


def jpeg_components(data: torch.Tensor) -> int | None:
    """Number of colour components from the JPEG frame header (SOFn); None when no header is found."""
    frame = _jpeg_frame(data)
    return frame[2] if frame else None


def max_image_pixels() -> int:
    """The pixel limit (width x height) checked before every decode: ``$ZOO_MAX_IMAGE_PIXELS`` or PIL's default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive whole number of pixels (width x height); "
                         f"unset it for the default {DEFAULT_MAX_IMAGE_PIXELS:,}")
    return value


# What PIL may open: the formats ImageFolder lists. Never EPS/PDF and the like (PIL runs Ghostscript for EPS).
_PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")


def _pil_open(data: torch.Tensor, limit: int):
    """PIL image opened lazily (header only), with PIL's own bomb check set to ``limit`` while it opens: some
    plugins (WebP) allocate their canvas while opening, after checking only PIL's limit."""
    from PIL import Image

    Image.init()  # registers every plugin once (TIFF is not preloaded); open() then sticks to _PIL_FORMATS
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = -(-limit // 2)  # PIL refuses above twice its setting: i.e. above ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data.numpy().tobytes()), formats=_PIL_FORMATS)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _header_size(data: torch.Tensor) -> tuple[int, int, bool] | None:
    """(width, height, whether torchvision reads the same header) without decoding pixels; None when unknown."""
    kind = sniff(data)
    if kind == "empty":
        return None
    if kind == "jpeg":
        frame = _jpeg_frame(data)
        if frame and frame[0] and frame[1]:
            return frame[1], frame[0], True
    elif kind == "png" and data.numel() >= 24:
        head = data[8:24].numpy().tobytes()
        if head[:8] == b"\x00\x00\x00\rIHDR":  # IHDR is always the first chunk; libpng and PIL read it first
            return int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big"), True
    from PIL import Image

    try:  # any other format (and a JPEG/PNG header we could not parse): PIL's lazy open, then PIL decodes it
        with _pil_open(data, max_image_pixels()) as im:
            return im.size[0], im.size[1], False
    except Image.DecompressionBombError:
        return -1, -1, False  # over the limit; PIL does not say by how much
    except Exception:  # noqa: BLE001 - PIL cannot identify it: unknown size
        return None


def image_size(data: torch.Tensor | bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding any pixel; None when it cannot be read."""
    found = _header_size(_as_bytes_tensor(data))
    return None if found is None or found[0] < 0 else found[:2]


class _OverLimit(ValueError):
    """The header declares more pixels than the limit; nothing was decoded."""


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
    limit = max_image_pixels()
    with _pil_open(data, limit) as im:
        if im.size[0] * im.size[1] > limit:  # the first frame is all PIL decodes
            raise _OverLimit(f"{im.size[0]}x{im.size[1]}")
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


def _cpu_decode(data: torch.Tensor, torchvision_ok: bool = True) -> torch.Tensor:
    """torchvision CPU decode (JPEG and PNG, whose header size was checked) with RGB conversion; PIL for every other
    format (first frame only: torchvision would decode every frame of a GIF) and when torchvision fails."""
    from torchvision.io import ImageReadMode, decode_image

    if torchvision_ok and sniff(data) in ("jpeg", "png"):
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
    limit = max_image_pixels()
    out: dict[int, torch.Tensor] = {}
    bad: list[int] = []
    over: list[str] = []
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
        size = _header_size(data)  # the pixel limit is checked here, before any decoder allocates anything
        if size is None:
            bad.append(i)
        elif size[0] < 0 or size[0] * size[1] > limit:
            bad.append(i)
            over.append(f"{i}: {size[0]}x{size[1]}" if size[0] >= 0 else f"{i}: over it by PIL's header check")
        elif size[2] and sniff(data) == "jpeg" and jpeg_components(data) == 3 and _complete_jpeg(data):
            fast.append(i)
        else:
            try:
                out[i] = _cpu_decode(data, size[2]).to(device)
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
    if over:
        log.warning("decode_batch: %d of them declare more than %s pixels (%s); raise %s to decode them",
                    len(over), f"{limit:,}", ", ".join(over), MAX_PIXELS_ENV)
    return [out[i] for i in sorted(out)], bad
