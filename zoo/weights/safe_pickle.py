"""A pickle reader for untrusted files that hold NumPy arrays: nothing runs, memory and recursion are bounded.

``GuardedUnpickler`` is Python's own pure-Python unpickler with every opcode that allocates, calls or hashes
guarded (the C unpickler cannot be: a 10-byte memo index asks it for gigabytes, and it allocates a ``BINBYTES8``
record before reading it). What holds for every file of ``size`` bytes:

* only callables a subclass allow-lists can be called (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``); ``BUILD`` only
  fills NumPy arrays and dtypes (checked first) and the inert stand-ins ``build_allowed`` names;
* NumPy: numeric dtypes only (bool, int, uint, float, complex; never object, void, string, structured or subarray
  dtypes, in arrays, scalars or dtype states): object arrays hold pointers, and a crafted state turns file bytes
  into them;
* memory: a record longer than the rest of the file is refused before it is read; array, scalar, bytes and
  container-copy allocations are charged, before they happen, against budgets of ``size`` bytes each, so sharing
  one record many times through the memo cannot multiply it; the containers the opcodes themselves build grow by
  at most a pointer or a dict entry per file byte;
* dict keys and set members are checked (no deep or huge tuples, whose hashing recurses) and ``SETITEM``/``APPEND``
  only fill real dicts, lists and sets (never an array's fancy-index assignment);
* refusals are ``UnsafeFileError`` (``TooLargeError`` for memory bombs) with a bounded, one-line message.

``plain_walk`` converts the result without recursion errors: cycles and nesting deeper than ``MAX_DEPTH`` are
refused, shared objects are converted once.
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from struct import unpack
from typing import Any

import numpy as np

from zoo.weights.pickle_builtins import Guarded, brief, guarded_builtins, one_line
from zoo.weights.file_errors import UnsafeFileError

__all__ = ["GuardedUnpickler", "TooLargeError", "BoundedReader", "Guarded", "NDARRAY", "brief", "one_line",
           "plain_walk", "MAX_DEPTH", "check_dtype",
           "describe_failure"]

# Real containers (a BYOL release: dict -> state -> params -> module -> array) are < 20 levels deep.
MAX_DEPTH = 100
_KEY_NODES = 256
_SMALL_READ = 4096  # a read this short past the end is a truncated (or foreign) file, not a memory bomb  # a dict key / set member may be a tuple of at most this many leaves (hashing recurses)


class TooLargeError(UnsafeFileError):
    """The file asks for more memory than it could honestly hold (a memory bomb); nothing was allocated."""


def _too_large(what: str, n: int, limit: int, of: str = "the whole file") -> TooLargeError:
    return TooLargeError(f"refused: {what} asks for {n:,} bytes, more than {of} ({limit:,} bytes) could hold "
                         "(a memory bomb, not a checkpoint)")


class BoundedReader:
    """File wrapper for the unpickler: a read longer than the rest of the file is refused before anything is read."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self.size, self.pos = f, size, 0

    @property
    def remaining(self) -> int:
        return max(self.size - self.pos, 0)

    def check(self, n: int, what: str = "a string/bytes record") -> None:
        """Refuse a record of ``n`` bytes that the rest of the file cannot hold (memory bomb or truncation)."""
        if n > self.size and n > _SMALL_READ:
            raise _too_large(what, n, self.size)
        if n > self.remaining:
            raise ValueError(f"{what} of {n:,} bytes starts {self.remaining:,} bytes before the end of the file: "
                             "the file is truncated")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.remaining
        self.check(n)
        data = self._f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf)
        self.check(view.nbytes)
        n = self._f.readinto(view)
        self.pos += n
        return n

    def readline(self, *args: Any) -> bytes:
        line = self._f.readline(*args)
        self.pos += len(line)
        return line


def _refuse_ndarray_call(*args: Any, **kwargs: Any) -> Any:
    # ndarray(shape, dtype, buffer, offset, strides) could build huge zero-stride views; NumPy's pickles never call it.
    raise UnsafeFileError("refused to call numpy.ndarray(...) directly (NumPy's own pickles never do)")


# numpy.ndarray as named by a pickle: only ever the first argument of _reconstruct.
NDARRAY = Guarded("numpy.ndarray", _refuse_ndarray_call, np.ndarray)

# 'f4', '<i8', '|b1' (what NumPy's dtype pickles name) or one-letter type codes ('b', 'd', '?': _reconstruct's).
_DTYPE_CODE = re.compile(r"^[<>|=]?(?:[biufc]\d{1,2}|[?bBhHiIlLqQpPefdgFDG])$")


def check_dtype(dt: Any, kinds: str = "biufc") -> np.dtype:
    """``dt`` if it is a plain numeric dtype of one of ``kinds`` (no object, void, string, record or subarray)."""
    if not isinstance(dt, np.dtype):
        raise UnsafeFileError(f"refused dtype {brief(dt)}: not a NumPy dtype")
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.kind not in kinds \
            or not 1 <= dt.itemsize <= 16:
        raise UnsafeFileError(f"refused NumPy dtype {brief(dt)}: only plain numeric dtypes ({kinds}) are read "
                              "(object, void, string, structured and subarray dtypes are refused)")
    return dt


def _dims(shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, tuple) or len(dims) > 32 or not all(type(d) is int and 0 <= d < 2 ** 62 for d in dims):
        raise UnsafeFileError(f"refused array shape {brief(shape)}: expected at most 32 non-negative ints")
    return dims


def _nbytes(dims: tuple[int, ...], itemsize: int, cap: int) -> int:
    """prod(dims) * itemsize, stopping as soon as it passes ``cap`` (no huge intermediate products). Zero dims are
    left out of the product: NumPy checks the other dims for overflow even in an empty array, so a huge one counts."""
    total = itemsize
    for d in dims:
        total *= max(d, 1)
        if total > cap:
            return total
    return 0 if 0 in dims else total


class GuardedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # pure-Python: each opcode can be checked
    """Base of the project's restricted unpicklers; subclasses fill ``allowed()`` with ``(module, name) -> object``.

    Objects in ``allowed()`` that are ``Guarded`` may be called by the file; anything else there is data only
    (e.g. NumPy scalar types passed to a constructor). ``size`` is the file's size in bytes.
    """

    dtype_kinds = "biufc"
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, size: int, **kwargs: Any) -> None:
        self.reader = file if isinstance(file, BoundedReader) else BoundedReader(file, size)
        super().__init__(self.reader, **kwargs)
        self.limit = size
        self._spent = {"arrays": 0, "copies": 0}

    # -- allow-list --------------------------------------------------------------------------------------------
    def allowed(self) -> dict[tuple[str, str], Any]:
        """``(module, name) -> object`` the file may name; built once per unpickler."""
        if not hasattr(self, "_allowed_map"):
            self._allowed_map = self.build_allowed_map()
        return self._allowed_map

    def build_allowed_map(self) -> dict[tuple[str, str], Any]:
        """NumPy's array, scalar and dtype constructors (both spellings) and ``_codecs.encode``."""
        allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): NDARRAY,
                                               ("numpy", "dtype"): Guarded("numpy.dtype", self.make_dtype, np.dtype),
                                               ("_codecs", "encode"): Guarded("_codecs.encode", self.codecs_encode)}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = Guarded(f"{mod}._reconstruct", self.reconstruct)
            allowed[(mod, "scalar")] = Guarded(f"{mod}.scalar", self.scalar)
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        module = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)  # Python 2 names
        allowed = self.allowed()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise UnsafeFileError(f"refused to load global {one_line(module, 120)}.{one_line(name, 120)}: "
                              f"{self.refusal_hint()}")

    def refusal_hint(self) -> str:
        return "only NumPy arrays and plain containers are read (nothing in the file is executed)"

    # -- budgets ---------------------------------------------------------------------------------------------------
    def charge(self, budget: str, n: int, what: str) -> None:
        """Count ``n`` bytes against ``budget`` ('arrays' or 'copies') before allocating them."""
        if n > self.limit - self._spent[budget]:
            raise _too_large(what, n, max(self.limit - self._spent[budget], 0),
                             "the file's remaining allowance" if self._spent[budget] else "the whole file")
        self._spent[budget] += n

    # -- NumPy, guarded ---------------------------------------------------------------------------------------------
    def make_dtype(self, obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
        """numpy.dtype(obj): plain numeric codes ('f4', '<i8', b'b') or NumPy numeric types only; always a copy."""
        if isinstance(obj, bytes):
            obj = obj.decode("latin1")
        if isinstance(obj, str):
            if not _DTYPE_CODE.match(obj):
                raise UnsafeFileError(f"refused numpy.dtype({brief(obj)}): only plain numeric type codes")
        elif isinstance(obj, np.dtype):
            check_dtype(obj, self.dtype_kinds)
        elif not (isinstance(obj, type) and issubclass(obj, (np.number, np.bool_))):
            raise UnsafeFileError(f"refused numpy.dtype({brief(obj)}): only plain numeric type codes")
        if not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
            raise UnsafeFileError("refused numpy.dtype with non-boolean flags")
        # copy=True always: a BUILD on the shared, canonical float32 dtype would change it for the whole process.
        return check_dtype(np.dtype(obj, bool(align), True), self.dtype_kinds)

    def _as_dtype(self, dt: Any) -> np.dtype:
        return check_dtype(dt, self.dtype_kinds) if isinstance(dt, np.dtype) else self.make_dtype(dt)

    def reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        """numpy's ``_reconstruct(ndarray, shape, typecode)``: a plain, charged, numeric array."""
        if subtype is not NDARRAY:
            raise UnsafeFileError(f"refused numpy _reconstruct of {brief(subtype)}: only plain numpy.ndarray")
        dims, dt = _dims(shape), self._as_dtype(dtype)
        self.charge("arrays", _nbytes(dims, dt.itemsize, self.limit + 1), f"an array of shape {brief(dims)}")
        core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core to numpy._core
        return core.multiarray._reconstruct(np.ndarray, dims, dt)

    def scalar(self, dtype: Any, data: Any = None) -> Any:
        """numpy's ``scalar(dtype, bytes)`` for numeric dtypes: exactly itemsize bytes, charged."""
        dt = self._as_dtype(dtype)
        if isinstance(data, str):
            data = data.encode("latin1")
        if not isinstance(data, bytes) or len(data) != dt.itemsize:
            raise UnsafeFileError(f"refused numpy scalar of {dt} from {brief(data)}: expected {dt.itemsize} bytes")
        self.charge("arrays", dt.itemsize, f"a NumPy scalar of {dt}")
        core = getattr(np, "_core", None) or np.core
        return core.multiarray.scalar(dt, data)

    def set_array_state(self, arr: np.ndarray, state: Any) -> None:
        """``ndarray.__setstate__`` after checking the dtype is numeric and the data is exactly the array's size."""
        if type(arr) is not np.ndarray:
            raise UnsafeFileError(f"refused to fill a {type(arr).__name__}: only plain numpy.ndarray")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafeFileError(f"refused ndarray state {brief(state)}")
        shape, dtype, fortran, data = state[-4:]
        if len(state) == 5 and state[0] != 1:
            raise UnsafeFileError(f"refused ndarray state version {brief(state[0])}")
        dims, dt = _dims(shape), self._as_dtype(dtype)
        if not isinstance(fortran, (bool, int)):
            raise UnsafeFileError(f"refused ndarray state with fortran flag {brief(fortran)}")
        if isinstance(data, str):
            data = data.encode("latin1")  # Python 2 pickles read with encoding='latin1' (NumPy does the same)
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafeFileError(f"refused ndarray data of type {type(data).__name__}: only raw bytes")
        n = _nbytes(dims, dt.itemsize, self.limit + 1)
        self.charge("arrays", n, f"an array of shape {brief(dims)} ({dt})")
        if n != len(data):
            raise ValueError(f"an array of shape {brief(dims)} ({dt}) needs {n:,} bytes but its record holds "
                             f"{len(data):,}")
        arr.__setstate__((1, dims, dt, bool(fortran), bytes(data)))

    @staticmethod
    def set_dtype_state(dt: np.dtype, state: Any) -> None:
        """``dtype.__setstate__`` for the byte-order state NumPy writes for numeric dtypes, and nothing else."""
        ok = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] == 3 and state[1] in ("<", ">", "|", "=")
              and state[2:8] == (None, None, None, -1, -1, 0) and (len(state) == 8 or state[8] is None))
        if not ok:
            raise UnsafeFileError(f"refused dtype state {brief(state)}: only a byte order for a numeric dtype")
        dt.__setstate__(state)

    def codecs_encode(self, text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
        """``_codecs.encode(str, 'latin1')`` (how protocol 2 stores bytes); only text -> bytes, charged."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii") \
                or errors != "strict":
            raise UnsafeFileError(f"refused _codecs.encode({type(text).__name__}, {brief(encoding)}): only text -> bytes")
        self.charge("copies", len(text) * (1 if encoding.startswith("latin") or encoding == "ascii" else 4),
                    "_codecs.encode")
        return text.encode(encoding)

    # -- opcodes -------------------------------------------------------------------------------------------------
    def call(self, func: Any, args: tuple, kwargs: dict | None = None) -> Any:
        """REDUCE / INST / OBJ: only ``Guarded`` callables run; subclasses may allow more (inert stand-ins)."""
        if isinstance(func, Guarded):
            return func(*args, **(kwargs or {}))
        raise UnsafeFileError(f"refused to call {brief(func)}: not an allow-listed constructor")

    def new_object(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        """NEWOBJ / NEWOBJ_EX (``cls.__new__``): refused unless a subclass allows it."""
        raise UnsafeFileError(f"refused to create {brief(cls)} with __new__: not an allow-listed class")

    def build(self, inst: Any, state: Any) -> None:
        """BUILD on anything other than an ndarray or dtype: refused unless a subclass allows it."""
        raise UnsafeFileError(f"refused to set the state of a {type(inst).__name__}")

    def check_key(self, key: Any) -> None:
        """A dict key / set member: plain scalars or small tuples of them (hashing a deep tuple recurses in C)."""
        todo, seen = [(key, 0)], 0
        while todo:
            k, depth = todo.pop()
            seen += 1
            if seen > _KEY_NODES or depth > 8:
                raise UnsafeFileError("refused a dict key / set member that is a deep or huge tuple")
            if isinstance(k, (tuple, frozenset)):
                todo.extend((v, depth + 1) for v in k)
            elif k is not None and not isinstance(k, (str, bytes, int, float, complex, np.generic, np.dtype)) \
                    and not self.key_allowed(k):
                raise UnsafeFileError(f"refused a dict key / set member of type {type(k).__name__}")

    def key_allowed(self, key: Any) -> bool:
        return False

    def _check_read(self, n: int, what: str) -> None:
        frame = self._unframer.current_frame
        in_frame = 0
        if frame is not None:
            with frame.getbuffer() as view:
                in_frame = view.nbytes - frame.tell()
        if n > in_frame:
            self.reader.check(n - in_frame, what)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        if not isinstance(args, tuple):
            raise UnsafeFileError(f"refused REDUCE with arguments {brief(args)}")
        self.stack[-1] = self.call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: list) -> None:
        self.append(self.call(klass, tuple(args)))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new_object(cls, tuple(args), {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(kwargs, dict) or not all(type(k) is str for k in kwargs):
            raise UnsafeFileError("refused NEWOBJ_EX with non-text keyword names")
        self.append(self.new_object(cls, tuple(args), kwargs))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray):
            self.set_array_state(inst, state)
        elif isinstance(inst, np.dtype):
            self.set_dtype_state(inst, state)
        else:
            self.build(inst, state)

    def load_bytearray8(self) -> None:
        n, = unpack("<Q", self.read(8))
        self._check_read(n, "a bytearray record")
        buf = bytearray(n)
        self.readinto(buf)
        self.append(buf)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    def _setitems(self, target: Any, items: list) -> None:
        if type(target) not in (dict, OrderedDict):
            raise UnsafeFileError(f"refused to set items on a {type(target).__name__}: only dicts")
        for i in range(0, len(items) - 1, 2):
            self.check_key(items[i])
            target[items[i]] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()
        d: dict = {}
        self._setitems(d, items)
        self.append(d)

    def load_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    @staticmethod
    def _extend(target: Any, items: list) -> None:
        if type(target) is not list:
            raise UnsafeFileError(f"refused to append to a {type(target).__name__}: only lists")
        target.extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise UnsafeFileError(f"refused to add items to a {type(target).__name__}: only sets")
        for item in items:
            self.check_key(item)
        target.update(items)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        for item in items:
            self.check_key(item)
        self.append(frozenset(items))

    for _op, _fn in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
                     (pickle.BUILD, load_build), (pickle.BYTEARRAY8, load_bytearray8),
                     (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems), (pickle.DICT, load_dict),
                     (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                     (pickle.ADDITEMS, load_additems), (pickle.FROZENSET, load_frozenset)):
        dispatch[_op[0]] = _fn
    del _op, _fn

    # -- guarded builtins (older protocols name them as globals) -----------------------------------------------------
    def builtin_constructors(self) -> dict[tuple[str, str], Guarded]:
        """``builtins.<type>`` and ``collections.OrderedDict`` as checked constructors (``pickle_builtins``)."""
        return guarded_builtins(self)


def describe_failure(err: BaseException) -> str:
    """``Type: message`` of an unpickling failure in one bounded line (an unknown opcode is named as such)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], int):
        return f"invalid pickle opcode {err.args[0]:#04x}: not a pickle, or a corrupt one"
    return f"{type(err).__name__}: {one_line(err, 300)}"


def plain_walk(obj: Any, convert: Callable[[Any, Callable[[Any], Any]], Any], what: str = "the pickle") -> Any:
    """``convert(obj, recurse)`` over a loaded graph: each object converted once; cycles and deep nesting refused."""
    done: dict[int, Any] = {}
    active: set[int] = set()
    keep: list[Any] = []  # keeps converted inputs alive so their ids are not reused mid-walk

    def recurse(x: Any, depth: int = 0) -> Any:
        if isinstance(x, (str, bytes, int, float, complex, type(None), np.ndarray, np.generic, np.dtype)):
            return x
        key = id(x)
        if key in done:
            return done[key]
        if key in active:
            raise UnsafeFileError(f"refused {what}: a {type(x).__name__} contains itself (a self-referencing "
                                  "container, not a checkpoint)")
        if depth > MAX_DEPTH:
            raise UnsafeFileError(f"refused {what}: containers nested more than {MAX_DEPTH} deep")
        active.add(key)
        keep.append(x)
        out = convert(x, lambda y: recurse(y, depth + 1))
        active.discard(key)
        done[key] = out
        return out

    return recurse(obj)
