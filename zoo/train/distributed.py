"""Cross-rank reductions a method's loss may need, differentiable, and the identity on one process.

``all_gather_grad(x)``: every rank's ``x`` concatenated along dim 0 in rank order; the backward sums the incoming
gradients of all ranks and returns this rank's slice. Under DDP (which averages parameter gradients over the W
ranks) this gives exactly the gradient of the single-process loss over the concatenated batch: every rank computes
the same loss L of the gathered tensor, each rank's slice receives sum_r dL/dx_slice = W dL/dx_slice, and DDP's mean
divides the W back out.

``all_reduce_sum(x)``: the sum over ranks, with the gradient of a sum (the incoming gradients summed again).

``gather_sizes(n)`` / ``all_gather_rows(x, sizes)``: every rank's row count, and rows of different counts per rank
concatenated in rank order (no gradient: for tensors that have none, such as a frozen encoder's features).

``rows_of(sizes, rank)``: this rank's ``(offset, total)`` in the global batch, the ``rows`` an ``augment`` view takes
to draw the random parameters one process would draw for those images: with the generator seeded alike on every
rank, N ranks augment the global batch exactly as one device does (``takes_rows`` says whether a callable can).

All are no-ops (the input itself, ``[n]``) when ``torch.distributed`` is not initialised or has one process, so a
method calls them unconditionally.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_grad", "all_reduce_sum", "world_size", "gather_sizes", "all_gather_rows", "takes_rows",
           "rows_of"]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: all-reduce (sum) the gathered gradient, keep this rank's slice. An all-reduce
    rather than torch's reduce-scatter / all-to-all, which gloo (CPU) does not offer in every build."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # reduced in place: never in the incoming buffer, which may be shared
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def world_size() -> int:
    """Processes in the default group (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 (rank order), differentiable; ``x`` itself on one process.

    Every rank must pass the same shape (the training loader drops the last partial batch, so they do)."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks, differentiable; ``x`` itself on one process."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x.contiguous(), op=dist.ReduceOp.SUM)


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` in rank order (``[n]`` on one process); ``device``: where the collective runs (the
    backend's: a GPU for NCCL)."""
    if world_size() == 1:
        return [int(n)]
    parts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(parts, torch.tensor([int(n)], dtype=torch.long, device=device))
    return [int(t) for t in parts]


def all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``x`` (``sizes[r]`` rows on rank ``r``, from ``gather_sizes``) concatenated along dim 0 in rank
    order, without gradient; ``x`` itself on one process. Ranks may hold different counts, zero included."""
    most = max(sizes)
    if len(sizes) == 1 or world_size() == 1 or most == 0:
        return x
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def rows_of(sizes: list[int], rank: int) -> tuple[int, int] | None:
    """``(offset, total)`` of rank ``rank``'s images in the global batch of ``sizes``; None on one process."""
    return (sum(sizes[:rank]), sum(sizes)) if len(sizes) > 1 else None


def takes_rows(fn: Any) -> bool:
    """Whether ``fn(..., rows=...)`` is accepted (the ``augment`` views and the zoo's prepares are; a user's
    override may not be, and then keeps a generator seeded per rank)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rows" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
