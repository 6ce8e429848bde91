"""Named pretrained weights (the table, `zoo pretrained`, trust of unverified files, zoo.create(pretrained=True)) and
backbones from timm-layout folders and the Hugging Face Hub's offline cache. No network: a local server on 127.0.0.1
serves the files; the Hub is only ever read from a cache built here with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import sys

import pytest
import timm
import torch

from local_http import serve

import zoo
from zoo.weights import load_backbone
from zoo.weights.pretrained import UnknownPretrainedError, UnverifiedWeightsError, pretrained_entry
from zoo.weights.pretrained_cli import main as pretrained_main
from zoo.weights.pretrained_table import PRETRAINED

REQUIRED = ("arch", "urls", "sha256", "size", "format", "encoders", "mean", "std", "input_size", "crop_pct",
            "interpolation", "license", "citation")


def test_table_has_the_official_release_with_every_field():
    names = zoo.list_pretrained()
    assert {"byol-r50-official", "byol-r200x2-official"} <= set(names)
    assert len([n for n in names if "ablation" in n]) == 12
    for name in names:
        e = pretrained_entry(name)
        assert all(k in e for k in REQUIRED), name
        assert e["urls"][0].startswith("https://storage.googleapis.com/deepmind-byol/checkpoints/")
        assert e["sha256"] is None  # no checksum is published and none has been measured on the real files
    assert pretrained_entry("byol-r200x2-official")["arch"] == "resnet200x2"
    assert zoo.list_pretrained("resnet200x2") == ["byol-r200x2-official"]
    assert pretrained_entry("byol-r50-ablation-batchsize-64")["urls"][0].endswith("ablations/res50x1_batchsize_64.pkl")


def test_unknown_names_suggest_the_closest(capsys):
    with pytest.raises(UnknownPretrainedError, match="Did you mean byol-r50-official"):
        pretrained_entry("byol-r50-offical")
    with pytest.raises(FileNotFoundError, match="Did you mean byol-r50-official"):
        load_backbone("byol-r50-oficial")
    assert pretrained_main(["download", "byol-r5O-official"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean byol-r50-official" in err and len(err.strip().splitlines()) == 1
    assert pretrained_main(["list", "--arch", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "byol-r50-official" in out and "byol-r200x2-official" not in out and "not yet" in out


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """A zoo export served on 127.0.0.1 and registered as pretrained entry 'test-tiny' (arch convnet_tiny)."""
    from zoo.weights.export import export_backbone

    root = tmp_path / "www"
    root.mkdir()
    torch.manual_seed(0)
    export_backbone("random:convnet_tiny", root / "tiny.safetensors")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    with serve(handler) as base:
        url = f"{base}/tiny.safetensors"
        entry = {**PRETRAINED["byol-r50-official"], "name": "test-tiny", "arch": "convnet_tiny", "urls": [url],
                 "size": (root / "tiny.safetensors").stat().st_size, "padding": "torch"}
        monkeypatch.setitem(PRETRAINED, "test-tiny", entry)
        monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
        for k in ("ZOO_OFFLINE", "HF_HUB_OFFLINE", "ZOO_TRUST_UNVERIFIED"):
            monkeypatch.delenv(k, raising=False)
        yield root / "tiny.safetensors", entry


def test_unverified_download_is_refused_until_trusted(served, monkeypatch, capsys):
    path, entry = served
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(UnverifiedWeightsError, match=f"measured sha256 {digest}.*ZOO_TRUST_UNVERIFIED=1"):
        load_backbone("test-tiny")
    assert pretrained_main(["download", "test-tiny"]) == 2
    assert digest in capsys.readouterr().err
    expected = load_backbone(path)(x)
    torch.testing.assert_close(load_backbone("test-tiny", trust=True)(x), expected, atol=0, rtol=0)
    monkeypatch.setenv("ZOO_TRUST_UNVERIFIED", "1")
    torch.testing.assert_close(zoo.create("convnet_tiny", pretrained=True)(x), expected, atol=0, rtol=0)
    monkeypatch.delenv("ZOO_TRUST_UNVERIFIED")
    assert pretrained_main(["download", "test-tiny", "--trust"]) == 0
    assert pretrained_main(["info", "test-tiny"]) == 0
    assert digest in capsys.readouterr().out  # the cached file's measured digest is on the card
    monkeypatch.setenv("ZOO_OFFLINE", "1")  # from the cache, no server needed
    torch.testing.assert_close(load_backbone("test-tiny", trust=True)(x), expected, atol=0, rtol=0)


def test_verified_entry_needs_no_trust_and_a_wrong_hash_is_refused(served, monkeypatch):
    path, entry = served
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.setitem(PRETRAINED, "test-tiny", {**entry, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="sha256 mismatch.*deleted"):
        load_backbone("test-tiny")
    cache = path.parents[1] / "cache" / "weights"
    assert not (cache / "tiny.safetensors").exists() and not list(cache.glob("*.part"))
    monkeypatch.setitem(PRETRAINED, "test-tiny", {**entry, "sha256": digest})
    torch.testing.assert_close(load_backbone("test-tiny")(x), load_backbone(path)(x), atol=0, rtol=0)
    # a URL pinned with sha256= works the same way, without the table
    torch.testing.assert_close(load_backbone(entry["urls"][0], sha256=digest)(x), load_backbone(path)(x))


def test_create_pretrained_without_an_entry_says_what_to_pass(monkeypatch):
    with pytest.raises(ValueError, match=r"no pretrained weights for 'resnet18'.*resnet50.*zoo.load_backbone") as err:
        zoo.create("resnet18", pretrained=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="drop the overrides"):
        zoo.create("resnet50", pretrained=True, width=2)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.setenv("ZOO_CACHE_DIR", "/nonexistent-zoo-cache")
    with pytest.raises(ValueError, match=r"ZOO_OFFLINE=1 and pretrain_res50x1.pkl is not in the cache"):
        zoo.create("resnet50", pretrained=True)  # routed to the table's file, never the network
    assert isinstance(zoo.create("resnet18", pretrained=False), torch.nn.Module)


# -- timm-layout folders and the Hugging Face Hub --------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """A folder written by timm itself (save_for_hf: config.json with architecture + pretrained_cfg, safetensors)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=7).eval()
    folder = tmp_path_factory.mktemp("timm") / "repo"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder, model


def _fake_hub_cache(root, repo: str, folder, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hub cache layout huggingface_hub reads offline: models--ORG--REPO/{refs/main, snapshots/<rev>/...}."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    shutil.copytree(folder, base / "snapshots" / rev)
    return rev


def test_timm_folder_and_offline_hub_cache(timm_folder, tmp_path, monkeypatch):
    folder, model = timm_folder
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(load_backbone(folder)(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_backbone(folder, head=True)(x), model(x), atol=1e-5, rtol=1e-5)
    cache = tmp_path / "hf"
    rev = _fake_hub_cache(cache, "someorg/tiny-resnet", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch.no_grad():
        for spec in ("hf-hub:someorg/tiny-resnet", f"hf-hub:someorg/tiny-resnet@{rev}"):
            torch.testing.assert_close(load_backbone(spec)(x), expected, atol=1e-5, rtol=1e-5)
    for spec, expected_msg in (("hf-hub:someorg/absent", "no config.json"),
                               ("hf-hub:someorg/tiny-resnet@" + "f" * 40, "no config.json"),
                               ("hf-hub:not a repo", "expected hf-hub:ORG/REPO")):
        with pytest.raises(ValueError, match=expected_msg) as err:
            load_backbone(spec)
        assert "\n" not in str(err.value)


def test_hub_architecture_we_cannot_build_and_missing_huggingface_hub(timm_folder, tmp_path, monkeypatch):
    folder, _ = timm_folder
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architecture"] = "resnet_from_the_future"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'resnet_from_the_future', which neither zoo nor") as err:
        load_backbone(odd)
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ValueError, match="needs huggingface_hub: pip install huggingface_hub"):
        load_backbone("hf-hub:someorg/tiny-resnet")


def test_our_timm_export_round_trips_through_the_hub_cache(tmp_path, monkeypatch):
    """`zoo export --format timm` uploaded as-is: read back from the Hub cache with our architecture and padding."""
    from zoo.weights.export import export

    torch.manual_seed(0)
    enc = zoo.create("resnet18").eval()
    torch.save({"state_dict": {f"online_encoder.{k}": v for k, v in enc.state_dict().items()},
                "pytorch-lightning_version": "2.6.0",
                "zoo": {"format": 1, "kind": "image-encoder", "arch": "resnet18", "overrides": {},
                        "encoders": {"online": "online_encoder."}, "classifier": None}}, tmp_path / "r18.ckpt")
    export(tmp_path / "r18.ckpt", tmp_path / "out", ["timm"], padding="tf_same")
    _fake_hub_cache(tmp_path / "hf", "me/r18-byol", tmp_path / "out")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    got = load_backbone("hf-hub:me/r18-byol")
    assert got.zoo_arch == "resnet18" and got.zoo_padding == "tf_same"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), load_backbone(tmp_path / "r18.ckpt", padding="tf_same")(x), atol=0, rtol=0)
