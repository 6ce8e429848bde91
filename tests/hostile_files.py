"""Crafted hostile inputs (pickles, decompression bombs, truncated / empty / foreign files) and a harness that feeds
them to every loader entry point in a child process.

``hostile_files(folder, marker)`` writes the files and yields ``(name, path)``; a file whose payload would run code
creates ``marker`` if it ever runs. ``PIXEL_BOMBS`` names the images whose header declares more pixels than the
default limit. ``python tests/hostile_files.py LOADER[,LOADER...] MARKER FILE...`` (what ``run_harness`` starts) loads each
file with each entry point under an address-space limit of 1.5 GiB above what the imports use, and prints one
``RESULT {json}`` line per file: outcome (refused / skipped / loaded), exception type, message, peak-RSS growth and
how many times a pixel decoder ran. A segfault ends the child; the ``START`` line before it names the file.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Iterator

LOADERS = ("official", "load_backbone", "safe_torch_load", "decode_device", "imagefolder", "cifar")
PIXEL_BOMBS = ("png_bomb_16000.png", "jpeg_bomb_65500.jpg", "gif_screen_bomb.gif", "tiff_bomb.tiff",
               "webp_bomb.webp", "bmp_bomb.bmp", "jpeg_progressive_bomb.jpg", "jpeg_exif_bomb.jpg",
               "webp_lossy_bomb.webp", "gif_frame_bomb.gif", "bmp_topdown_bomb.bmp", "png_ihdr_huge.png",
               "tiff_bomb_as_jpg.jpg", "png_bomb_as_jpg.jpg")


# -- a tiny pickle assembler (protocol 2 header; later opcodes are still read by every unpickler) ------------------
def _g(mod: str, name: str) -> bytes:
    return b"c" + f"{mod}\n{name}\n".encode()


def _u(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _b(b: bytes) -> bytes:
    return (b"C" + bytes([len(b)]) if len(b) < 256 else b"B" + struct.pack("<I", len(b))) + b


def _i(n: int) -> bytes:
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _t(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def _r(func: bytes, *args: bytes) -> bytes:
    return func + _t(*args) + b"R"


def _put(k: int) -> bytes:
    return b"r" + struct.pack("<I", k)


def _get(k: int) -> bytes:
    return b"j" + struct.pack("<I", k)


def _pk(body: bytes, proto: int = 2) -> bytes:
    return b"\x80" + bytes([proto]) + body + b"."


def _release(leaf: bytes) -> bytes:
    """{'experiment_state': {'online_params': {'res_net50/~/initial_conv': {'w': leaf}}, ...}} around ``leaf``."""
    module = b"}" + _u("w") + leaf + b"s"
    params = b"}" + _u("res_net50/~/initial_conv") + module + b"s"
    es = b"}(" + b"".join(_u(f) + (params if f == "online_params" else b"}") for f in
                          ("online_params", "target_params", "online_state", "target_state")) + b"u"
    return _pk(b"}" + _u("experiment_state") + es + b"s")


_RECON = _r(_g("numpy.core.multiarray", "_reconstruct"), _g("numpy", "ndarray"), _t(_i(0)), _b(b"b"))


def _dtype(code: str) -> bytes:
    return _r(_g("numpy", "dtype"), _u(code), b"\x89", b"\x88")


def _array(shape: tuple[int, ...], dtype: bytes, data: bytes) -> bytes:
    return _RECON + _t(_i(1), _t(*(_i(d) for d in shape)), dtype, b"\x89", data) + b"b"


def _dag_list(depth: int, fan: int, first_memo: int = 100) -> bytes:
    """A list of ``fan`` references to a list of ``fan`` references ... (``fan ** depth`` leaves, a few KB)."""
    out = b"(K\x00l" + _put(first_memo) + b"0"  # each level is memoised, then popped: only the top stays
    for k in range(depth):
        out += b"(" + _get(first_memo + k) * fan + b"l" + _put(first_memo + k + 1) + b"0"
    return out + _get(first_memo + depth)


def _dag_tuple(depth: int) -> bytes:
    out = b"K\x00\x85" + _put(0) + b"0"
    for k in range(depth):
        out += _get(k) + _get(k) + b"\x86" + _put(k + 1) + b"0"
    return out + _get(depth)


def _pickles(marker: str) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    f8 = _dtype("f8")
    big = 1_300_000_000
    return {
        # object dtypes: bytes read as pointers (the C path segfaults), object scalars, object fields
        "pkl_object_array_pointer.pkl": _release(_array((2,), _dtype("O8"), _b(b"\x41" * 16))),
        "pkl_object_array_dill.pkl": _release(_r(_g("dill._dill", "_create_array"),
                                                 _g("numpy.core.multiarray", "_reconstruct"),
                                                 _t(_g("numpy", "ndarray"), _t(_i(0)), _b(b"b")),
                                                 _t(_i(1), _t(_i(2)), _dtype("O8"), b"\x89", _b(b"\x41" * 16)), b"N")),
        "pkl_object_dtype_reconstruct.pkl": _release(_r(_g("numpy.core.multiarray", "_reconstruct"),
                                                        _g("numpy", "ndarray"), _t(_i(4)), _u("O"))),
        "pkl_object_scalar.pkl": _release(_r(_g("numpy.core.multiarray", "scalar"), _dtype("O8"), _u("x"))),
        "pkl_object_field_state.pkl": _release(f8 + _t(_i(3), _u("|"), b"N", _t(_u("a")),
                                                       b"}" + _u("a") + _t(_dtype("O8"), _i(0)) + b"s",
                                                       _i(8), _i(8), _i(63)) + b"b"),
        "pkl_object_type_class.pkl": _release(_r(_g("numpy", "dtype"), _g("numpy", "object_"))),
        # huge dtypes / shapes from a few bytes
        "pkl_scalar_huge_void.pkl": _release(_r(_g("numpy.core.multiarray", "scalar"),
                                                _r(_g("numpy", "dtype"), _u("V2000000000"), b"\x89", b"\x88"),
                                                _b(b"\x00" * 8))),
        "pkl_subarray_dtype_state.pkl": _release(_array((1,), f8 + _t(_i(3), _u("|"), _t(f8, _t(_i(100_000_000))),
                                                                       b"N", b"N", _i(800_000_000), _i(8), _i(0))
                                                        + b"b", _b(b"\x00" * 8))),
        "pkl_negative_shape.pkl": _release(_array((-5,), f8, _b(b""))),
        "pkl_huge_shape.pkl": _release(_array((2 ** 30, 2 ** 30), f8, _b(b"\x00" * 8))),
        "pkl_shape_overflow.pkl": _release(_array((2 ** 40, 2 ** 40, 0), f8, _b(b""))),
        "pkl_zero_itemsize.pkl": _release(_r(_g("numpy.core.multiarray", "_reconstruct"), _g("numpy", "ndarray"),
                                             _t(_i(2 ** 40)), _u("S0"))),
        "pkl_reconstruct_huge.pkl": _release(_r(_g("numpy.core.multiarray", "_reconstruct"), _g("numpy", "ndarray"),
                                                _t(_i(big)), _u("f8"))),
        "pkl_bigendian_fortran_huge.pkl": _release(_array((40000, 40000), _dtype(">f8"), _b(b"\x00" * 64))),
        # length fields that lie (the C unpickler allocates before reading) and memo abuse
        "pkl_binbytes8_lie.pkl": b"\x80\x04\x8e" + struct.pack("<Q", big) + b"x" * 64,
        "pkl_bytearray8_lie.pkl": b"\x80\x05\x96" + struct.pack("<Q", big) + b"x" * 64,
        "pkl_binunicode8_lie.pkl": b"\x80\x04\x8d" + struct.pack("<Q", big) + b"x" * 64,
        "pkl_binstring_lie.pkl": b"\x80\x02T" + struct.pack("<i", 2 ** 31 - 1) + b"x" * 64,
        "pkl_long4_lie.pkl": b"\x80\x02\x8b" + struct.pack("<i", 2 ** 31 - 1) + b"x" * 64,
        "pkl_frame_lie.pkl": b"\x80\x04\x95" + struct.pack("<Q", big) + b"x" * 64,
        "pkl_memo_index.pkl": _pk(b"N" + _put(0xFFFFFFF0)),
        "pkl_bytes_n.pkl": _release(_r(_g("__builtin__", "bytes"), _i(big))),
        # one record shared through the memo many times
        "pkl_memo_amplify_arrays.pkl": _release(_b(b"\x00" * 80_000) + _put(1) + f8 + _put(2) + b"(" +
                                                (_RECON + _t(_i(1), _t(_i(10_000)), _get(2), b"\x89", _get(1))
                                                 + b"b") * 2000 + b"l"),
        "pkl_memo_amplify_encode.pkl": _release(_u("a" * 80_000) + _put(1) + b"(" +
                                                _r(_g("_codecs", "encode"), _get(1), _u("latin1")) * 2000 + b"l"),
        "pkl_memo_amplify_list.pkl": _release(b"(" + b"N" * 20_000 + b"l" + _put(1) + b"(" +
                                              _r(_g("__builtin__", "list"), _get(1)) * 2000 + b"l"),
        # DAGs that a walk, a conversion, a repr or a hash would expand exponentially
        "pkl_dag_leaf.pkl": _release(_dag_list(6, 64)),
        "pkl_dag_numpy_call.pkl": _release(_r(_g("numpy", "float32"), _dag_list(5, 64))),
        "pkl_dag_str.pkl": _release(_r(_g("__builtin__", "str"), _dag_list(5, 64))),
        "pkl_dag_key_hash.pkl": _release(b"}" + _dag_tuple(64) + b"Ns"),
        "pkl_setitem_on_array.pkl": _release(_array((4,), f8, _b(b"\x00" * 32)) + _t(b"N") + _dag_list(4, 64)
                                             + b"s"),
        # recursion
        "pkl_self_list.pkl": _release(b"]" + _put(7) + _get(7) + b"a"),
        "pkl_self_dict.pkl": _pk(b"}" + _put(0) + _u("experiment_state") + _get(0) + b"s"),
        "pkl_deep_tuple.pkl": _release(b"N" + b"\x85" * 200_000),
        "pkl_deep_list.pkl": _release(b"(" * 100_000 + b"N" + b"l" * 100_000),
        "pkl_deep_key.pkl": _release(b"}" + b"N" + b"\x85" * 100_000 + b"Ns"),
        # code execution (creates the marker if it ever runs)
        "pkl_os_system.pkl": _release(_r(_g("os", "system"), _u(cmd))),
        "pkl_posix_system.pkl": _release(_r(_g("posix", "system"), _u(cmd))),
        "pkl_eval.pkl": _release(_r(_g("__builtin__", "eval"), _u(f"__import__('os').system({cmd!r})"))),
        "pkl_inst_os_system.pkl": _release(b"(" + _u(cmd) + b"ios\nsystem\n"),
        "pkl_stack_global.pkl": _release(_u("os") + _u("system") + b"\x93" + _t(_u(cmd)) + b"R"),
        "pkl_dill_import_os.pkl": _release(_r(_r(_g("dill._dill", "_get_attr"),
                                                 _r(_g("dill._dill", "_import_module"), _u("os")), _u("system")),
                                              _u(cmd))),
        "pkl_newobj_str.pkl": _release(_g("__builtin__", "str") + _t(_dag_list(5, 64)) + b"\x81"),
        "pkl_reconstructor.pkl": _release(_r(_g("copy_reg", "_reconstructor"), _g("subprocess", "Popen"),
                                             _g("__builtin__", "object"), b"N")),
        "pkl_ext.pkl": _release(b"\x82\x01"),
        # more globals a reader must refuse by name (or bound): other spellings, callables that import or call
        "pkl_umath_reconstruct_object.pkl": _release(_r(_g("numpy.core._multiarray_umath", "_reconstruct"),
                                                        _g("numpy", "ndarray"), _t(_i(2)), _u("O"))),
        "pkl_masked_array.pkl": _release(_r(_g("numpy.core.multiarray", "_reconstruct"),
                                            _g("numpy.ma.core", "MaskedArray"), _t(_i(2)), _u("f8"))),
        "pkl_randomstate.pkl": _release(_r(_g("numpy.random._pickle", "__randomstate_ctor"), _u("MT19937"))),
        "pkl_getattr.pkl": _release(_r(_g("builtins", "getattr"), _g("os", "path"), _u("join"))),
        "pkl_import.pkl": _release(_r(_g("builtins", "__import__"), _u("os"))),
        "pkl_partial.pkl": _release(_r(_g("functools", "partial"), _g("os", "system"), _u(cmd))),
        "pkl_codecs_rot13.pkl": _release(_r(_g("_codecs", "encode"), _u("abc"), _u("rot13"))),
        "pkl_builtins_type.pkl": _release(_r(_g("builtins", "type"), _u("X"), _t(), b"}")),
        "pkl_np_load.pkl": _release(_r(_g("numpy", "load"), _u("/etc/passwd"))),
        "pkl_dtype_struct.pkl": _release(_r(_g("numpy", "dtype"), _u("i4,f8"))),
        "pkl_dtype_datetime.pkl": _release(_r(_g("numpy", "dtype"), _u("M8[ns]"))),
        "pkl_set_dag.pkl": _release(_r(_g("__builtin__", "set"), _dag_list(5, 64))),
        "pkl_frozenset_dag.pkl": _release(b"(" + _dag_tuple(64) + b"\x91"),
        "pkl_persid.pkl": _release(b"Pdata\n"),
    }


def _png_bomb(w: int = 16000, h: int = 16000) -> bytes:
    """A grey PNG of ``w x h`` zero pixels in ~250 KB: the same compressed chunk repeated after full flushes."""
    rows = min(1000, h)
    assert h % rows == 0, "the height must be a multiple of the 1000-row chunk"
    chunk = bytes((w + 1) * rows)
    c = zlib.compressobj(9)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    n = (w + 1) * h
    idat = first + again * (h // rows - 1) + b"\x03\x00" + (((n % 65521) << 16) | 1).to_bytes(4, "big")

    def chunk_bytes(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk_bytes(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk_bytes(b"IDAT", idat) + chunk_bytes(b"IEND", b""))


def _small(fmt: str, **kw) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg_bomb(data: bytes | None = None, sof: bytes = b"\xff\xc0") -> bytes:
    """A JPEG whose frame header (``sof``: baseline C0, progressive C2) declares 65500x65500."""
    data = bytearray(_small("JPEG") if data is None else data)
    i = data.index(sof)
    data[i + 5:i + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def _more_bombs() -> dict[str, bytes]:
    """The same class through other headers: progressive JPEG, a 64 KB EXIF block before the frame header, lossy
    WebP (VP8), a GIF frame larger than its screen, a top-down BMP, a PNG of 2**31-1 squared, wrong extensions."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "x" * 64_000
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buf, "JPEG", exif=exif.tobytes())
    webp = bytearray(_small("WEBP", quality=50))
    j = webp.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    webp[j + 3:j + 7] = struct.pack("<HH", 16383, 16383)
    gif = bytearray(_small("GIF"))
    k = gif.index(b"\x2c")  # the image descriptor: left, top, width, height
    gif[k + 5:k + 9] = struct.pack("<HH", 65535, 65535)
    bmp = bytearray(_small("BMP"))
    bmp[18:26] = struct.pack("<ii", 30000, -30000)
    png = bytearray(_small("PNG"))
    png[16:24] = struct.pack(">II", 2 ** 31 - 1, 2 ** 31 - 1)
    return {"jpeg_progressive_bomb.jpg": _jpeg_bomb(_small("JPEG", progressive=True), b"\xff\xc2"),
            "jpeg_exif_bomb.jpg": _jpeg_bomb(buf.getvalue()), "webp_lossy_bomb.webp": bytes(webp),
            "gif_frame_bomb.gif": bytes(gif), "bmp_topdown_bomb.bmp": bytes(bmp), "png_ihdr_huge.png": bytes(png),
            "tiff_bomb_as_jpg.jpg": _tiff_bomb(), "png_bomb_as_jpg.jpg": _png_bomb()}


def _tiff_bomb() -> bytes:
    data = bytearray(_small("TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack("<HH", data[e:e + 4])
        if tag in (256, 257):
            data[e + 8:e + 12] = struct.pack("<HH", 60000, 0) if typ == 3 else struct.pack("<I", 60000)
    return bytes(data)


def _images() -> dict[str, bytes]:
    png = _small("PNG")
    jpeg = _small("JPEG")
    gif = bytearray(_small("GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    webp = bytearray(_small("WEBP", lossless=True))
    assert webp[12:16] == b"VP8L"
    bits = (16383) | (16383 << 14) | (int.from_bytes(webp[21:25], "little") & ~((1 << 28) - 1))
    webp[21:25] = bits.to_bytes(4, "little")
    bmp = bytearray(_small("BMP"))
    bmp[18:26] = struct.pack("<ii", 30000, 30000)
    return {"png_bomb_16000.png": _png_bomb(), "jpeg_bomb_65500.jpg": _jpeg_bomb(), "gif_screen_bomb.gif": bytes(gif),
            "tiff_bomb.tiff": _tiff_bomb(), "webp_bomb.webp": bytes(webp), "bmp_bomb.bmp": bytes(bmp),
            "png_truncated.png": png[: len(png) // 2], "jpeg_truncated.jpg": jpeg[: len(jpeg) // 2],
            "png_header_only.png": png[:33], **_more_bombs()}


def _foreign(marker: str) -> dict[str, bytes]:
    import numpy as np

    out = {"empty.pkl": b"", "empty.png": b"", "text.pkl": b"hello world\n", "random.bin":
           np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
           "protocol0.pkl": b"(lp0\nI1\na.", "png_named.pkl": _small("PNG"), "zip_garbage.pt": b"PK\x03\x04" + bytes(60),
           "safetensors_header_bomb.safetensors": struct.pack("<Q", 2 ** 40) + b"{}",
           "truncated_release.pkl": _release(_array((64,), _dtype("f4"), _b(bytes(256))))[:150]}
    try:
        import torch

        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        buf = io.BytesIO()
        torch.save({"state_dict": Evil()}, buf)
        out["torch_zip_os_system.pt"] = buf.getvalue()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out


def hostile_files(folder: str | os.PathLike, marker: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """Write every hostile file into ``folder``; yields (name, path). Code in them would create ``marker``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from hostile_torch import torch_files  # torch's own formats (it builds on the assembler above)

    for group in (_pickles(str(marker)), _images(), _foreign(str(marker)), torch_files(str(marker))):
        for name, data in group.items():
            path = folder / name
            path.write_bytes(data)
            yield name, path


# -- the child process -----------------------------------------------------------------------------------------------
def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_mb(reset: bool = False) -> float:
    """Peak resident memory (VmHWM) in MB; ``reset`` first restarts the peak from the current size (Linux >= 4.0)."""
    if reset:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # pragma: no cover - then the peak is the process's, which only makes the check stricter
            pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _entry(loader: str, work: Path):
    """A function path -> outcome ('refused' raises; 'skipped' / 'loaded' returned) for one loader entry point."""
    if loader == "official":
        from byol.official import read_official_pickle
        return lambda p: (read_official_pickle(p), "loaded")[1]
    if loader == "load_backbone":
        import zoo
        return lambda p: (zoo.load_backbone(p), "loaded")[1]
    if loader == "safe_torch_load":
        from zoo.weights.safe_load import safe_torch_load
        return lambda p: (safe_torch_load(p), "loaded")[1]
    if loader == "decode_device":
        from augment.decode import decode_batch

        def decode(p: Path) -> str:
            imgs, bad = decode_batch([p.read_bytes()], "cpu")
            return "skipped" if bad == [0] else "loaded"
        return decode
    if loader == "imagefolder":
        from zoo.data.images import ImageFolderDataset

        def item(p: Path) -> str:
            root = work / "imagefolder"
            shutil.rmtree(root, ignore_errors=True)
            (root / "train" / "c0").mkdir(parents=True)
            suffix = p.suffix if p.suffix in (".png", ".jpg", ".gif", ".tiff", ".webp", ".bmp") else ".jpg"
            shutil.copy(p, root / "train" / "c0" / f"x{suffix}")
            image, _, _ = ImageFolderDataset(root, "train")[0]
            return "skipped" if image is None else "loaded"
        return item
    if loader == "cifar":
        import pickle

        from zoo.data.images import cifar_dataset

        def cifar(p: Path) -> str:
            root = work / "cifar"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            with open(root / "batches.meta", "wb") as f:
                pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
            shutil.copy(p, root / "test_batch")
            try:
                cifar_dataset(root, "val")
            except ValueError as err:  # name the original file, as the other loaders' messages do
                raise type(err)(str(err).replace(str(root / "test_batch"), str(p))) from None
            return "loaded"
        return cifar
    raise SystemExit(f"unknown loader {loader!r}; choose from {LOADERS}")


def _count_decoders() -> dict[str, int]:
    """Wrap the pixel decoders (torchvision.io, PIL's load) so the child can say whether any of them ran."""
    import torchvision.io
    from PIL import ImageFile

    from call_count import counting

    counts = {"decoders": 0}
    for name in ("decode_image", "decode_jpeg", "decode_png", "decode_gif", "decode_webp"):
        setattr(torchvision.io, name, counting(getattr(torchvision.io, name), counts, "decoders"))
    ImageFile.ImageFile.load = counting(ImageFile.ImageFile.load, counts, "decoders")
    return counts


def main(argv: list[str]) -> int:
    """Child: ``LOADER MARKER FILE...`` -> one ``RESULT`` JSON line per file (see the module docstring)."""
    import resource
    import tempfile

    loaders, files = argv[0].split(","), [Path(a) for a in argv[2:]]
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    runs = {loader: _entry(loader, work) for loader in loaders}  # every import happens before the limit is set
    counts = _count_decoders()
    headroom = int(1.5 * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + headroom, resource.RLIM_INFINITY))
    for loader, path in ((ld, p) for ld in loaders for p in files):
        run = runs[loader]
        print(f"START {loader} {path.name}", flush=True)
        _peak_rss_mb(reset=True)
        before, counts["decoders"] = _rss_mb(), 0
        result = {"loader": loader, "name": path.name, "path": str(path)}
        try:
            result["outcome"] = run(path)
        except MemoryError as err:
            result.update(outcome="memoryerror", type="MemoryError", message=str(err))
        except BaseException as err:  # noqa: BLE001 - every refusal is recorded; the test judges it
            result.update(outcome="refused", type=type(err).__name__, message=str(err),
                          value_error=isinstance(err, (ValueError, OSError)))
        result.update(rss_growth_mb=round(_peak_rss_mb() - before, 1), decoders=counts["decoders"])
        print("RESULT " + json.dumps(result), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run_harness(loaders: str, marker: Path, paths: list[Path], timeout: float = 600
                ) -> tuple[dict[tuple[str, str], dict], str]:
    """Run the child for ``loaders`` (comma-separated) over ``paths``; returns ({(loader, name): result}, the
    child's exit code, last file started and stderr, for failure messages)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1])]
                                                       + [p for p in sys.path if p]))
    proc = subprocess.run([sys.executable, __file__, loaders, str(marker), *map(str, paths)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[(r["loader"], r["name"])] = r
    started = [line[6:] for line in proc.stdout.splitlines() if line.startswith("START ")]
    trail = (f"exit code {proc.returncode}; last file started: {started[-1] if started else None}\n"
             f"{proc.stderr[-3000:]}")
    return results, trail


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
