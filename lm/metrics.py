"""Pure metrics for language-model training: bits per byte, FLOPs per token, device peak FLOP/s, MFU."""
from __future__ import annotations

import math

import torch
from torch import nn

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity). Matched by substring of the CUDA device
# name, most specific first. CPUs have no entry: MFU is skipped there unless the user states a peak.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def bits_per_byte(nats_per_token: float | torch.Tensor, bytes_per_token: float) -> float | torch.Tensor:
    """Convert a mean next-token loss in nats into bits per UTF-8 byte of text."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return nats_per_token / (math.log(2) * bytes_per_token)


def matmul_params(model: nn.Module, vocab_size: int | None = None) -> int:
    """Parameters used in a matmul per token: Linear weights, inactive routed experts excluded, tied head included."""
    from zoo.models.routing import RoutedFFN

    inactive: set[int] = set()
    for m in model.modules():
        if isinstance(m, RoutedFFN):
            # One expert per token: all but one expert's weights do no work for a given token.
            for expert in list(m.experts)[1:]:
                inactive.update(id(p) for p in expert.parameters())
    seen: set[int] = set()
    n, head_found = 0, False
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            if id(w) in seen or id(w) in inactive:
                continue
            seen.add(id(w))
            n += w.numel()
            if vocab_size is not None and w.shape[0] == vocab_size:
                head_found = True
    if vocab_size is not None and not head_found:
        # Tied embedding: the output projection reuses the embedding matrix, which is still a V x D matmul.
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size:
                n += m.weight.numel()
                break
    return n


def flops_per_token(n_matmul_params: int, attention_flops: float) -> float:
    """Training FLOPs per token: 6 N (forward + backward of every matmul weight) plus the attention term."""
    return 6.0 * n_matmul_params + attention_flops


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from the datasheet table, or None (CPU, unknown card)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def mfu(flops_per_tok: float, tokens_per_s: float, peak: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None when the peak is unknown)."""
    if peak is None or peak <= 0:
        return None
    return flops_per_tok * tokens_per_s / (peak * n_devices)
