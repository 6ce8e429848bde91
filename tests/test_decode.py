"""augment.decode: real JPEG / PNG / CMYK / grayscale / corrupt files written with PIL, decoded in one batch."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from augment import decode
from augment.decode import decode_batch, jpeg_components, sniff


def _smooth_rgb(h=24, w=32) -> Image.Image:
    # smooth gradients keep JPEG error small, so decodes can be compared with the original pixels
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 60], -1).astype(np.uint8)
    return Image.fromarray(arr)


def _write(path, img: Image.Image, fmt: str, **kw) -> bytes:
    img.save(path, fmt, **kw)
    return path.read_bytes()


def _tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


@pytest.fixture()
def files(tmp_path):
    rgb = _smooth_rgb()
    out = {
        "rgb": _write(tmp_path / "a.JPEG", rgb, "JPEG", quality=95),
        "cmyk": _write(tmp_path / "cmyk.JPEG", rgb.convert("CMYK"), "JPEG", quality=95),
        "gray": _write(tmp_path / "gray.JPEG", rgb.convert("L"), "JPEG", quality=95),
        "png_named_jpeg": _write(tmp_path / "png.JPEG", rgb, "PNG"),
        "progressive": _write(tmp_path / "prog.JPEG", rgb, "JPEG", quality=95, progressive=True),
    }
    full = out["rgb"]
    out["empty"] = b""
    out["truncated"] = full[: len(full) // 2]
    out["garbage"] = bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))
    out["jpeg_header_then_garbage"] = full[:20] + bytes(300)
    return rgb, out


def test_magic_and_frame_header_parsing(files):
    _, f = files
    assert sniff(_tensor(f["rgb"])) == "jpeg" and sniff(_tensor(f["png_named_jpeg"])) == "png"
    assert sniff(_tensor(b"")) == "empty" and sniff(_tensor(f["garbage"])) == "other"
    assert jpeg_components(_tensor(f["rgb"])) == 3
    assert jpeg_components(_tensor(f["cmyk"])) == 4
    assert jpeg_components(_tensor(f["gray"])) == 1
    assert jpeg_components(_tensor(f["progressive"])) == 3


def test_decode_batch_handles_every_kind_and_reports_bad_by_index(files, caplog):
    rgb, f = files
    names = list(f)
    with caplog.at_level(logging.WARNING, logger="augment.decode"):
        imgs, bad = decode_batch([_tensor(f[k]) for k in names], device="cpu")
    bad_names = {names[i] for i in bad}
    assert bad_names == {"empty", "truncated", "garbage", "jpeg_header_then_garbage"}
    assert "skipped 4" in caplog.text
    good = [k for k in names if k not in bad_names]
    assert len(imgs) == len(good)
    ref = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()
    gray_ref = torch.from_numpy(np.array(rgb.convert("L"))).float()
    for name, img in zip(good, imgs):
        assert img.dtype == torch.uint8 and img.shape == (3, 24, 32), name
        if name == "gray":  # grayscale is repeated to RGB
            assert torch.equal(img[0], img[1]) and (img[0].float() - gray_ref).abs().mean() < 3
        else:
            assert (img.float() - ref).abs().mean() < 6, name  # lossy JPEG (and CMYK conversion) error


def test_cmyk_decode_matches_pil(files):
    _, f = files
    imgs, bad = decode_batch([_tensor(f["cmyk"])])
    with Image.open(io.BytesIO(f["cmyk"])) as im:
        pil = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
    assert bad == [] and (imgs[0].float() - pil).abs().mean() < 3


def test_accepts_raw_bytes_and_never_raises_on_wrong_types(files):
    _, f = files
    imgs, bad = decode_batch([f["rgb"], torch.zeros(3, 3), f["png_named_jpeg"]])
    assert bad == [1] and len(imgs) == 2


def test_cuda_request_without_gpu_falls_back_to_cpu(files, monkeypatch):
    _, f = files
    monkeypatch.setattr(decode, "_gpu_available", lambda device: False)
    imgs, bad = decode_batch([_tensor(f["rgb"]), _tensor(f["gray"])], device="cuda")
    assert bad == [] and all(i.device.type == "cpu" for i in imgs)


def _broken_entropy_jpeg(full: bytes) -> bytes:
    """Valid headers and EOI marker around random entropy-coded data that both torchvision and PIL reject."""
    from torchvision.io import decode_jpeg

    sos = full.index(b"\xff\xda")
    for seed in range(200):
        junk = bytes(np.random.default_rng(seed).integers(0, 256, 200, dtype=np.uint8))
        cand = full[:sos + 14] + junk + b"\xff\xd9"
        try:
            decode_jpeg(_tensor(cand))
        except RuntimeError:
            try:
                decode._pil_decode(_tensor(cand))
            except OSError:
                return cand
    raise AssertionError("no rejected variant found")


def test_one_bad_file_does_not_sink_the_batched_decode(files):
    """A file that passes the header checks but fails the batched call is retried alone and reported."""
    _, f = files
    full = f["rgb"]
    broken = _broken_entropy_jpeg(full)
    assert jpeg_components(_tensor(broken)) == 3  # it does go to the batched decoder
    imgs, bad = decode_batch([_tensor(full), _tensor(broken), _tensor(full)])
    assert bad == [1] and len(imgs) == 2 and torch.equal(imgs[0], imgs[1])


def test_torchvision_decodes_without_pil(files, monkeypatch):
    """PIL is only the last resort: JPEG (batched), grayscale and PNG go through torchvision."""
    _, f = files

    def no_pil(data):
        raise AssertionError("PIL fallback used")

    monkeypatch.setattr(decode, "_pil_decode", no_pil)
    imgs, bad = decode_batch([_tensor(f[k]) for k in ("rgb", "gray", "png_named_jpeg", "progressive")])
    assert bad == [] and len(imgs) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg); CPU fallback tested above")
def test_gpu_decode_matches_cpu(files):
    _, f = files
    keys = ["rgb", "cmyk", "gray", "png_named_jpeg", "truncated"]
    gpu, bad_g = decode_batch([_tensor(f[k]) for k in keys], device="cuda")
    cpu, bad_c = decode_batch([_tensor(f[k]) for k in keys], device="cpu")
    assert bad_g == bad_c == [4]
    for a, b in zip(gpu, cpu):
        assert a.is_cuda and (a.cpu().float() - b.float()).abs().mean() < 2
