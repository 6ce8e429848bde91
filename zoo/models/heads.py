"""The MLP head builder of the image methods: projectors and predictors differ only in these numbers.

    BYOL projector / predictor  mlp_head(d, 4096, 256)                                   (Grill et al. 2020, 3.3)
    SimSiam projector           mlp_head(d, 2048, 2048, layers=3, hidden_bias=False, last_bn=True,
                                         last_bn_affine=False)                            (Chen & He 2021, 4.1)
    SimSiam predictor           mlp_head(2048, 512, 2048, hidden_bias=False, last_bias=True)
    Barlow Twins projector      mlp_head(d, 8192, 8192, layers=3, hidden_bias=False)     (Zbontar et al. 2021, 4)
"""
from __future__ import annotations

from torch import nn

__all__ = ["mlp_head"]


def mlp_head(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, layers: int = 2, hidden_bias: bool = True,
             last_bias: bool = False, last_bn: bool = False, last_bn_affine: bool = True) -> nn.Sequential:
    """``layers`` linear layers; each hidden one is followed by BN and ReLU; the last optionally by BN.

    Defaults are BYOL's (Linear with bias -> BN -> ReLU -> Linear without bias: its output is L2-normalised for the
    loss, App. J). ``hidden_bias=False`` where the BN right after a layer would cancel its bias anyway.
    """
    if layers < 1:
        raise ValueError(f"an MLP head needs at least 1 layer, got {layers}")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=hidden_bias), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=last_bias))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*mods)
