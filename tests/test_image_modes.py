"""Every image mode Pillow opens becomes uint8 RGB ``[3, H, W]`` -- through ``decode_batch`` (the bytes / device
path), through its PIL fallback alone, and through the image-folder dataset (worker decode) -- or is skipped.

The files are real encoded files written by Pillow (16-bit RGB / grey-alpha PNG by a tiny PNG writer below: Pillow
cannot write them), each holding a known gradient so the decoded values can be checked, not only the dtype.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from augment import decode
from augment.decode import decode_batch, pil_to_rgb_array, scale_to_uint8
from zoo.data import collate_images
from zoo.data.images import ImageFolderDataset

H, W = 8, 12
G8 = np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))  # horizontal 0..255 ramp
RGB = np.stack([G8, G8[::-1], np.full_like(G8, 100)], -1)  # rows of the ramp, reversed rows, constant blue
GREY = np.repeat(G8[:, :, None], 3, axis=2)


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count) of a uint16 ``[H, W(, C)]`` array."""
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _mode_files() -> dict[str, tuple[str, bytes, np.ndarray, float, str]]:
    """name -> (file extension, encoded bytes, expected RGB uint8 [H, W, 3], mean abs tolerance, mode PIL opens)."""
    rgb, grey = Image.fromarray(RGB), Image.fromarray(G8)
    g16 = G8.astype(np.uint16) * 257  # the 8-bit ramp at 16 bits: must come back as exactly the 8-bit ramp
    pal = rgb.quantize(colors=16)  # palette image; its own RGB is the reference
    pal_rgb = np.asarray(pal.convert("RGB"))
    binary = G8 > 127
    binary_rgb = np.repeat(binary[:, :, None] * np.uint8(255), 3, 2)
    second = Image.fromarray(255 - RGB)  # the second frame of the multi-frame files: must not be the one decoded
    out = {
        "1": (".png", _enc(Image.fromarray(binary), "PNG"), binary_rgb, 0, "1"),
        "L": (".png", _enc(grey, "PNG"), GREY, 0, "L"),
        "P": (".png", _enc(pal, "PNG"), pal_rgb, 0, "P"),
        "P_transparency": (".png", _enc(pal, "PNG", transparency=0), pal_rgb, 0, "P"),
        "LA": (".png", _enc(grey.convert("LA"), "PNG"), GREY, 0, "LA"),
        "RGBA": (".png", _enc(Image.fromarray(np.dstack([RGB, 255 - G8])), "PNG"), RGB, 0, "RGBA"),
        "CMYK_tiff": (".tiff", _enc(rgb.convert("CMYK"), "TIFF"), RGB, 0, "CMYK"),
        "YCbCr_tiff": (".tiff", _enc(rgb.convert("YCbCr"), "TIFF"), RGB, 3, "YCbCr"),
        "LAB_tiff": (".tiff", _enc(rgb.convert("LAB"), "TIFF"), RGB, 6, "LAB"),
        "I_tiff": (".tif", _enc(Image.fromarray(g16.astype(np.int32)), "TIFF"), GREY, 0, "I"),
        "I16_png": (".png", _enc(Image.fromarray(g16), "PNG"), GREY, 0, "I;16"),
        "I16_tiff": (".tiff", _enc(Image.fromarray(g16), "TIFF"), GREY, 0, "I;16"),
        "I16B_tiff": (".tiff", _enc(Image.frombytes("I;16B", (W, H), g16.astype(">u2").tobytes()), "TIFF"),
                      GREY, 0, "I;16B"),
        "I16L_tiff": (".tiff", _enc(Image.frombytes("I;16L", (W, H), g16.astype("<u2").tobytes()), "TIFF"),
                      GREY, 0, "I;16"),
        "F_tiff": (".tiff", _enc(Image.fromarray((G8 / 255).astype(np.float32)), "TIFF"), GREY, 0, "F"),
        "RGB16_png": (".png", _png16(RGB.astype(np.uint16) * 257), RGB, 0, "RGB"),
        "LA16_png": (".png", _png16(np.dstack([g16, 65535 - g16])), GREY, 0, "RGBA"),  # Pillow opens it as RGBA
        "RGBA16_png": (".png", _png16(np.dstack([RGB.astype(np.uint16) * 257, g16])), RGB, 0, "RGBA"),
        "gif_multiframe": (".gif", _enc(pal, "GIF", save_all=True, append_images=[second.quantize(16)]), pal_rgb, 0,
                           "P"),
        "tiff_multiframe": (".tiff", _enc(rgb, "TIFF", save_all=True, append_images=[second]), RGB, 0, "RGB"),
        "jpeg_grey": (".JPEG", _enc(grey, "JPEG", quality=95), GREY, 3, "L"),
        "jpeg_cmyk": (".JPEG", _enc(rgb.convert("CMYK"), "JPEG", quality=95), RGB, 6, "CMYK"),
        "jpeg_progressive": (".JPEG", _enc(rgb, "JPEG", quality=95, progressive=True), RGB, 6, "RGB"),
        "webp": (".webp", _enc(rgb, "WEBP", lossless=True), RGB, 0, "RGB"),
        "bmp": (".bmp", _enc(rgb, "BMP"), RGB, 0, "RGB"),
        "tiff": (".tiff", _enc(rgb, "TIFF"), RGB, 0, "RGB"),
    }
    return out


FILES = _mode_files()


def _tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _check(name: str, img: torch.Tensor) -> None:
    _, _, want, tol, _ = FILES[name]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, H, W), (name, img.dtype, tuple(img.shape))
    err = (img.permute(1, 2, 0).float() - torch.from_numpy(np.array(want)).float()).abs().mean().item()
    assert err <= tol + 1e-6, (name, err)


def test_files_really_are_the_modes_they_claim():
    for name, (_, data, _, _, mode) in FILES.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == mode, name
    with Image.open(io.BytesIO(FILES["gif_multiframe"][1])) as im:
        assert im.n_frames == 2
    with Image.open(io.BytesIO(FILES["tiff_multiframe"][1])) as im:
        assert im.n_frames == 2


def test_decode_batch_gives_uint8_rgb_for_every_mode():
    """The bytes path (``decode: device``; the CPU half of it without a GPU), all modes in one batch."""
    names = list(FILES)
    imgs, bad = decode_batch([_tensor(FILES[k][1]) for k in names], device="cpu")
    assert bad == [] and len(imgs) == len(names)
    for name, img in zip(names, imgs):
        _check(name, img)


@pytest.mark.parametrize("name", list(FILES))
def test_pil_path_gives_uint8_rgb_for_every_mode(name):
    """PIL alone (what every file torchvision cannot decode goes through) agrees with the expected pixels."""
    _check(name, decode._pil_decode(_tensor(FILES[name][1])))


def test_torchvision_16bit_png_is_scaled_not_passed_on_as_uint16():
    """torchvision returns uint16 for 16-bit PNGs; decode_batch must scale them, exactly: 257 k -> k."""
    from torchvision.io import ImageReadMode, decode_image

    data = _tensor(FILES["RGB16_png"][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert decode_image(data, mode=ImageReadMode.RGB).dtype == torch.uint16  # the trap this guards against
    imgs, bad = decode_batch([data])
    assert bad == [] and torch.equal(imgs[0], torch.from_numpy(RGB).permute(2, 0, 1))
    # arbitrary 16-bit values: round(v / 257)
    v = np.array([[0, 1, 128, 129, 385, 386, 32767, 65534, 65535]], dtype=np.uint16)
    imgs, bad = decode_batch([_tensor(_png16(v))])
    assert imgs[0][0, 0].tolist() == [0, 0, 0, 1, 1, 2, 127, 255, 255]


def test_imagefolder_worker_and_device_paths_decode_every_mode(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        folder = root / split / "modes"
        folder.mkdir(parents=True)
        for name, (ext, data, *_rest) in FILES.items():
            (folder / f"{name}{ext}").write_bytes(data)
    ds = ImageFolderDataset(root, "train")
    assert len(ds) == len(FILES)  # .tif / .tiff / .gif are listed too
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == [] and isinstance(batch["image"], torch.Tensor)
    for (path, _), img in zip(ds.samples, batch["image"]):
        _check(path.stem, img)
    raw = ImageFolderDataset(root, "val", decode="device")
    imgs, bad = decode_batch([raw[i][0] for i in range(len(raw))])
    assert bad == []
    for (path, _), img in zip(raw.samples, imgs):
        _check(path.stem, img)


def test_in_memory_modes_without_a_file_format():
    """HSV (no format stores it) and the rest through ``pil_to_rgb_array`` directly."""
    rgb = Image.fromarray(RGB)
    assert np.abs(pil_to_rgb_array(rgb.convert("HSV")).astype(int) - RGB).mean() < 2
    assert np.array_equal(pil_to_rgb_array(rgb.convert("RGBX")), RGB)
    assert np.array_equal(pil_to_rgb_array(Image.fromarray(G8).convert("I")), GREY)  # I holding 8-bit values


@pytest.mark.parametrize("values, want", [
    (np.array([0, 257, 65535], np.uint16), [0, 1, 255]),  # 16-bit container: always / 257
    (np.array([0, 100, 255], np.uint16), [0, 0, 1]),  # ... even when dark (the container says 16 bits)
    (np.array([0, 100, 255], np.int32), [0, 100, 255]),  # I: values fit 8 bits -> as they are
    (np.array([0, 257, 65535], np.int32), [0, 1, 255]),  # I: values fit 16 bits -> / 257
    (np.array([-10, 0, 10], np.int32), [0, 128, 255]),  # I: negative -> stretched min..max
    (np.array([0, 70000, 140000], np.int32), [0, 128, 255]),  # I: beyond 16 bits -> stretched
    (np.array([0.0, 0.5, 1.0], np.float32), [0, 128, 255]),  # F in [0, 1] -> * 255
    (np.array([0.0, 1.5, 255.0], np.float32), [0, 2, 255]),  # F in [0, 255] -> as is (rounded)
    (np.array([-1.0, 0.0, 1.0], np.float32), [0, 128, 255]),  # F with negatives -> stretched
    (np.array([np.nan, 0.5, np.inf], np.float32), [0, 128, 128]),  # NaN -> 0, inf -> finite max
    (np.array([5.0, 5.0], np.float32), [5, 5]),  # constant, in [0, 255]: as is
    (np.array([-5.0, -5.0], np.float32), [0, 0]),  # constant out of range: 0
    (np.array([True, False]), [255, 0]),
])
def test_high_bit_depth_rule(values, want):
    assert scale_to_uint8(values).tolist() == want


def test_what_no_decoder_can_make_rgb_is_skipped(monkeypatch):
    """A decoder returning something other than uint8 RGB is not passed on: PIL is tried, then it is reported."""
    from torchvision import io as tvio

    good = _tensor(FILES["RGB16_png"][1])
    monkeypatch.setattr(tvio, "decode_image", lambda data, mode=None: torch.zeros(3, 4, 4, dtype=torch.float32))
    imgs, bad = decode_batch([good])
    assert bad == [] and imgs[0].dtype == torch.uint8  # PIL rescued it
    monkeypatch.setattr(decode, "_pil_decode", lambda data: torch.zeros(4, 4, dtype=torch.uint8))
    imgs, bad = decode_batch([good])
    assert bad == [0] and imgs == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg); the CPU path is tested above")
def test_every_mode_on_the_gpu_path_matches_cpu():
    names = list(FILES)
    gpu, bad_g = decode_batch([_tensor(FILES[k][1]) for k in names], device="cuda")
    cpu, bad_c = decode_batch([_tensor(FILES[k][1]) for k in names], device="cpu")
    assert bad_g == bad_c == []
    for name, a, b in zip(names, gpu, cpu):
        assert a.is_cuda and a.dtype == torch.uint8 and a.shape == b.shape, name
        assert (a.cpu().float() - b.float()).abs().mean() < 2, name
