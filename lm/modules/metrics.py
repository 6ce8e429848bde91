"""Pure metrics for language-model training: bits per byte (FLOP counts and MFU: lm/parallel/)."""
from __future__ import annotations

import math

import torch


def bits_per_byte(nats_per_token: float | torch.Tensor, bytes_per_token: float) -> float | torch.Tensor:
    """Convert a mean next-token loss in nats into bits per UTF-8 byte of text."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return nats_per_token / (math.log(2) * bytes_per_token)
