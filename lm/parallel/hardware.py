"""Device throughput: the datasheet peak FLOP/s of accelerators and model FLOPs utilisation (MFU)."""
from __future__ import annotations

import torch

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
