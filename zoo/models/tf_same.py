"""TF 'SAME' padding for torch convolutions and max-pools: Haiku / TensorFlow pad stride-2 layers asymmetrically
(the extra pixel after), PyTorch symmetrically. ``load_backbone(..., padding="tf_same")`` swaps the layers of any
encoder to reproduce weights trained that way (e.g. the official BYOL release) exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["tf_same_padding", "TFSameConv2d", "TFSameMaxPool2d", "apply_tf_same_padding"]


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding TF 'SAME' uses along one axis; the extra pixel goes after, unlike PyTorch."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_amounts(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
                 ) -> tuple[int, int, int, int]:
    top, bottom = tf_same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = tf_same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    return left, right, top, bottom


class TFSameConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing TF 'SAME' padding from the input size (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _pad_amounts(x, self.kernel_size, self.stride, self.dilation))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TFSameMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TF 'SAME' padding (padded cells never win: they are -inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, d = _pair(self.kernel_size), _pair(self.stride), _pair(self.dilation)
        x = F.pad(x, _pad_amounts(x, k, s, d), value=float("-inf"))
        return F.max_pool2d(x, k, s, 0, d, ceil_mode=False, return_indices=self.return_indices)


def apply_tf_same_padding(model: nn.Module) -> int:
    """Give every strided conv / max-pool TF 'SAME' padding in place; returns how many layers changed."""
    changed = 0
    for module in model.modules():
        # Swapping the class in place keeps parameters, hooks and state-dict keys exactly as they were.
        if type(module) is nn.Conv2d and max(module.stride) > 1:
            module.__class__ = TFSameConv2d
            changed += 1
        elif type(module) is nn.MaxPool2d and max(_pair(module.stride)) > 1:
            module.__class__ = TFSameMaxPool2d
            changed += 1
    return changed
