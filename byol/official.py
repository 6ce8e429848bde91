"""The official BYOL release (``pretrain_res50x1.pkl``, ``pretrain_res200x2.pkl``, ablations) -> torchvision ResNet.

The files are dill pickles (protocol 2) of ``{'experiment_state': _ByolExperimentState(...), 'step', 'rng'}`` whose
leaves are NumPy arrays. They reference classes from ``byol``/``optax``/``haiku``; a restricted unpickler
(``zoo.weights.safe_pickle``: nothing runs, numeric dtypes only, memory bounded by the file's size, no recursion
errors) turns those references into inert stand-ins and refuses every other global. dill's NumPy encoding
(``_create_array``; ``_get_attr(_import_module('numpy.core._multiarray_umath'), '_reconstruct')`` before 0.3.6) and
JAX arrays (``jax._src.array._reconstruct_array``) are re-implemented here for NumPy only: neither dill nor jax is
imported. Haiku uses TF 'SAME' padding (asymmetric for stride-2 layers); ``zoo.models.tf_same`` reproduces it, and
``load_backbone`` applies it by default to what this reader read.

``READER`` is the reader ``zoo.load_backbone`` consults for plain pickles: registered in ``pyproject.toml`` under the
entry-point group ``byol_zoo.weight_readers`` (``zoo.weights.readers``), so ``zoo`` never imports this package.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.models.tf_same import TFSameConv2d, TFSameMaxPool2d, apply_tf_same_padding, tf_same_padding
from zoo.weights.safe_load import UnsafeFileError
from zoo.weights.safe_pickle import (BoundedReader, Guarded, GuardedUnpickler, TooLargeError, brief, describe_failure,
                                     one_line, plain_walk)

__all__ = [
    "read_official_pickle",
    "TooLargeError",
    "haiku_to_torchvision",
    "haiku_classifier",
    "infer_arch",
    "tf_same_padding",  # re-exported from zoo.models.tf_same (older callers import them from here)
    "TFSameConv2d",
    "TFSameMaxPool2d",
    "apply_tf_same_padding",
    "READER",
    "EXPERIMENT_STATE_FIELDS",
]

# Field order of the official ``_ByolExperimentState`` NamedTuple (pickled positionally).
EXPERIMENT_STATE_FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")

# Modules whose class references become inert stand-ins (the containers of the release); nothing else is imported.
_STUB_MODULE_PREFIXES = ("byol.", "optax.", "haiku.")

_NUMPY_CORE_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core._multiarray_umath",
                       "numpy._core._multiarray_umath")

_BoundedReader = BoundedReader  # the name the tests and older callers use


class _ModuleRef:
    """What ``dill._dill._import_module`` returns here: an inert token naming an allow-listed module."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<module {self.name}>"


def _is_numeric_scalar_type(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, (np.number, np.bool_))


class PickledStub:
    """Inert stand-in for a pickled object of a class we refuse to import; keeps its args and state as data."""

    pickled_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledStub":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args); __new__ kept them
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {self.pickled_class} args={len(self.args)}>"


_STUB_TYPES: dict[str, type] = {}


def _stub_type(qualname: str) -> type:
    if qualname not in _STUB_TYPES:
        _STUB_TYPES[qualname] = type(qualname.rsplit(".", 1)[-1], (PickledStub,), {"pickled_class": qualname})
    return _STUB_TYPES[qualname]


def _dill_create_namedtuple(name: Any, fieldnames: Any, modulename: Any, *rest: Any) -> type:
    # dill may pickle a NamedTuple class by value; we only need a stand-in type of that name.
    if not all(isinstance(s, str) and len(s) < 200 for s in (name, modulename)):
        raise UnsafeFileError("refused dill._dill._create_namedtuple with non-text names")
    return _stub_type(f"{modulename}.{name}")


def _dill_create_dtypemeta(scalar_type: Any) -> type:
    # dill (NumPy 1.20+) pickles dtype *classes* as _create_dtypemeta(scalar type); only numeric ones are built.
    if scalar_type is None:
        return np.dtype
    if not _is_numeric_scalar_type(scalar_type):
        raise UnsafeFileError(f"refused dill._dill._create_dtypemeta({brief(scalar_type)}): only NumPy numeric types")
    return type(np.dtype(scalar_type))


class _RestrictedUnpickler(GuardedUnpickler):
    """``GuardedUnpickler`` that also reads dill's and JAX's NumPy encodings and stubs byol/optax/haiku classes.

    Stand-in classes may be created (REDUCE, NEWOBJ) and given a state (BUILD); they only keep their arguments.
    """

    def __init__(self, file: Any, limit: int) -> None:
        super().__init__(file, limit)

    def refusal_hint(self) -> str:
        return ("the official-BYOL reader only accepts NumPy arrays and the byol/optax/haiku containers (nothing in "
                "the file is executed). Is this really a BYOL release file?")

    def find_class(self, module: str, name: str) -> Any:
        mod = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)
        if mod == "numpy" and _is_numeric_scalar_type(getattr(np, name, None)):
            return getattr(np, name)  # data only: e.g. the argument of dill's _create_dtypemeta
        if mod == "numpy.dtypes" and not name.startswith("_"):
            cls = getattr(getattr(np, "dtypes", None), name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype) and _is_numeric_scalar_type(getattr(cls, "type", 0)):
                return cls  # data only (a dtype class is never called)
        if (mod, name) not in self.allowed() and any((mod + ".").startswith(p) for p in _STUB_MODULE_PREFIXES):
            return _stub_type(f"{one_line(mod, 120)}.{one_line(name, 120)}")
        return super().find_class(module, name)

    def build_allowed_map(self) -> dict[tuple[str, str], Any]:
        allowed = super().build_allowed_map()
        allowed.update(self.builtin_constructors())
        allowed[("copyreg", "_reconstructor")] = Guarded("copyreg._reconstructor", _stub_reconstructor)
        for mod in ("dill._dill", "dill.dill"):
            allowed[(mod, "_create_array")] = Guarded(f"{mod}._create_array", self._dill_create_array)
            allowed[(mod, "_get_attr")] = Guarded(f"{mod}._get_attr", self._dill_get_attr)
            allowed[(mod, "_import_module")] = Guarded(f"{mod}._import_module", self._dill_import_module)
            allowed[(mod, "_create_namedtuple")] = Guarded(f"{mod}._create_namedtuple", _dill_create_namedtuple)
            allowed[(mod, "_create_dtypemeta")] = Guarded(f"{mod}._create_dtypemeta", _dill_create_dtypemeta)
        allowed[("jax._src.array", "_reconstruct_array")] = Guarded("jax._src.array._reconstruct_array",
                                                                    self._jax_reconstruct_array)
        return allowed

    # Stand-ins: the only classes the file may instantiate or give a state.
    def call(self, func: Any, args: tuple, kwargs: dict | None = None) -> Any:
        if isinstance(func, type) and issubclass(func, PickledStub):
            return func(*args, **(kwargs or {}))
        return super().call(func, args, kwargs)

    def new_object(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(cls, type) and issubclass(cls, PickledStub):
            return cls.__new__(cls, *args, **kwargs)
        return super().new_object(cls, args, kwargs)

    def build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, PickledStub):
            inst.state = state
            return
        super().build(inst, state)

    def key_allowed(self, key: Any) -> bool:
        return isinstance(key, PickledStub)  # hashed by identity

    # -- dill / jax NumPy encodings ----------------------------------------------------------------------------
    def _array_from_state(self, f: Any, args: Any, state: Any, what: str) -> np.ndarray:
        if not isinstance(f, Guarded) or f.fn != self.reconstruct or not isinstance(args, tuple):
            raise UnsafeFileError(f"refused {what} with constructor {brief(f)}: only numpy's _reconstruct")
        arr = f(*args)
        self.set_array_state(arr, state)
        return arr

    def _dill_create_array(self, f: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
        # dill._dill._create_array: f(*args) then __setstate__(state); npdict only exists for ndarray subclasses.
        if npdict:
            raise UnsafeFileError("refused dill._dill._create_array with instance attributes (an ndarray subclass)")
        return self._array_from_state(f, args, state, "dill._dill._create_array")

    def _jax_reconstruct_array(self, fun: Any, args: Any, arr_state: Any, aval_state: Any = None, *rest: Any
                               ) -> np.ndarray:
        # jax._src.array._reconstruct_array(fun, args, arr_state, aval_state): a NumPy array plus abstract-value
        # metadata (weak_type, ...); we keep the NumPy array and never import jax (the backbone never needs it).
        if type(arr_state) is np.ndarray:
            return arr_state
        return self._array_from_state(fun, args, arr_state, "jax._src.array._reconstruct_array")

    def _dill_import_module(self, import_name: Any, safe: bool = False) -> _ModuleRef:
        if import_name in _NUMPY_CORE_MODULES or import_name in ("numpy", "_codecs"):
            return _ModuleRef(import_name)
        raise UnsafeFileError(f"refused to load global dill._dill._import_module({brief(import_name)}): the "
                              "official-BYOL reader only imports NumPy (nothing in the file is executed)")

    def _dill_get_attr(self, obj: Any, name: Any) -> Any:
        if isinstance(obj, _ModuleRef) and isinstance(name, str):
            module = obj.name.replace("._multiarray_umath", ".multiarray")
            if (module, name) in self.allowed():
                return self.allowed()[(module, name)]
            raise UnsafeFileError(f"refused to load global {obj.name}.{one_line(name, 120)} (via dill._dill._get_attr):"
                                  " not a NumPy array/scalar/dtype constructor")
        raise UnsafeFileError(f"refused dill._dill._get_attr({type(obj).__name__}, {brief(name)})")


def _stub_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor (protocols 0/1); only ever builds stand-ins or plain builtins.
    cls, base = (c.target if isinstance(c, Guarded) else c for c in (cls, base))
    if isinstance(cls, type) and issubclass(cls, PickledStub):
        return cls.__new__(cls) if state is None else cls.__new__(cls, state)
    if cls is object and base is object and state is None:
        return object()
    raise UnsafeFileError(f"refused to reconstruct {brief(cls)} from base {brief(base)}")


def _convert(obj: Any, recurse: Any) -> Any:
    if isinstance(obj, PickledStub):
        if obj.pickled_class.endswith("_ByolExperimentState"):
            return {f: recurse(v) for f, v in zip(EXPERIMENT_STATE_FIELDS, obj.args)}
        # Mapping containers (e.g. haiku's FlatMapping) pickle as cls(dict) or with a dict state.
        if len(obj.args) == 1 and isinstance(obj.args[0], Mapping):
            return recurse(obj.args[0])
        return {"__class__": obj.pickled_class, "args": recurse(obj.args), "state": recurse(obj.state)}
    if isinstance(obj, Mapping):
        return {k: recurse(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [recurse(v) for v in obj]
        return items if type(obj) is list else tuple(items)
    return obj


def _to_plain(obj: Any) -> Any:
    """Stand-ins -> dicts/tuples so callers only see builtins and NumPy arrays (cycles and deep nests refused)."""
    return plain_walk(obj, _convert, "the pickle")


def read_official_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load an official BYOL ``.pkl`` safely: {'online_params', 'target_params', 'online_state', ..., 'step'}."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"official BYOL checkpoint {str(p)!r} does not exist; download e.g. "
                                "pretrain_res50x1.pkl from the BYOL release and pass its path.")
    if p.is_dir():
        raise IsADirectoryError(f"{str(p)!r} is a folder; pass the official BYOL .pkl file itself.")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{str(p)!r} is empty (0 bytes); the download was interrupted: fetch the release file again.")
    try:
        with open(p, "rb") as f:  # streamed: the ResNet-200 (2x) file is 4.6 GB
            raw = _to_plain(_RestrictedUnpickler(BoundedReader(f, size), size).load())
    except TooLargeError as err:
        raise TooLargeError(f"{str(p)!r}: {one_line(err)}; it was not loaded.") from None
    except UnsafeFileError as err:
        raise UnsafeFileError(f"{str(p)!r}: {one_line(err)}") from None
    except MemoryError:
        raise TooLargeError(f"{str(p)!r}: refused: the pickle asks for more memory than this machine has (a memory "
                            "bomb, not a checkpoint); it was not loaded.") from None
    except Exception as err:  # noqa: BLE001 - any malformed pickle: name the file, no deep trace
        raise ValueError(f"could not read {str(p)!r} as an official BYOL pickle ({describe_failure(err)}); is the "
                         "file truncated?") from None
    if not isinstance(raw, dict) or "experiment_state" not in raw or not isinstance(raw["experiment_state"], dict):
        keys = brief(sorted((k for k in raw if isinstance(k, str)))) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{str(p)!r} is not an official BYOL checkpoint: expected a dict with 'experiment_state', "
                         f"found {keys}.")
    es = raw["experiment_state"]
    for field in EXPERIMENT_STATE_FIELDS[:4]:
        if not isinstance(es.get(field), Mapping):
            found = brief(sorted(k for k in es if isinstance(k, str))[:8])
            raise ValueError(f"{str(p)!r}: experiment_state has no {field!r} dict (found {found}); it is not an "
                             "official BYOL _ByolExperimentState. Download the release file again.")
    out = dict(raw["experiment_state"])
    out["step"] = raw.get("step")
    return out


def _leaf(x: Any, what: str) -> np.ndarray:
    """A checkpoint leaf as a native-byte-order NumPy array; anything else (nested lists, stand-ins) is refused."""
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if type(x) is not np.ndarray:
        raise ValueError(f"{what} is a {type(x).__name__}, not a NumPy array")
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------------------------
# Haiku -> torchvision key mapping (pure functions on dicts of arrays).

_BLOCK_RE = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/(conv|batchnorm)_(\d+)$")
_SHORTCUT_RE = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/shortcut_(conv|batchnorm)$")


def _torso_prefix(params: Mapping[str, Any]) -> str:
    prefixes = {k.split("/~/", 1)[0] for k in params if re.match(r"^res_net\w*/~/", k)}
    if len(prefixes) != 1:
        raise ValueError(f"expected exactly one Haiku ResNet torso (keys 'res_net*/~/...'), found {sorted(prefixes)}; "
                         f"first keys: {sorted(params)[:5]}")
    return prefixes.pop()


def _torch_module_name(sub: str) -> tuple[str, str] | None:
    """Haiku module path inside the torso -> (torchvision module name, 'conv' | 'bn'); None if unknown."""
    if sub == "initial_conv":
        return "conv1", "conv"
    if sub == "initial_batchnorm":
        return "bn1", "bn"
    m = _BLOCK_RE.match(sub)
    if m:
        g, b, kind, i = int(m[1]), int(m[2]), m[3], int(m[4])
        return (f"layer{g + 1}.{b}.conv{i + 1}", "conv") if kind == "conv" else (f"layer{g + 1}.{b}.bn{i + 1}", "bn")
    m = _SHORTCUT_RE.match(sub)
    if m:
        g, b, kind = int(m[1]), int(m[2]), m[3]
        return (f"layer{g + 1}.{b}.downsample.{0 if kind == 'conv' else 1}", "conv" if kind == "conv" else "bn")
    return None


def haiku_to_torchvision(params: Mapping[str, Mapping[str, Any]], state: Mapping[str, Mapping[str, Any]]
                         ) -> dict[str, torch.Tensor]:
    """Map a Haiku ResNet torso (params + BN EMA state) to torchvision state-dict names (no ``fc``)."""
    prefix = _torso_prefix(params)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, leaves in params.items():
        if not key.startswith(prefix + "/~/"):
            continue
        sub = key[len(prefix) + 3:]
        mapped = _torch_module_name(sub)
        if mapped is None:
            unknown.append(key)
            continue
        name, kind = mapped
        need = "w" if kind == "conv" else None
        if not isinstance(leaves, Mapping) or (need and need not in leaves):
            raise ValueError(f"Haiku module {key!r} has no {need or 'parameter'} array (found "
                             f"{sorted(leaves) if isinstance(leaves, Mapping) else type(leaves).__name__}).")
        if kind == "conv":
            hwio = _leaf(leaves["w"], f"{key}/w")
            if hwio.ndim != 4:
                raise ValueError(f"{key}/w has shape {hwio.shape}; a Haiku conv kernel is 4-D (HWIO)")
            out[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(hwio.transpose(3, 2, 0, 1)))  # -> OIHW
            if "b" in leaves:
                out[f"{name}.bias"] = torch.from_numpy(_leaf(leaves["b"], f"{key}/b").reshape(-1).copy())
            continue
        if "scale" in leaves:
            out[f"{name}.weight"] = torch.from_numpy(_leaf(leaves["scale"], f"{key}/scale").reshape(-1).copy())
        if "offset" in leaves:
            out[f"{name}.bias"] = torch.from_numpy(_leaf(leaves["offset"], f"{key}/offset").reshape(-1).copy())
        for ema, buf in (("mean_ema", "running_mean"), ("var_ema", "running_var")):
            st = state.get(f"{key}/~/{ema}")
            if not isinstance(st, Mapping) or "average" not in st:
                raise ValueError(f"batch-norm statistics {key}/~/{ema} are missing from the checkpoint state; "
                                 "use the matching online/target state.")
            avg = _leaf(st["average"], f"{key}/~/{ema}")
            out[f"{name}.{buf}"] = torch.from_numpy(avg.astype(np.float32).reshape(-1))
        counter = _leaf(state[f"{key}/~/mean_ema"].get("counter", np.zeros(1, np.int64)), f"{key}/~/mean_ema/counter")
        out[f"{name}.num_batches_tracked"] = torch.tensor(int(counter.reshape(-1)[0]) if counter.size else 0,
                                                          dtype=torch.long)
    if unknown:
        raise ValueError(f"unrecognised Haiku modules in the ResNet torso: {unknown[:5]}; this converter knows "
                         "initial_conv/initial_batchnorm/block_group_g/~/block_b/~/{conv_i,batchnorm_i,shortcut_*}.")
    return out


def haiku_classifier(params: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The online linear classifier as ``{'weight' [C, D], 'bias' [C]}`` (Haiku stores w as [D, C])."""
    keys = [k for k in params if k == "classifier" or k.startswith("classifier/")]
    if not keys:
        raise ValueError("this checkpoint's parameters have no 'classifier' module; load it without head=True.")
    leaves = params[keys[0]]
    if not isinstance(leaves, Mapping) or "w" not in leaves:
        raise ValueError(f"the classifier module {keys[0]!r} has no 'w' array.")
    w = _leaf(leaves["w"], f"{keys[0]}/w")
    if w.ndim != 2:
        raise ValueError(f"{keys[0]}/w has shape {w.shape}; a Haiku linear weight is 2-D [D, C]")
    b = _leaf(leaves["b"], f"{keys[0]}/b") if "b" in leaves else np.zeros(w.shape[1], dtype=w.dtype)
    return {"weight": torch.from_numpy(np.ascontiguousarray(w.T)), "bias": torch.from_numpy(b.reshape(-1).copy())}


# Bottleneck blocks per group -> depth, for naming the registry architecture.
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152, (3, 24, 36, 3): 200}


def infer_arch(params: Mapping[str, Mapping[str, Any]]) -> str:
    """Registry name of the torso: depth from blocks per group, width multiplier from the stem (64 channels = x1)."""
    prefix = _torso_prefix(params)
    blocks: dict[int, set[int]] = {}
    for key in params:
        m = _BLOCK_RE.match(key[len(prefix) + 3:]) if key.startswith(prefix + "/~/") else None
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    counts = tuple(len(blocks[g]) for g in sorted(blocks))
    depth = _DEPTHS.get(counts)
    if depth is None:
        raise ValueError(f"cannot name a ResNet with {counts} blocks per group; pass arch=<registry name>.")
    stem_module = params.get(f"{prefix}/~/initial_conv")
    if not isinstance(stem_module, Mapping) or "w" not in stem_module:
        raise ValueError(f"{prefix}/~/initial_conv has no 'w' array; pass arch=<registry name>.")
    stem = _leaf(stem_module["w"], f"{prefix}/~/initial_conv/w")
    width = stem.shape[-1] // 64
    return f"resnet{depth}" + (f"x{width}" if width > 1 else "")


class OfficialReader:
    """The official release as a ``zoo.weights.readers`` reader: plain pickles (not torch's zip container) with
    a name torch files do not use; the online and target encoders, the ImageNet classifier, TF 'SAME' padding."""

    name = "byol-official"
    encoders = ("online", "target")
    default_padding = "tf_same"

    def claims(self, path: Path, fmt: str) -> bool:
        """A plain pickle not named like a torch file (those are only ever read by torch's safe loader)."""
        return fmt == "pickle" and path.suffix not in (".pt", ".pth", ".bin", ".ckpt")

    def read(self, path: Path, which: str, arch: str | nn.Module | None, head: bool
             ) -> tuple[dict[str, torch.Tensor], str | nn.Module, dict[str, torch.Tensor] | None]:
        """(torchvision state dict of encoder ``which``, its architecture, the classifier's weight/bias or None)."""
        state = read_official_pickle(path)
        params, bn_state = state[f"{which}_params"], state[f"{which}_state"]
        try:
            name = arch if arch is not None else infer_arch(params)
            sd = haiku_to_torchvision(params, bn_state)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{str(path)!r} ({which} encoder): {err}") from None
        # The classifier is trained on the online representation; it is the ImageNet head for either encoder.
        try:
            cls = haiku_classifier(state["online_params"]) if head else None
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{str(path)!r} (head=True): {err}") from None
        return sd, name, cls


READER = OfficialReader()
