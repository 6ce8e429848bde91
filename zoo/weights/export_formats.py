"""What ``zoo export`` writes besides our own safetensors file: timm's folder layout, a torchvision state dict, and the
model card every export carries.

- ``timm``: ``model.safetensors`` + ``config.json`` (``architecture``, ``num_classes``, ``num_features``,
  ``model_args`` where needed, ``pretrained_cfg`` with mean/std/input size/crop/
  interpolation from the training config) + ``README.md``; our model card under ``config.json["zoo"]``.
  ``timm.create_model("local-dir:DIR", pretrained=True)`` and ``timm.create_model(ARCH, pretrained=True,
  pretrained_cfg_overlay=dict(file=DIR/"model.safetensors", num_classes=N))`` load it; so does ``zoo.load_backbone(DIR)``.
- ``torchvision``: ``model.pth``, a plain state dict ``torchvision.models.resnetNN(num_classes=N).load_state_dict(...,
  strict=True)`` accepts, + ``model_card.json``.
``fc`` holds the source's trained classifier (a method's online classifier, the release's ImageNet head); a source with
no classifier gets a **zero** 1000-way ``fc`` (every logit 0) so the stock constructors load strictly: use the pooled
features (``num_classes=0`` in timm, ``model.fc = torch.nn.Identity()`` in torchvision). The card says which.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMATS", "model_card", "timm_architecture", "write_timm", "write_torchvision"]

FORMATS = ("safetensors", "timm", "torchvision")
_TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)
_ZERO_HEAD_CLASSES = 1000  # what timm's and torchvision's ResNet constructors build by default


def _resnet_shape(arch: str, overrides: dict[str, Any]) -> tuple[int, int, int] | None:
    """(depth, width, in_chans) of a zoo ResNet name + overrides timm/torchvision can express, else None."""
    m = re.fullmatch(r"resnet(\d+)(?:x(\d+))?", arch)
    if not m or overrides.get("cifar_stem") or set(overrides) - {"width", "in_chans", "zero_init_residual", "depth"}:
        return None
    return int(overrides.get("depth", m[1])), int(overrides.get("width", m[2] or 1)), int(overrides.get("in_chans", 3))


def timm_architecture(arch: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """timm's model name and ``model_args`` for a zoo architecture; refused in one line when timm has no equivalent."""
    if arch.startswith("timm:"):
        return arch[len("timm:"):], dict(overrides)
    shape = _resnet_shape(arch, overrides)
    if shape is None or shape[1] != 1:
        # timm's plain 7x7 stem always has 64 channels; BYOL's wide ResNets (x2, x4) widen the stem too.
        why = "its stem is wider than timm's fixed 64 channels" if shape else "timm has no such model"
        raise ValueError(f"--format timm: architecture {arch!r} (overrides {overrides}) has no timm equivalent ({why}; "
                         "timm takes resnet18..200 at width 1 and every timm:<name>); use the default safetensors "
                         "export and zoo.load_backbone.")
    depth, _, in_chans = shape
    return f"resnet{depth}", ({"in_chans": in_chans} if in_chans != 3 else {})


def _torchvision_name(arch: str, overrides: dict[str, Any]) -> str:
    shape = _resnet_shape(arch, overrides)
    if shape is None or shape[0] not in _TORCHVISION_DEPTHS or shape[1:] != (1, 3):
        raise ValueError(f"--format torchvision: architecture {arch!r} (overrides {overrides}) is not one of "
                         f"torchvision's ResNets (resnet{_TORCHVISION_DEPTHS}, width 1, 3 channels); use --format "
                         "timm (wide and ResNet-200 models) or the default safetensors export.")
    return f"resnet{shape[0]}"


def _normalisation(hparams: dict[str, Any] | None, entry: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation transform: the pretrained table's entry, else the training config's, else BYOL's ImageNet one."""
    if entry is not None:
        return {k: entry[k] for k in ("mean", "std", "input_size", "crop_pct", "interpolation")} | {
            "from": "the pretrained table"}
    from augment.presets import linear_eval_test_preset

    size = int((hparams or {}).get("image_size") or 224)
    overrides = dict((hparams or {}).get("eval_overrides") or {})
    try:
        preset = linear_eval_test_preset(size, round(size * 256 / 224), **overrides)
    except (TypeError, ValueError):
        preset = linear_eval_test_preset(size, round(size * 256 / 224))
    return {"mean": [float(v) for v in preset.mean], "std": [float(v) for v in preset.std],
            "input_size": [3, size, size], "crop_pct": round(size / preset.resize_to, 4), "interpolation": "bicubic",
            "eval_crop": preset.eval_crop,
            "from": "the training config (model.image_size, eval_overrides)" if hparams else
                    "BYOL's ImageNet linear-evaluation transform (the source records none)"}


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _probe_report(path: Path | None) -> dict[str, Any] | None:
    """probe_report.json of the run a checkpoint belongs to (beside it, or in the run folder above checkpoints/)."""
    if path is None:
        return None
    for folder in (path.parent, path.parent.parent):
        report = folder / "probe_report.json"
        if report.is_file():
            try:
                return json.loads(report.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def model_card(source: str, local: Path | None, model: nn.Module, head: nn.Linear | None) -> dict[str, Any]:
    """The card every export carries: arch, source and its sha256, training config, probe figures, normalisation."""
    from zoo.weights.download import recorded_sha256, sha256_file
    from zoo.weights.pretrained_table import PRETRAINED

    entry = PRETRAINED.get(source)
    hparams = None
    if local is not None and local.is_file():
        from zoo.weights.checkpoint import is_lightning_checkpoint, load_torch_file
        from zoo.weights.safe_load import sniff_format

        if sniff_format(local) == "zip":
            obj = load_torch_file(local)
            if is_lightning_checkpoint(obj) and isinstance(obj.get("hyper_parameters"), dict):
                hparams = _json_safe(obj["hyper_parameters"])
    card: dict[str, Any] = {
        "arch": model.zoo_arch, "arch_overrides": model.zoo_arch_overrides,
        "num_features": int(getattr(model, "num_features", 0) or 0), "padding": model.zoo_padding,
        "which": model.zoo_which, "source": Path(source).name if local is not None and str(local) == source else source,
        "source_sha256": (recorded_sha256(local) or sha256_file(local)) if local is not None and local.is_file()
        else None,
        "training_config": hparams, "probe_report": _probe_report(local), "normalization": _normalisation(hparams, entry),
        "classifier": {"num_classes": head.out_features, "from": "the source's trained classifier"} if head is not None
        else {"num_classes": 0, "from": "none in the source"},
    }
    if entry is not None:
        card.update({k: entry[k] for k in ("license", "citation", "top1", "urls")} | {"pretrained_name": source})
    if model.zoo_padding == "tf_same":
        card["padding_note"] = ("trained with TF 'SAME' padding (asymmetric on stride-2 layers); timm and torchvision "
                                "use symmetric padding, so their features differ slightly; zoo.load_backbone(DIR) "
                                "restores TF-SAME")
    return card


def _with_fc(model: nn.Module, head: nn.Linear | None, name: str, card: dict[str, Any]) -> tuple[dict, int]:
    """Encoder state dict + classifier under ``name`` (a zero 1000-way one when the source has none; see docstring)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if head is None:
        d = card["num_features"]
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.zeros(_ZERO_HEAD_CLASSES, d), torch.zeros(_ZERO_HEAD_CLASSES)
        card["classifier"] = {"num_classes": _ZERO_HEAD_CLASSES, "zeros": True,
                              "from": "none in the source: fc is all zeros (every logit 0); use the pooled features "
                                      "(timm num_classes=0, torchvision model.fc = nn.Identity())"}
        return sd, _ZERO_HEAD_CLASSES
    sd[f"{name}.weight"], sd[f"{name}.bias"] = head.weight.detach().cpu(), (
        head.bias.detach().cpu() if head.bias is not None else torch.zeros(head.out_features))
    return sd, head.out_features


def _readme(card: dict[str, Any], timm_name: str, num_classes: int, model_args: dict[str, Any]) -> str:
    norm = card["normalization"]
    extra = "".join(f", {k}={v!r}" for k, v in model_args.items())
    probe = card.get("probe_report") or {}
    figures = ", ".join(f"{k} {v:.4g}" for k, v in probe.items() if isinstance(v, (int, float))) or "none recorded"
    lines = [f"# {card.get('pretrained_name') or card['source']}: {card['arch']} encoder (byol-zoo export)", "",
             f"- architecture: timm `{timm_name}`{' with ' + json.dumps(model_args) if model_args else ''} "
             f"(zoo `{card['arch']}`), {card['num_features']} features, `fc` {card['classifier']['from']}",
             f"- source: `{card['source']}` (sha256 `{card['source_sha256']}`), {card['which']} encoder",
             f"- evaluation transform: resize {norm['interpolation']} then centre crop (crop_pct {norm['crop_pct']}) "
             f"to {norm['input_size'][1]} px, mean {norm['mean']}, std {norm['std']}",
             f"- probe figures: {figures}", f"- padding: {card['padding']}"]
    if card.get("license"):
        lines += [f"- license: {card['license']}", f"- citation: {card['citation']}"]
    lines += ["", "```python", "import timm, zoo", 'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)',
              f'model = timm.create_model("{timm_name}", pretrained=True, num_classes={num_classes}{extra},',
              f'                          pretrained_cfg_overlay=dict(file="THIS_FOLDER/model.safetensors", '
              f"num_classes={num_classes}))", 'encoder = zoo.load_backbone("THIS_FOLDER")   # features only', "```", ""]
    return "\n".join(lines)


def write_timm(out: Path, model: nn.Module, head: nn.Linear | None, card: dict[str, Any]) -> list[Path]:
    """Write ``out/model.safetensors`` + ``out/config.json`` + ``out/README.md`` in timm's layout."""
    from zoo.files import atomic_write_text
    from zoo.weights.safe_load import write_safetensors

    timm_name, model_args = timm_architecture(model.zoo_arch, model.zoo_arch_overrides)
    classifier = "fc"
    if model.zoo_arch.startswith("timm:"):
        import timm

        classifier = timm.create_model(timm_name, pretrained=False, **model_args).pretrained_cfg.get("classifier",
                                                                                                       "head")
        classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    card = dict(card)
    sd, num_classes = _with_fc(model, head, classifier, card)
    norm = card["normalization"]
    pretrained_cfg = {"tag": "byol_zoo", "custom_load": False, "input_size": norm["input_size"],
                      "fixed_input_size": False, "interpolation": norm["interpolation"], "crop_pct": norm["crop_pct"],
                      "crop_mode": "center", "mean": norm["mean"], "std": norm["std"], "num_classes": num_classes,
                      "first_conv": "conv1" if classifier == "fc" else None, "classifier": classifier}
    if card.get("license"):
        pretrained_cfg["license"] = card["license"]
    config = {"architecture": timm_name, "num_classes": num_classes, "num_features": card["num_features"],
              "global_pool": "avg", "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
              "zoo": card}
    if model_args:
        config["model_args"] = model_args
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_safetensors(out / "model.safetensors", sd)]
    paths.append(atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n"))
    paths.append(atomic_write_text(out / "README.md", _readme(card, timm_name, num_classes, model_args)))
    return paths


def write_torchvision(out: Path, model: nn.Module, head: nn.Linear | None, card: dict[str, Any]) -> list[Path]:
    """Write ``out/model.pth`` (a torchvision ResNet state dict, ``fc`` included) + ``out/model_card.json``."""
    from zoo.files import atomic_path, atomic_write_text

    name = _torchvision_name(model.zoo_arch, model.zoo_arch_overrides)
    card = dict(card)
    sd, num_classes = _with_fc(model, head, "fc", card)
    card["torchvision"] = {"constructor": f"torchvision.models.{name}(num_classes={num_classes})",
                           "load": "model.load_state_dict(torch.load(path, weights_only=True), strict=True)"}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.pth") as tmp:
        torch.save({k: v.contiguous().clone() for k, v in sd.items()}, tmp)
    return [out / "model.pth", atomic_write_text(out / "model_card.json", json.dumps(card, indent=2) + "\n")]
