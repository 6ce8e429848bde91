"""``zoo probe``: the command line of the evaluator, on jsonargparse like ``zoo fit``.

``--config file.yaml`` (keys = ``ProbeConfig`` fields, e.g. ``configs/probe/*.yaml``), ``--print_config``, flags
named like the keys (``--batch_size 64``; the older dashed spellings ``--batch-size``, ``--lr``, ``--k``,
``--no-progress`` still work) and one-line errors naming the key. Torch is imported only after parsing, so
``zoo probe --help`` returns at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

from zoo.eval.probe_config import MODE_HELP, MODES, ProbeConfig
from zoo.files import display_path

# The embedded digits' preset, used when `--data digits` comes without `--config` (in a source checkout).
DIGITS_PRESET = Path(__file__).resolve().parents[2] / "configs" / "probe" / "digits_linear.yaml"
# Datasets of 32-pixel images are probed at their own size (no 224 upscaling) unless told otherwise.
SMALL_IMAGE_DATA = ("digits", "cifar10", "cifar100")
# Older dashed flags -> keys (the probe used plain argparse before).
LEGACY_FLAGS = {"--batch-size": "--batch_size", "--lr": "--lr_grid", "--k": "--knn_k", "--image-size": "--image_size",
                "--train-augment": "--train_augment", "--eval-crop": "--eval_crop", "--resize-kernel": "--resize_kernel",
                "--crop-sampler": "--crop_sampler", "--feature-norm": "--feature_norm", "--cache-dir": "--cache_dir",
                "--num-workers": "--num_workers", "--max-train": "--max_train", "--max-test": "--max_test"}
LIST_KEYS = ("--lr_grid", "--knn_k")
TOOL_KEYS = ("backbone", "data", "mode", "out", "which", "padding", "arch", "overwrite")


def build_parser() -> Any:
    """The ``zoo probe`` parser: the tool's own arguments plus every ``ProbeConfig`` field as a top-level key."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="zoo probe", description="Linear probe (fast or protocol) or kNN evaluation of a "
                       "backbone on an image dataset.", allow_abbrev=False, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML of probe settings (configs/probe/*.yaml); flags after it override it")
    p.add_argument("--backbone", type=str, required=True,
                   help="our .ckpt / export .safetensors / .pth / official .pkl / random:<arch>")
    p.add_argument("--data", type=str, required=True,
                   help="digits | cifar10:<dir> | cifar100:<dir> | imagefolder:<dir>")
    # choices without a type: jsonargparse shows a type given with choices as "<function <lambda> at 0x...>"
    p.add_argument("--mode", default="fast", choices=MODES, help=MODE_HELP)
    p.add_argument("--out", type=Optional[str], default=None,
                   help="folder for metrics.json / metrics.md; rerunning the same probe there resumes it")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out (drop its features, lr-grid points and metrics)")
    p.add_argument("--which", type=Optional[str], default=None,
                   help="encoder to probe, by the name the checkpoint declares (BYOL: online | target); "
                        "default: the first it declares, the trained encoder")
    p.add_argument("--padding", type=Optional[str], default=None, help="torch or tf_same (official checkpoints)")
    p.add_argument("--arch", type=Optional[str], default=None,
                   help="architecture for plain state dicts (e.g. resnet50, timm:<name>)")
    p.add_class_arguments(ProbeConfig, None, skip={"trainer"})
    return p


def translate_legacy(argv: list[str]) -> list[str]:
    """Rewrite the older dashed flags to keys: ``--lr 0.1 0.4`` -> ``--lr_grid [0.1,0.4]``, ``--no-progress``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        flag = LEGACY_FLAGS.get(flag, flag)
        if a == "--no-progress":
            out += ["--progress", "false"]
        elif flag in LIST_KEYS and not eq:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            out += [flag, values[0] if len(values) == 1 and values[0].startswith("[") else f"[{','.join(values)}]"]
        else:
            out.append(flag + eq + value if eq else flag)
        i += 1
    return out


def given(argv: list[str], key: str) -> bool:
    """Whether ``--key`` was given on the command line."""
    return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv)


def _value(argv: list[str], key: str) -> str | None:
    for i, a in enumerate(argv):
        if a == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return None


def parse(argv: list[str]) -> tuple[dict[str, Any], ProbeConfig, str]:
    """(tool arguments, ProbeConfig, the recipe used: a config file or the built-in defaults) from ``argv``."""
    argv = translate_legacy(list(argv))
    data = _value(argv, "data") or ""
    small = data.partition(":")[0] in SMALL_IMAGE_DATA
    has_config = given(argv, "config")
    if not has_config and data == "digits" and DIGITS_PRESET.exists():
        argv = ["--config", str(DIGITS_PRESET), *argv]  # the embedded demo's preset: the recipe `zoo fit` reports
        has_config = True
    elif not has_config and small:  # 32-pixel datasets: probe at their own size unless told otherwise
        size = _value(argv, "image_size") or "32"
        argv = ["--image_size", size, "--data_image_size", size, *([] if given(argv, "resize") else ["--resize", size]),
                *argv]
    ns = build_parser().parse_args(argv)
    values = ns.as_dict()
    values.pop("config", None)
    tool = {k: values.pop(k) for k in TOOL_KEYS}
    names = {f.name for f in dataclasses.fields(ProbeConfig)}
    cfg = ProbeConfig(**{k: v for k, v in values.items() if k in names})
    files = [c for c in (getattr(ns, "__path__", None), *(ns.get("config") or [])) if c]
    recipe = ", ".join(display_path(str(getattr(c, "relative", c))) for c in files) if files else "built-in defaults"
    return tool, cfg, recipe


def main(argv: list[str] | None = None) -> int:
    """Linear probe (fast or protocol) or kNN evaluation of any backbone on an image dataset.

    ``zoo probe --backbone SOURCE --data SPEC --mode fast|protocol|knn [--out DIR] [--config YAML] ...``.
    """
    from zoo.errors import explain_tool_error

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        tool, cfg, recipe = parse(argv)
    except argparse.ArgumentError as err:
        print(f"zoo probe: error: {explain_tool_error('probe', str(err), argv, _keys())}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:
        print(f"zoo probe: error: {err}", file=sys.stderr)
        return 2
    from zoo.eval.probe import print_summary, run_probe
    from zoo.files import check_folder_path

    try:  # an output or cache folder that is a file (or lies under one): refused before any model is loaded
        if tool["out"]:
            check_folder_path(tool["out"], "--out", "give the path of a folder to write")
        if cfg.cache_dir not in (None, "none", "", "default"):
            check_folder_path(cfg.cache_dir, "--cache_dir", "give a folder, or none to keep no cache")
        metrics = run_probe(tool["backbone"], tool["data"], tool["mode"], tool["out"], cfg, tool["which"],
                            tool["padding"], tool["arch"], overwrite=tool["overwrite"], recipe=recipe)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, KeyError) as err:
        print(f"zoo probe: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    from zoo.eval.distributed import is_main_process

    if is_main_process():  # the other ranks of a --devices N protocol run hold the same figures: one report
        print_summary(metrics)
        if tool["out"]:
            print(f"wrote {Path(tool['out']) / 'metrics.json'} and metrics.md")
    return 0


def _keys() -> list[str]:
    return [*TOOL_KEYS, "config", *(f.name for f in dataclasses.fields(ProbeConfig))]
