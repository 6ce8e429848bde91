"""The official BYOL converter on files written in exactly the release's layout from a random torchvision ResNet-50."""
from __future__ import annotations

import copy
import os
import pickle
import re
import sys
import types
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from zoo.weights import load_backbone
from byol.official import (apply_tf_same_padding, haiku_to_torchvision, infer_arch, read_official_pickle,
                                       tf_same_padding)
from zoo.weights.safe_load import UnsafeFileError


# Stand-ins for the classes the release references; pickled by reference under the official module paths.
class _ByolExperimentState(NamedTuple):
    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    opt_state: Any


class ScaleByScheduleState(NamedTuple):
    count: Any


class TraceState(NamedTuple):
    trace: Any


class EmptyState(NamedTuple):
    pass


_FAKE_CLASSES = {
    "byol.byol_experiment": [_ByolExperimentState],
    "optax._src.transform": [ScaleByScheduleState, TraceState],
    "optax._src.base": [EmptyState],
}


for _modname, _classes in _FAKE_CLASSES.items():
    for _cls in _classes:
        _cls.__module__ = _modname


def _install_fake_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    for modname, classes in _FAKE_CLASSES.items():
        for parent in ("optax", "optax._src"):
            if modname.startswith(parent + ".") and parent not in sys.modules:
                monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
        mod = types.ModuleType(modname)
        for cls in classes:
            setattr(mod, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, modname, mod)


@pytest.fixture()
def official_modules(monkeypatch):
    """Make the fake classes importable under the official module names while pickling."""
    _install_fake_modules(monkeypatch)


def _bn_params(sd: dict, name: str) -> dict:
    c = sd[f"{name}.weight"].numel()
    return {"scale": sd[f"{name}.weight"].numpy().reshape(1, 1, 1, c),
            "offset": sd[f"{name}.bias"].numpy().reshape(1, 1, 1, c)}


def _ema(avg: np.ndarray, c: int) -> dict:
    return {"counter": np.array(1000, np.int32), "hidden": (avg * 0.5).reshape(1, 1, 1, c),
            "average": avg.reshape(1, 1, 1, c)}


def to_haiku(model: torchvision.models.ResNet, prefix: str) -> tuple[dict, dict]:
    """Inverse mapping (torchvision -> Haiku flat dicts), written independently of the converter."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params: dict[str, dict] = {}
    state: dict[str, dict] = {}

    def conv(tv: str, hk: str) -> None:
        params[f"{prefix}/~/{hk}"] = {"w": sd[f"{tv}.weight"].permute(2, 3, 1, 0).contiguous().numpy()}

    def bn(tv: str, hk: str) -> None:
        params[f"{prefix}/~/{hk}"] = _bn_params(sd, tv)
        c = sd[f"{tv}.weight"].numel()
        state[f"{prefix}/~/{hk}/~/mean_ema"] = _ema(sd[f"{tv}.running_mean"].numpy(), c)
        state[f"{prefix}/~/{hk}/~/var_ema"] = _ema(sd[f"{tv}.running_var"].numpy(), c)

    conv("conv1", "initial_conv")
    bn("bn1", "initial_batchnorm")
    for g in range(4):
        for b, block in enumerate(getattr(model, f"layer{g + 1}")):
            base = f"block_group_{g}/~/block_{b}/~/"
            for i in range(3):
                conv(f"layer{g + 1}.{b}.conv{i + 1}", f"{base}conv_{i}")
                bn(f"layer{g + 1}.{b}.bn{i + 1}", f"{base}batchnorm_{i}")
            if block.downsample is not None:
                conv(f"layer{g + 1}.{b}.downsample.0", f"{base}shortcut_conv")
                bn(f"layer{g + 1}.{b}.downsample.1", f"{base}shortcut_batchnorm")
    return params, state


def _random_resnet50(seed: int) -> torchvision.models.ResNet:
    torch.manual_seed(seed)
    m = torchvision.models.resnet50()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):  # non-trivial BN so the test sees whether stats are used
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _features_only(m: torchvision.models.ResNet) -> torchvision.models.ResNet:
    m.fc = nn.Identity()
    return m.eval()


def _heads(rng: np.random.Generator, d: int = 2048) -> dict:
    lin = lambda i, o, bias=True: {"w": rng.normal(size=(i, o)).astype(np.float32) * 0.01,
                                   **({"b": np.zeros(o, np.float32)} if bias else {})}
    return {"projector/~/linear": lin(d, 16), "projector/~/batch_norm": {"scale": np.ones((16,), np.float32)},
            "projector/~/linear_1": lin(16, 8, bias=False), "classifier": lin(d, 10)}


def _write_release(path, online: nn.Module, target: nn.Module, prefix: str = "res_net50") -> dict:
    rng = np.random.default_rng(0)
    op, os_ = to_haiku(online, prefix)
    tp, ts = to_haiku(target, prefix)
    # Share identical leaves between online and target (pickle memoises them) to keep the file small.
    tp = {k: (op[k] if all(np.array_equal(v, op[k][n]) for n, v in tp[k].items()) else tp[k]) for k in tp}
    op.update(_heads(rng))
    tp.update({k: v for k, v in _heads(rng).items() if k.startswith("projector")})
    opt_state = (EmptyState(), TraceState(trace={"classifier": {"w": np.zeros((2, 2), np.float32)}}),
                 ScaleByScheduleState(count=np.array(7, np.int32)))
    es = _ByolExperimentState(op, tp, os_, ts, opt_state)
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": es, "step": 312784, "rng": np.zeros(2, np.uint32)}, f, protocol=2)
    return op


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(path, online, target, online haiku params): one file in the official layout, written once per module."""
    online = _random_resnet50(0)
    target = copy.deepcopy(online)
    with torch.no_grad():  # the target differs in its last block only (shared leaves keep the file small)
        for p in target.layer4[2].parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("release") / "pretrain_res50x1.pkl"
    with pytest.MonkeyPatch.context() as mp:
        _install_fake_modules(mp)
        op = _write_release(path, online, target)
    return path, online, target, op


def _resnet50_features() -> nn.Module:
    return _features_only(torchvision.models.resnet50())


def test_release_layout_roundtrip_online_target_head(release):
    path, online, target, op = release
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want_online = _features_only(copy.deepcopy(online))(x)
        want_target = _features_only(copy.deepcopy(target))(x)
        clf = load_backbone(path, padding="torch", arch=_resnet50_features(), head=True)
        t = load_backbone(path, which="target", padding="torch", arch=_resnet50_features())
        got_online, logits, got_target = clf.encoder(x), clf(x), t(x)
    torch.testing.assert_close(got_online, want_online, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_target, want_target, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got_online, got_target)
    w, b = torch.from_numpy(op["classifier"]["w"]), torch.from_numpy(op["classifier"]["b"])
    torch.testing.assert_close(logits, want_online @ w + b, rtol=1e-4, atol=1e-4)


def _manual_tf_same_forward(m: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """Reference: torchvision ResNet-50 forward with TF-SAME pads written out by hand for a 64x64 input."""
    x = F.relu(m.bn1(F.conv2d(F.pad(x, (2, 3, 2, 3)), m.conv1.weight, stride=2)))  # 64 -> 32: pads 2 / 3
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)  # 32 -> 16: pads 0 / 1
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for blk in layer:
            out = F.relu(blk.bn1(F.conv2d(x, blk.conv1.weight)))
            if blk.conv2.stride[0] == 2:  # 16->8, 8->4, 4->2: pads 0 / 1
                out = F.conv2d(F.pad(out, (0, 1, 0, 1)), blk.conv2.weight, stride=2)
            else:
                out = F.conv2d(out, blk.conv2.weight, padding=1)
            out = blk.bn3(blk.conv3(F.relu(blk.bn2(out))))
            idt = x
            if blk.downsample is not None:
                ds = blk.downsample[0]
                idt = blk.downsample[1](F.conv2d(x, ds.weight, stride=ds.stride))
            x = F.relu(out + idt)
    return x.mean((2, 3))


def test_tf_same_matches_manual_asymmetric_reference(release):
    path, online, _, _ = release
    m = load_backbone(path)  # architecture inferred (zoo's resnet50), default padding: tf_same
    assert m.zoo_padding == "tf_same" and m.zoo_arch == "resnet50"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = m(x)
        want = _manual_tf_same_forward(online, x)
        torch_pad = _features_only(copy.deepcopy(online))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - torch_pad).abs().max() > 1e-3  # the option really changes the stride-2 layers


def test_tf_same_padding_formula_and_swap():
    assert tf_same_padding(224, 7, 2) == (2, 3)
    assert tf_same_padding(112, 3, 2) == (0, 1)
    assert tf_same_padding(7, 3, 2) == (1, 1)  # odd input: symmetric, like torch
    assert tf_same_padding(56, 1, 2) == (0, 0)
    assert tf_same_padding(56, 3, 1) == (1, 1)
    m = torchvision.models.resnet18()
    keys = list(m.state_dict())
    assert apply_tf_same_padding(m) == 1 + 1 + 3 + 3  # stem, max-pool, 3 strided convs + 3 strided shortcuts
    assert list(m.state_dict()) == keys


def test_reader_returns_plain_containers(tmp_path, official_modules):
    """Every field of the experiment state, opt_state stand-ins turned into plain data, step kept."""
    params = {"res_net50/~/initial_conv": {"w": np.ones((7, 7, 3, 64), np.float32)}}
    state = {"res_net50/~/initial_batchnorm/~/mean_ema": {"counter": np.array(3, np.int32),
                                                          "hidden": np.zeros((1, 1, 1, 64), np.float32),
                                                          "average": np.ones((1, 1, 1, 64), np.float32)}}
    opt_state = (EmptyState(), ScaleByScheduleState(count=np.array(7, np.int32)))
    path = tmp_path / "small.pkl"
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": _ByolExperimentState(params, params, state, state, opt_state),
                     "step": 312784, "rng": np.zeros(2, np.uint32)}, f, protocol=2)
    raw = read_official_pickle(path)
    assert raw["step"] == 312784 and set(raw) == {"online_params", "target_params", "online_state", "target_state",
                                                  "opt_state", "step"}
    np.testing.assert_array_equal(raw["online_params"]["res_net50/~/initial_conv"]["w"], params["res_net50/~/initial_conv"]["w"])
    sched = raw["opt_state"][1]
    assert sched["__class__"] == "optax._src.transform.ScaleByScheduleState" and int(sched["args"][0]) == 7


def test_res_net200x2_naming_and_any_prefix():
    """ResNet-200 (2x) naming: res_net200 prefix, 3/24/36/3 blocks, 128-channel stem -> 'resnet200x2'."""
    params = {"res_net200/~/initial_conv": {"w": np.zeros((7, 7, 3, 128), np.float32)}}
    for g, n in enumerate((3, 24, 36, 3)):
        for b in range(n):
            params[f"res_net200/~/block_group_{g}/~/block_{b}/~/conv_0"] = {"w": np.zeros((1, 1, 1, 1), np.float32)}
    assert infer_arch(params) == "resnet200x2"
    # The key mapping is prefix-agnostic: a ResNet-50 written under res_net200 maps to the same torchvision names.
    src = _random_resnet50(3)
    p50, s50 = to_haiku(src, "res_net50")
    p200, s200 = to_haiku(src, "res_net200")
    a, b = haiku_to_torchvision(p50, s50), haiku_to_torchvision(p200, s200)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    want = {k for k in src.state_dict() if not k.startswith("fc.")}
    assert set(a) == want


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_crafted_pickle_is_refused_without_running(tmp_path, official_modules):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    es = _ByolExperimentState({}, {}, {}, {}, _Payload(str(marker)))
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": es, "step": 0}, f, protocol=2)
    with pytest.raises(UnsafeFileError, match="system"):
        read_official_pickle(path)
    with pytest.raises(UnsafeFileError):
        load_backbone(path, arch="resnet50")
    assert not marker.exists()


def test_truncated_and_wrong_files(tmp_path, official_modules):
    path = tmp_path / "cut.pkl"
    with open(path, "wb") as f:
        f.write(pickle.dumps({"experiment_state": _ByolExperimentState({}, {}, {}, {}, ())}, protocol=2)[:20])
    with pytest.raises(ValueError, match="truncated"):
        read_official_pickle(path)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": np.zeros(3)}, protocol=2))
    with pytest.raises(ValueError, match="experiment_state"):
        read_official_pickle(other)
    with pytest.raises(FileNotFoundError):
        read_official_pickle(tmp_path / "missing.pkl")


@pytest.mark.slow
def test_res_net200x2_full_roundtrip(tmp_path, official_modules):
    """The real ResNet-200 (2x) layout (250M parameters): written as 'res_net200', inferred and loaded back."""
    from zoo.models.registry import create

    torch.manual_seed(0)
    src = create("resnet200x2").eval()
    params, state = to_haiku(src, "res_net200")
    path = tmp_path / "pretrain_res200x2.pkl"
    es = _ByolExperimentState(params, params, state, state, (EmptyState(),))
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": es, "step": 1, "rng": np.zeros(2, np.uint32)}, f, protocol=2)
    del params, state
    m = load_backbone(path, padding="torch")
    assert m.zoo_arch == "resnet200x2" and m.num_features == 4096
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Files written by the official saver: dill.dump(checkpoint_data, f, protocol=2).

dill = pytest.importorskip("dill")


def _release_data(online: nn.Module, target: nn.Module, rng: Any = None) -> dict:
    op, os_ = to_haiku(online, "res_net50")
    tp, ts = to_haiku(target, "res_net50")
    op.update(_heads(np.random.default_rng(0)))
    opt_state = (EmptyState(), ScaleByScheduleState(count=np.array(7, np.int32)))
    rng = np.zeros(2, np.uint32) if rng is None else rng
    return {"experiment_state": _ByolExperimentState(op, tp, os_, ts, opt_state), "step": np.int64(312784),
            "rng": rng}


class _OldDillPickler(pickle.Pickler):
    """Writes NumPy's own callables the way dill 0.3.1-0.3.5 does: _get_attr(_import_module(<module>), name)."""

    def __init__(self, f, core: str) -> None:
        super().__init__(f, protocol=2)
        self.core = core

    def reducer_override(self, obj):
        import _codecs

        from dill._dill import _get_attr, _import_module
        if isinstance(obj, _ModuleName):
            return _import_module, (obj.name,)
        if obj is np.core.multiarray._reconstruct or obj is np.core.multiarray.scalar:
            return _get_attr, (_ModuleName(f"{self.core}._multiarray_umath"), obj.__name__)
        if obj is _codecs.encode:
            return _get_attr, (_ModuleName("_codecs"), "encode")
        return NotImplemented


class _ModuleName:
    def __init__(self, name: str) -> None:
        self.name = name


def test_dill_written_release_matches_plain_pickle(tmp_path, official_modules):
    """The official saver's output (real dill, protocol 2) gives exactly the features of the plain-pickle file."""
    online, target = _random_resnet50(1), _random_resnet50(2)
    data = _release_data(online, target)
    plain, dilled = tmp_path / "plain.pkl", tmp_path / "pretrain_res50x1.pkl"
    with open(plain, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with open(dilled, "wb") as f:
        dill.dump(data, f, protocol=2)
    assert b"dill._dill" in dilled.read_bytes()  # the real dill encoding, not a plain pickle
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for which in ("online", "target"):
            a = load_backbone(plain, which=which)(x)
            b = load_backbone(dilled, which=which)(x)
            assert torch.equal(a, b)
    raw = read_official_pickle(dilled)
    assert int(raw["step"]) == 312784


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
def test_old_dill_get_attr_import_module_layout(tmp_path, official_modules, core):
    """dill <= 0.3.5 writes _get_attr(_import_module('numpy.core._multiarray_umath'), '_reconstruct'): accepted."""
    params = {"res_net50/~/initial_conv": {"w": np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)}}
    state = {"k": {"counter": np.int32(3), "average": np.ones((1, 1, 1, 4), np.float32)}}
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        _OldDillPickler(f, core).dump({"experiment_state": _ByolExperimentState(params, params, state, state, ()),
                                       "step": 5, "dt": np.dtype("float16")})
    blob = path.read_bytes()
    assert b"_get_attr" in blob and f"{core}._multiarray_umath".encode() in blob
    raw = read_official_pickle(path)
    np.testing.assert_array_equal(raw["online_params"]["res_net50/~/initial_conv"]["w"],
                                  params["res_net50/~/initial_conv"]["w"])
    assert int(raw["online_state"]["k"]["counter"]) == 3


def test_dill_numpy_scalars_dtypes_nested(tmp_path, official_modules):
    """Arrays of every numeric dtype, NumPy scalars, dtypes and nested dicts round-trip through dill."""
    leaves = {f"a_{t}": (np.arange(6) % 3).astype(t).reshape(2, 3) for t in ("f2", "f4", "f8", "i1", "i4", "i8",
                                                                              "u1", "u4", "?", "c8")}
    leaves.update(scalar=np.float32(1.5), count=np.int64(9), flag=np.bool_(True), dt=np.dtype("<f4"),
                  nested={"x": {"y": np.zeros((2, 2), np.uint32)}}, fortran=np.asfortranarray(np.ones((2, 3))))
    path = tmp_path / "mixed.pkl"
    with open(path, "wb") as f:
        dill.dump({"experiment_state": _ByolExperimentState(leaves, {}, {}, {}, ()), "step": 1}, f, protocol=2)
    got = read_official_pickle(path)["online_params"]
    for k, v in leaves.items():
        if isinstance(v, dict):
            np.testing.assert_array_equal(got[k]["x"]["y"], v["x"]["y"])
        else:
            assert type(got[k]) is type(v) and (got[k] == v).all() if isinstance(v, np.ndarray) else got[k] == v
            if isinstance(v, np.ndarray):
                assert got[k].dtype == v.dtype


def test_jax_array_rng_read_as_numpy(tmp_path, official_modules, monkeypatch):
    """Today's JAX pickles its rng as jax._src.array._reconstruct_array(fun, args, arr_state, aval_state)."""
    jax_array = types.ModuleType("jax._src.array")

    def _reconstruct_array(fun, args, arr_state, aval_state):  # the signature jax defines
        raise AssertionError("never called: the reader must not import jax")

    _reconstruct_array.__module__, _reconstruct_array.__qualname__ = "jax._src.array", "_reconstruct_array"
    jax_array._reconstruct_array = _reconstruct_array
    jax, jax_src = types.ModuleType("jax"), types.ModuleType("jax._src")
    jax._src, jax_src.array = jax_src, jax_array
    for name, mod in (("jax", jax), ("jax._src", jax_src), ("jax._src.array", jax_array)):
        monkeypatch.setitem(sys.modules, name, mod)

    class FakeJaxArray:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):  # what jax.Array.__reduce__ returns
            fun, args, arr_state = self.value.__reduce__()
            return _reconstruct_array, (fun, args, arr_state, {"weak_type": False})

    rng = np.array([0, 42], np.uint32)
    online = _random_resnet50(4)
    path = tmp_path / "jax.pkl"
    with open(path, "wb") as f:
        dill.dump(_release_data(online, online, rng=FakeJaxArray(rng)), f, protocol=2)
    assert b"_reconstruct_array" in path.read_bytes()
    monkeypatch.delitem(sys.modules, "jax._src.array")
    from byol.official import _BoundedReader, _RestrictedUnpickler
    with open(path, "rb") as f:
        top = _RestrictedUnpickler(_BoundedReader(f, path.stat().st_size), path.stat().st_size).load()
    np.testing.assert_array_equal(top["rng"], rng)
    assert "jax._src.array" not in sys.modules  # nothing imported it back
    m = load_backbone(path, padding="torch", arch=_resnet50_features())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _features_only(copy.deepcopy(online))(x), rtol=1e-4, atol=1e-4)


def _hostile(kind: str, marker: str):
    def local_function():
        os.system(f"touch {marker}")

    class LocalClass:
        def __init__(self):
            os.system(f"touch {marker}")

    class Call:
        def __init__(self, fn, args=()):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return self.fn, self.args

    return {"function": Call(local_function), "lambda": Call(lambda: os.system(f"touch {marker}")),
            "class": Call(LocalClass), "os_system": Call(os.system, (f"touch {marker}",)), "module": os,
            "eval": Call(eval, (f"__import__('os').system('touch {marker}')",))}[kind]


@pytest.mark.parametrize("kind, named", [("function", "_create_function"), ("lambda", "_create_function"),
                                         ("class", "_create_type"), ("os_system", "system"),
                                         ("module", "_import_module('os')"), ("eval", "eval")])
def test_dill_written_hostile_files_are_refused(tmp_path, official_modules, kind, named):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{kind}.pkl"
    payload = _hostile(kind, str(marker))
    with open(path, "wb") as f:
        dill.dump({"experiment_state": _ByolExperimentState({}, {}, {}, {}, payload), "step": 0}, f, protocol=2)
    with pytest.raises(UnsafeFileError, match=re.escape(named)) as err:
        read_official_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnsafeFileError):
        load_backbone(path)
    assert not marker.exists()


@pytest.mark.parametrize("attr", ["load", "frombuffer", "fromfile", "memmap"])
def test_dill_get_attr_beyond_numpy_constructors_is_refused(tmp_path, attr):
    from dill._dill import _get_attr, _import_module

    class Call:
        def __reduce__(self):
            return _get_attr, (_Mod(), attr)

    class _Mod:
        def __reduce__(self):
            return _import_module, ("numpy",)

    path = tmp_path / "getattr.pkl"
    path.write_bytes(pickle.dumps({"experiment_state": Call()}, protocol=2))
    with pytest.raises(UnsafeFileError, match=f"numpy.{attr}"):
        read_official_pickle(path)


def _bomb(ops: bytes) -> bytes:
    return b"\x80\x02" + ops + b"."


@pytest.mark.parametrize("name, blob", [
    ("bytearray", _bomb(b"c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R")),
    ("ndarray_direct", _bomb(b"cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R")),
    ("reconstruct", _bomb(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85U\x01b\x87R")),
    ("huge_string", b"\x80\x04\x8d" + (2 ** 40).to_bytes(8, "little") + b"aaaa"),
    ("huge_bytes", b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little") + b"aaaa"),
])
def test_memory_bombs_are_refused_not_called_truncated(tmp_path, name, blob):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnsafeFileError) as err:
        read_official_pickle(path)
    msg = str(err.value)
    assert "truncated" not in msg and ("too" in msg or "refused" in msg) and str(path) in msg


def test_lookalike_experiment_state_names_missing_key(tmp_path, official_modules):
    """A pickle naming our own/other classes, or lacking fields, gives an error naming the file and the key."""
    class Other(NamedTuple):
        a: Any

    Other.__module__, Other.__qualname__ = "byol.byol_experiment", "Other"
    sys.modules["byol.byol_experiment"].Other = Other
    for i, es in enumerate([Other(1), _ByolExperimentState({}, None, {}, {}, ())]):
        path = tmp_path / f"look{i}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"experiment_state": es, "step": 0}, f, protocol=2)
        with pytest.raises(ValueError, match="online_params|target_params") as err:
            load_backbone(path)
        assert str(path) in str(err.value) and not isinstance(err.value, KeyError)


def test_big_endian_and_fortran_leaves_load_like_native(tmp_path, official_modules):
    """Arrays stored big-endian or in Fortran order are legitimate NumPy pickles: they load to the same weights."""
    online = _random_resnet50(5)
    data = _release_data(online, online)
    params = data["experiment_state"].online_params
    for k, v in list(params.items()):
        params[k] = {n: (np.asfortranarray(a) if i % 2 else a.astype(a.dtype.newbyteorder(">")))
                     for i, (n, a) in enumerate(v.items())}
    path = tmp_path / "variants.pkl"
    with open(path, "wb") as f:
        dill.dump(data, f, protocol=2)
    m = load_backbone(path, padding="torch", arch=_resnet50_features())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _features_only(copy.deepcopy(online))(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("leaf, match", [([[1.0, 2.0]], "not a NumPy array"), ("text", "not a NumPy array")])
def test_non_array_leaves_are_named(tmp_path, official_modules, leaf, match):
    params = {"res_net50/~/initial_conv": {"w": leaf}}
    path = tmp_path / "leaf.pkl"
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": _ByolExperimentState(params, params, {}, {}, ()), "step": 0}, f, protocol=2)
    with pytest.raises(ValueError, match=match) as err:
        load_backbone(path, arch="resnet50")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
