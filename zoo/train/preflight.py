"""Checks made before a run launches anything: the batch against the devices and the model's minimum, the input
batch against the device's memory, precision, and the data (a missing dataset folder), so a run that cannot work is
refused in one line (``UsageError``) before any process starts or any output folder exists."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from zoo.errors import UsageError


def available_memory(trainer: pl.Trainer) -> tuple[int, str] | None:
    """(bytes free, what) on the device the run will use: GPU memory, else the host's available RAM."""
    try:
        if type(trainer.accelerator).__name__ == "CUDAAccelerator":
            launcher = getattr(trainer.strategy, "launcher", None)
            if getattr(launcher, "_start_method", None) == "fork" and not torch.cuda.is_initialized():
                return None  # querying would initialise CUDA in the parent, which a fork-launched DDP cannot have
            free, _ = torch.cuda.mem_get_info(trainer.strategy.root_device)
            return int(free), f"free memory of {trainer.strategy.root_device}"
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "available RAM"
    except Exception:  # no way to tell (another OS, no driver): do not refuse on a guess
        return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def check_datamodule(datamodule: Any) -> None:
    """Run the datamodule's ``check_data()`` when it has one: a bad dataset path, corpus or tokenizer is refused in
    one line before any output folder (logs/, tb/) exists."""
    check_data = getattr(datamodule, "check_data", None)
    if callable(check_data):
        check_data()


def preflight_check(trainer: pl.Trainer, model: pl.LightningModule | None, datamodule: Any = None) -> None:
    """Refuse a run that cannot work, before any process is launched or any data is read (``UsageError``, one line
    naming the key): gradient accumulation, precision, the per-device batch against the model's minimum
    (``min_batch_per_device``, e.g. 2 for batch norm) and the number of devices, and an input batch larger than the
    memory of the device (``model.input_bytes``); and the data, through the datamodule's ``check_data()`` when it has
    one (a missing dataset folder), so nothing is created for a run that cannot read its data."""
    from zoo.train.cluster import check_scheduler

    if trainer.accumulate_grad_batches < 1:
        raise UsageError(f"trainer.accumulate_grad_batches must be >= 1, got {trainer.accumulate_grad_batches}")
    check_scheduler(trainer)  # SLURM_NTASKS=4 with --trainer.devices 2: one line, before a launcher hangs
    check_datamodule(datamodule)
    if model is None:
        return
    if str(trainer.precision).startswith("64") and not getattr(model, "supports_float64", True):
        raise UsageError(f"trainer.precision={trainer.precision} is not supported by {type(model).__name__} (its "
                         "inputs are float32); use 32-true, or bf16-mixed on GPU")
    batch = getattr(datamodule, "batch_size", None)
    if batch is None:
        return
    devices = trainer.num_devices * trainer.num_nodes
    need = int(getattr(model, "min_batch_per_device", 1))
    if batch < need:
        raise UsageError(
            f"data.batch_size={batch} is the batch of each device, and {type(model).__name__} needs at least {need} "
            f"images per device; with {devices} device(s) the global batch must be at least {need * devices}. "
            f"Set data.batch_size >= {need} (the global batch is data.batch_size x devices).")
    if hasattr(model, "input_bytes"):
        need_bytes, what = model.input_bytes(batch)
        have = available_memory(trainer)
        if have is not None and need_bytes > have[0]:
            raise UsageError(f"one batch does not fit in memory: {_size(need_bytes)} ({what}) but the {have[1]} is "
                             f"{_size(have[0])}; lower model.image_size or data.batch_size")


def _trainer_keys() -> list[str]:
    import inspect

    return [k for k in inspect.signature(pl.Trainer.__init__).parameters if k not in ("self", "args", "kwargs")]


# Lightning messages that name no Trainer argument: the key they are about, by a word they contain
_KEY_BY_WORD = (("torch_xla", "accelerator"), ("backend", "accelerator"), ("Accelerator", "accelerator"),
                ("DeepSpeed", "strategy"), ("Strategy", "strategy"), ("precision", "precision"))


def lightning_usage_error(exc: BaseException) -> UsageError | None:
    """Lightning's refusal of a Trainer setting (``MisconfigurationException``, its ``ValueError``s, a missing
    optional package) as one ``UsageError`` line naming the ``trainer.<key>``; None for anything else."""
    import re

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(exc, UsageError) or not isinstance(exc, (MisconfigurationException, ValueError, ImportError)):
        return None
    text = " ".join(str(exc).split())
    restored = re.search(r"restored a checkpoint with current_epoch=(\d+), but you have set Trainer\(max_epochs=(-?\d+)\)",
                         text)
    if restored:
        return UsageError(f"trainer.max_epochs={restored.group(2)} is below the epoch the checkpoint was saved in "
                          f"({restored.group(1)}); resume with --trainer.max_epochs {restored.group(1)} or more, or "
                          "start a new run in another --trainer.default_root_dir")
    hits = [(m.start(), key) for key in _trainer_keys() for m in [re.search(rf"\b{key}\b", text)] if m]
    key = min(hits)[1] if hits else next((k for word, k in _KEY_BY_WORD if word in text), None)
    if key is None:
        return None
    hint = ""
    if key == "strategy" and re.search(r"\bfsdp\b", text, re.IGNORECASE):
        hint = " (language models shard with --trainer.strategy fsdp2, which also runs on CPU)"
    return UsageError(f"trainer.{key}: {text}{hint}")
