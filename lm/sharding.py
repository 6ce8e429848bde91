"""Sharded LM training on PyTorch FSDP2 (``fully_shard`` over DTensor) through Lightning's ``ModelParallelStrategy``.

Why FSDP2 and not Lightning's ``FSDPStrategy``: that strategy wraps the model in FSDP1, which the installed PyTorch
refuses without an accelerator ("FSDP needs a non-CPU accelerator device"), so it cannot be tested on CPU; FSDP2
shards each parameter as a DTensor and runs on CPU over gloo as on GPU over NCCL. ``FSDP2Strategy`` is
``ModelParallelStrategy`` with every device in one data-parallel (sharding) dimension and no tensor parallelism,
registered as ``--trainer.strategy fsdp2``.

The model is built on the meta device (no memory), each Transformer block becomes one FSDP unit (its parameters
gathered just before its forward and freed after), the root unit holds the embedding, final norm and head, and only
then are the local shards allocated and initialised (``materialize``): no rank ever holds the whole model.

Checkpoints are torch distributed checkpoints (a folder ``last.ckpt/`` with one file per rank plus Lightning's
``meta.pt``), written to a temporary folder and renamed, so a kill mid-write keeps the previous one.
``consolidate`` turns such a folder into the one-file checkpoint ``zoo.load_lm`` and ``zoo export-hf`` read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

STRATEGY_NAME = "fsdp2"
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: all devices of all nodes shard one data-parallel
    dimension; sharded checkpoints are written atomically and refused when a weight is NaN/Inf."""

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        """Set the mesh to (world size x 1) before the parent builds it ("auto" would make it nodes x devices)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write the checkpoint next to ``filepath`` and rename it into place once every rank has written."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        bad = torch.tensor([_first_nonfinite_shard(checkpoint.get("state_dict", {})) is not None], dtype=torch.int32,
                           device=self.root_device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)  # a NaN on any rank's shard refuses the write on every rank
        if int(bad.item()):
            raise FloatingPointError(f"refusing to write checkpoint {os.fspath(path)!r}: a weight shard is NaN/Inf "
                                     f"(step {checkpoint.get('global_step')}); the previous checkpoint is kept. "
                                     "Lower the learning rate or resume from the kept checkpoint.")
        token = self.broadcast(uuid.uuid4().hex[:12] if self.global_rank == 0 else None)
        tmp = path.parent / f".{path.name}.{token}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            old = path.parent / f".{path.name}.{token}.old"
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier()


def _first_nonfinite_shard(state_dict: dict[str, Any]) -> str | None:
    # Each rank checks only its own shards (DTensor.to_local): no gathering of the full weights.
    for name, t in state_dict.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy,
                              description="FSDP2 (fully_shard) over all devices, sharded checkpoints")


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks: the unit of FSDP wrapping and of activation checkpointing."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .layers: sharding expects a zoo Transformer")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (parameter names unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in block_modules(model):
        checkpoint(block)


def mixed_precision_policy(device_type: str, mixed_precision: bool | None) -> Any:
    """bf16 parameters and compute with fp32 gradient reduction on GPU (``None``: on when the device is CUDA)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    on = device_type == "cuda" if mixed_precision is None else mixed_precision
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on else MixedPrecisionPolicy()


def shard_transformer(model: nn.Module, mesh: Any, mixed_precision: bool | None = None) -> nn.Module:
    """``fully_shard`` each block, then the root (embedding, final norm, head) over ``mesh``; returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(mesh.device_type, mixed_precision)
    blocks = block_modules(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keeping them gathered saves one all-gather.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, rank: int) -> None:
    """Allocate the local shards of a meta-device model on ``device`` and initialise them as ``model.init_weights``.

    DTensor's random ops only give each rank its part of one global draw on CUDA. On CPU every rank would draw the
    same numbers for its own shard (identical rows across ranks), so there each rank draws from its own stream
    (seed offset by rank): the same distribution, not the single-process numbers.
    """
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        if torch.device(device).type == "cpu":
            torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        for sub in model.modules():
            if sub is not model and callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()  # parts init_weights leaves to their own module (e.g. a router)
        model.init_weights()


def build_sharded(name: str, overrides: dict[str, Any], mesh: Any, activation_checkpointing: bool = False,
                  mixed_precision: bool | None = None) -> nn.Module:
    """A zoo Transformer built on meta, wrapped per block with FSDP2 over ``mesh``, then materialised sharded."""
    import zoo

    if mesh.ndim > 1:
        # ModelParallelStrategy's mesh is (data_parallel, tensor_parallel); fully_shard over a 2-D mesh would be
        # HSDP (replicate over the first dimension), so shard over the data-parallel dimension alone.
        mesh = mesh["data_parallel"]
    model = zoo.create(name, device="meta", **overrides)
    if getattr(model.config, "ffn", "dense") == "routed":
        # Routed FFNs hold buffers (hash tables, balance biases) that a meta build leaves without values.
        raise ValueError(f"model {name!r} has a routed FFN, which sharded training does not support yet; "
                         "train it with the default strategy (DDP)")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    shard_transformer(model, mesh, mixed_precision)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    materialize(model, device, mesh.get_rank())
    return model


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoint -> one file
# ----------------------------------------------------------------------------------------------------------------
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by a sharded (FSDP2) run: DCP shards plus Lightning's meta.pt."""
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file() and (p / ".metadata").is_file()


def consolidate(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Gather a sharded checkpoint folder into one ``torch.save`` file (weights, optimizer state, loop state,
    checkpoint contract) that ``zoo.load_lm``, ``zoo export-hf`` and a single-device resume read. Returns ``out``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from zoo.files import atomic_path
    from zoo.weights.safe_load import safe_torch_load

    folder, out = Path(folder), Path(out)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{os.fspath(folder)!r} is not a sharded checkpoint folder (no {META_FILE} and .metadata "
                         "inside); pass the last.ckpt folder a `--trainer.strategy fsdp2` run wrote")
    if out.resolve() == folder.resolve():
        raise ValueError(f"--out {os.fspath(out)!r} is the input folder; pass another file name")
    checkpoint = safe_torch_load(folder / META_FILE, map_location="cpu")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        tensors_file = Path(tmp) / "tensors.pt"
        dcp_to_torch_save(folder, tensors_file)
        tensors = torch.load(tensors_file, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = tensors.pop("state_dict")
    # Lightning stores optimizers as optimizer_0, optimizer_1, ... in the folder and as a list in one file.
    n_opt = sum(1 for k in tensors if k.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [tensors.pop(f"optimizer_{i}") for i in range(n_opt)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp_out, open(tmp_out, "wb") as f:
        torch.save(checkpoint, f)
    return out


def consolidate_main(argv: list[str] | None = None) -> int:
    """``zoo consolidate <folder> --out <file.ckpt>``: parsed by ``lm.cli.consolidate_main``, then ``consolidate``."""
    from lm.cli import consolidate_main as front

    return front(argv)

