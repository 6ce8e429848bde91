"""Hostile files in torch's own formats (zip archive, legacy stream) and safetensors, for ``hostile_files``: each
would make ``torch.load(weights_only=True)`` allocate, hash or walk far beyond its size, or is malformed."""
from __future__ import annotations

import io
import json
import struct

from hostile_files import _b, _g, _get, _i, _pk, _put, _r, _t, _u

__all__ = ["torch_files"]


def _torch_zip(pkl: bytes, records: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()) -> bytes:
    """A torch zip archive (``archive/data.pkl`` + ``archive/data/<key>`` records) around a crafted pickle."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in {"data.pkl": pkl, ".format_version": b"1", **(records or {})}.items():
            zf.writestr(f"archive/{name}", data,
                        compress_type=zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return out.getvalue()


def _tensor(key: str, numel: int, dtype: str = "FloatStorage") -> bytes:
    """``_rebuild_tensor_v2(<storage key of numel elements>, 0, (numel,), (1,), False, OrderedDict())``."""
    pid = _t(_u("storage"), _g("torch", dtype), _u(key), _u("cpu"), _i(numel)) + b"Q"
    return _r(_g("torch._utils", "_rebuild_tensor_v2"), pid, _i(0), _t(_i(numel)), _t(_i(1)), b"\x89",
              _r(_g("collections", "OrderedDict"), ))


def torch_files(marker: str) -> dict[str, bytes]:
    """Files in torch's own formats whose weights-only loading would allocate, hash or walk far beyond their size."""
    import struct as st

    zeros = bytes(4000)
    big = 2 ** 30
    legacy_head = b"".join(_pk(x) for x in (_i(0x1950A86A20F9469CFC6C), _i(1001), b"}"))
    return {
        "torch_encode_amplify.pt": _torch_zip(_pk(_u("a" * 50_000) + _put(1) + b"]" + _put(2) + b"(" +
                                                  _r(_g("_codecs", "encode"), _get(1), _u("latin1")) * 400 + b"e")),
        "torch_bytearray_size.pt": _torch_zip(_pk(_r(_g("__builtin__", "bytearray"), _i(big)))),
        "torch_bytearray_memo.pt": _torch_zip(_pk(_b(b"x" * 50_000) + _put(1) + b"]" + b"(" +
                                                  _r(_g("builtins", "bytearray"), _get(1)) * 400 + b"e")),
        "torch_set_dag_key.pt": _torch_zip(_pk(b"}(" + b"K\x00\x85" + _put(0) + b"".join(
            _get(k) + _get(k) + b"\x86" + _put(k + 1) for k in range(64)) + b"tNs")),
        "torch_self_list.pt": _torch_zip(_pk(b"]" + _put(7) + _get(7) + b"a")),
        "torch_dag_list.pt": _torch_zip(_pk(b"]" + _put(100) + b"K\x00a" + b"".join(
            b"]" + _put(101 + k) + b"(" + _get(100 + k) * 64 + b"e" for k in range(6)))),
        "torch_deep_list.pt": _torch_zip(_pk(b"]" * 3000 + b"a" * 2999)),
        "torch_deflated_storage.pt": _torch_zip(_pk(_tensor("0", 2 ** 25)), {"data/0": bytes(2 ** 27)},
                                                deflate=("data/0",)),
        "torch_storage_size_lie.pt": _torch_zip(_pk(_tensor("0", 2 ** 28)), {"data/0": zeros}),
        "torch_storage_missing.pt": _torch_zip(_pk(_tensor("0", 1000))),
        "torch_legacy_storage_lie.pt": legacy_head + _pk(_tensor("0", 2 ** 28)) + _pk(b"]" + _u("0") + b"a")
        + st.pack("<q", 2 ** 28) + zeros,
        "torch_legacy_encode.pt": legacy_head + _pk(_u("a" * 50_000) + _put(1) + b"]" + b"(" +
                                                    _r(_g("_codecs", "encode"), _get(1), _u("latin1")) * 400 + b"e"),
        "torch_persid_code.pt": _torch_zip(_pk(_t(_u("storage"), _g("os", "system"), _u(f"touch {marker}"),
                                                  _u("cpu"), _i(1)) + b"Q")),
        "torch_not_magic.pt": _pk(_i(12345)),
        "safetensors_offsets_lie.safetensors": _safetensors({"w": {"dtype": "F32", "shape": [2 ** 15, 2 ** 15],
                                                                  "data_offsets": [0, 2 ** 32]}}, zeros),
        "safetensors_bad_json.safetensors": st.pack("<Q", 6) + b"{oops}" + zeros,
        "safetensors_truncated.safetensors": _safetensors({"w": {"dtype": "F32", "shape": [1000],
                                                                "data_offsets": [0, 4000]}}, zeros)[:-100],
    }


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data
