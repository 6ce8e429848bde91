"""BYOL's projector / predictor MLP."""
from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """Linear(in -> hidden, bias) -> BN -> ReLU -> Linear(hidden -> out, no bias): projector and predictor alike.

    The last layer has no bias because the output is L2-normalised for the loss (Grill et al. 2020, App. J).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )
