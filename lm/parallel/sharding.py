"""Sharded LM training on PyTorch FSDP2 (``fully_shard`` over DTensor) through Lightning's ``ModelParallelStrategy``.

Why FSDP2 and not Lightning's ``FSDPStrategy``: that strategy wraps the model in FSDP1, which the installed PyTorch
refuses without an accelerator ("FSDP needs a non-CPU accelerator device"), so it cannot be tested on CPU; FSDP2
shards each parameter as a DTensor and runs on CPU over gloo as on GPU over NCCL. ``FSDP2Strategy`` is
``ModelParallelStrategy`` with every device in one data-parallel (sharding) dimension and no tensor parallelism,
registered as ``--trainer.strategy fsdp2``.

The model is built on the meta device (no memory), each Transformer block becomes one FSDP unit (its parameters
gathered just before its forward and freed after), the root unit holds the embedding, final norm and head, and only
then are the local shards allocated and initialised (``materialize``): no rank ever holds the whole model. Buffers
(a router's hash table or balance bias, batch-norm statistics) are refilled by their module's ``reset_parameters``,
so they are the same on every rank as in a normal build. A multimodal model's vision encoder is one more FSDP unit,
built whole first (it is small; its builder's own init and any pretrained weights survive) and then sharded.

Checkpoints are torch distributed checkpoints (a folder ``last.ckpt/`` with one file per rank plus Lightning's
``meta.pt``), written to a temporary folder and renamed, so a kill mid-write keeps the previous one.
``consolidate`` turns such a folder into the one-file checkpoint ``zoo.load_lm`` and ``zoo export-hf`` read.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from zoo.weights.safe_dcp import (META_FILE, METADATA_FILE, is_sharded_checkpoint, load_dcp_into,
                                   read_sharded_checkpoint)

STRATEGY_NAME = "fsdp2"


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
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except BaseException as e:  # DCP's CheckpointException (a BaseException) reaches every rank
            from zoo.train.checkpointing import failed_sharded_save

            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise failed_sharded_save(e, tmp, path, self.global_rank == 0) from e
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

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, except that a sharded folder is read through ``zoo.weights.safe_dcp`` (no pickle
        runs) and a one-file checkpoint always with ``weights_only=True``."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=True)
        assert self.lightning_module is not None
        return load_sharded(path, self.model, self.optimizers, strict=self.lightning_module.strict_loading)


def load_sharded(path: Path, module: nn.Module, optimizers: list[Any], strict: bool = True) -> dict[str, Any]:
    """Load a sharded checkpoint folder into ``module`` (FSDP2, DTensor parameters) and ``optimizers`` in place, as
    Lightning's ``ModelParallelStrategy`` does but through the safe reader; returns the rest (``meta.pt``)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    from zoo.weights.safe_dcp import check_dcp_folder
    from zoo.weights.safe_load import safe_torch_load

    check_dcp_folder(path)  # refuse a hostile or truncated folder before touching the model's weights
    meta = safe_torch_load(path / META_FILE, map_location="cpu")
    module_state = {"state_dict": get_model_state_dict(module)}
    load_dcp_into(module_state, path)
    module.load_state_dict(module_state["state_dict"], strict=strict)
    for i, optimizer in enumerate(optimizers):
        key = f"optimizer_{i}"
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        load_dcp_into(optimizer_state, path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return meta


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


def transformer_of(model: nn.Module) -> nn.Module:
    """The zoo Transformer inside ``model``: the model itself, or a multimodal decoder's ``.decoder``."""
    if hasattr(model, "layers"):
        return model
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "layers"):
        return decoder
    raise TypeError(f"{type(model).__name__} has no .layers (nor a .decoder with them): sharding expects a zoo "
                    "Transformer or multimodal decoder")


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks: the unit of FSDP wrapping and of activation checkpointing."""
    return list(transformer_of(model).layers)


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
    """``fully_shard`` each block, a multimodal model's vision encoder, then the root (embedding, final norm, head,
    projector) over ``mesh``; returns ``model``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    policy = mixed_precision_policy(mesh.device_type, mixed_precision)
    blocks = block_modules(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keeping them gathered saves one all-gather.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        # One unit, sharded like the blocks rather than replicated: FSDP then reduces its gradients whether it is
        # frozen, partly or fully trained (a replica would need its own all-reduce), for one small all-gather a step.
        fully_shard(encoder, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(encoder, "forward_features")  # the multimodal model calls it, not forward
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _meta_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if any(t is not None and t.is_meta for t in (*m._parameters.values(), *m._buffers.values()))]


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, rank: int) -> None:
    """Allocate the local shards of the meta-device parts of ``model`` on ``device`` and initialise them.

    Parameters get ``reset_parameters`` of their own module, then the Transformer's ``init_weights``; buffers get the
    values their module's ``reset_parameters`` gives them (torch's convention, as BatchNorm's statistics and the
    routers' tables), which are deterministic, so identical on every rank and equal to a normal build's. A buffer that
    no initialiser fills is refused instead of being left as ``to_empty``'s garbage. Parts that are not on meta (a
    multimodal model's encoder, built whole) keep their values.

    DTensor's random ops only give each rank its part of one global draw on CUDA. On CPU every rank would draw the
    same numbers for its own shard (identical rows across ranks), so there each rank draws from its own stream
    (seed offset by rank): the same distribution, not the single-process numbers.
    """
    modules = _meta_modules(model)
    for m in modules:
        m.to_empty(device=device, recurse=False)
        for buf in m._buffers.values():
            if buf is not None:
                buf.fill_(_sentinel(buf))
    with torch.random.fork_rng(devices=[]):
        if torch.device(device).type == "cpu":
            torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        for sub in modules:
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()  # parts init_weights leaves to their own module (a router), and buffers
        transformer_of(model).init_weights()
    for m in modules:
        for name, buf in m._buffers.items():
            if buf is not None and _unfilled(buf):
                owner = next(n for n, sub in model.named_modules() if sub is m)
                raise ValueError(f"buffer {owner + '.' + name if owner else name!r} ({type(m).__name__}) has no "
                                 "initialiser for a sharded build: give the module a reset_parameters() that fills "
                                 "it, or train without --trainer.strategy fsdp2")


def _sentinel(t: torch.Tensor) -> float | int | bool:
    # A value no initialiser writes everywhere: NaN for floats, the largest integer otherwise (bool: unchecked).
    if t.is_floating_point():
        return float("nan")
    return False if t.dtype == torch.bool else torch.iinfo(t.dtype).max


def _unfilled(t: torch.Tensor) -> bool:
    if t.numel() == 0 or t.dtype == torch.bool:
        return False
    return bool(torch.isnan(t).all()) if t.is_floating_point() else bool((t == _sentinel(t)).all())


@torch.no_grad()
def copy_whole(target: nn.Module, source: nn.Module, device: torch.device | str, mesh: Any) -> None:
    """Give the meta-built ``target`` the parameters and buffers of the whole-built ``source`` (same architecture),
    on ``device`` and identical on every rank of ``mesh`` (rank 0's values), ready to be sharded."""
    import torch.distributed as dist

    target.to_empty(device=device)
    theirs = dict(source.named_parameters()) | dict(source.named_buffers())
    group = mesh.get_group()
    for name, t in (*target.named_parameters(), *target.named_buffers()):
        if name not in theirs or theirs[name].shape != t.shape:
            raise ValueError(f"the whole-built {type(source).__name__} has no tensor {name!r} of shape "
                             f"{tuple(t.shape)}; build it with the architecture and overrides of the model's")
        t.copy_(theirs[name])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            # Same values on every rank, whatever each rank's random state was when it built ``source``.
            dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)


def build_sharded(name: str, overrides: dict[str, Any], mesh: Any, activation_checkpointing: bool = False,
                  mixed_precision: bool | None = None, whole: dict[str, nn.Module] | None = None,
                  layer_sync: Any = None) -> nn.Module:
    """A zoo Transformer (or multimodal decoder) built on meta, wrapped per block with FSDP2 over ``mesh``, then
    materialised sharded. ``whole`` maps submodule names (e.g. ``encoder``) to small whole-built modules whose
    values they take instead of a fresh init (their builder's own init, loaded weights); ``layer_sync`` (Lightning's
    sync-batchnorm plugin) swaps batch norm for its all-rank version first."""
    import zoo

    if mesh.ndim > 1:
        # ModelParallelStrategy's mesh is (data_parallel, tensor_parallel); fully_shard over a 2-D mesh would be
        # HSDP (replicate over the first dimension), so shard over the data-parallel dimension alone.
        mesh = mesh["data_parallel"]
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    model = zoo.create(name, device="meta", **overrides)
    if layer_sync is not None:
        model = layer_sync.apply(model)
    for part, source in (whole or {}).items():
        copy_whole(model.get_submodule(part), source, device, mesh)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    shard_transformer(model, mesh, mixed_precision)
    materialize(model, device, mesh.get_rank())
    return model


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoint -> one file
# ----------------------------------------------------------------------------------------------------------------
def consolidate(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Gather a sharded checkpoint folder into one ``torch.save`` file (weights, optimizer state, loop state,
    checkpoint contract) that ``zoo.load_lm``, ``zoo export-hf`` and a single-device resume read. Returns ``out``.

    The folder is read through the safe reader (``zoo.weights.safe_dcp``); ``out`` may not be a folder nor lie
    inside the input folder, so the shards are never overwritten."""
    from zoo.files import atomic_path

    folder, out = Path(folder), Path(out)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{os.fspath(folder)!r} is not a sharded checkpoint folder (no {META_FILE} and "
                         f"{METADATA_FILE} inside); pass the last.ckpt folder a `--trainer.strategy fsdp2` run wrote")
    inside = folder.resolve()
    if out.resolve() == inside or inside in out.resolve().parents:
        raise ValueError(f"--out {os.fspath(out)!r} is inside the input folder {os.fspath(folder)!r}; write the "
                         "file elsewhere (e.g. next to the folder) so the shards are never overwritten")
    if out.is_dir():
        raise ValueError(f"--out {os.fspath(out)!r} is an existing folder; pass a file name (e.g. "
                         f"{os.fspath(out / 'consolidated.ckpt')!r})")
    checkpoint = read_sharded_checkpoint(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp_out, open(tmp_out, "wb") as f:
        torch.save(checkpoint, f)
    return out
