"""Batch norm over every process's batch under DDP: torch's SyncBatchNorm with NCCL, ``GlobalBatchNorm`` with gloo."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

__all__ = ["GlobalBatchNorm", "ZooSyncBatchNorm"]


class _TracedAllReduceSum(torch.autograd.Function):
    """A differentiable sum over ranks in functional collectives, which ``torch.compile`` traces into its graph
    (``torch.distributed.nn.functional.all_reduce`` refuses to run under it); the gradient is summed the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol, group

        return funcol.all_reduce(x, "sum", group.WORLD)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol, group

        return funcol.all_reduce(grad.contiguous(), "sum", group.WORLD)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the batch of every process, for CPU (gloo) DDP, where ``torch.nn.SyncBatchNorm`` refuses to run.

    Two differentiable all-reduces (sum and count, then the centred sum of squares), so the gradients are those of
    batch norm over the global batch. Outside a multi-process training forward it is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a [N, C, ...] input, got shape {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        if torch.compiler.is_compiling():  # model.compile: step traces the forward, collectives included
            all_reduce = _TracedAllReduceSum.apply
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float32)
        sums = all_reduce(torch.cat([x.float().sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x.float() - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n  # two passes: no E[x^2] - E[x]^2 cancellation
        y = (centred * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        return y


class ZooSyncBatchNorm(TorchSyncBatchNorm):
    """``sync_batchnorm=True`` for every backend: torch's SyncBatchNorm with NCCL, ``GlobalBatchNorm`` with gloo."""

    def apply(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            return self._swap(model, nn.modules.batchnorm._BatchNorm, GlobalBatchNorm)
        return super().apply(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return super().revert(self._swap(model, GlobalBatchNorm, None))

    def _swap(self, module: nn.Module, find: type, make: type | None) -> nn.Module:
        out = module
        if isinstance(module, find) and not isinstance(module, nn.SyncBatchNorm) and type(module) is not make:
            cls = make or module._zoo_original  # revert to the class the layer had
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            # the very same Parameter and buffer objects: requires_grad (frozen target) and identity are kept
            for name, value in list(module._parameters.items()) + list(module._buffers.items()):
                setattr(out, name, value)
            out.train(module.training)
            if make is not None:
                out._zoo_original = type(module)
        for name, child in module.named_children():
            out.add_module(name, self._swap(child, find, make))
        return out
