"""Image encoders: ResNet v1 (BYOL's, incl. wide x2/x4 and the CIFAR stem), a tiny CPU encoder, any timm model.

Every encoder maps images [B, 3, H, W] to features [B, num_features] (no classifier). ResNets keep torchvision's
parameter names (``conv1``, ``layer1.0.conv1``, ``downsample.0`` ...) so torchvision state dicts load as they are.

Beside the pooled vector, every encoder has timm's feature API: ``forward_features(x)`` is the trunk's output before
pooling (a feature map [B, C, H', W'] for CNNs, tokens [B, N, C] for vision transformers, as timm returns them) and
``forward_head(features, pre_logits=True)`` pools it, so ``forward_head(forward_features(x))`` equals ``forward(x)``.
``feature_tokens(encoder, x)`` gives any encoder's grid as tokens [B, N, C] (row-major over H' x W'), the form a
language model consumes as image tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from zoo.models.builders import UnknownModelError, register

# (block, layers) per depth: He et al. 2016 Table 1; ResNet-200 as in BYOL (Table 6, from He et al. 2016b).
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet v1 trunk (stride on the 3x3 conv, as torchvision and BYOL) returning pooled features.

    Args:
        depth: 18, 34, 50, 101, 152 or 200.
        width: channel multiplier applied to every layer, stem included (BYOL's "ResNet-50 (2x)" is width=2);
            unlike torchvision's wide_resnet50_2, which widens only the bottleneck's inner 3x3.
        cifar_stem: 3x3 stride-1 stem without max-pool, for 32x32 inputs.
        in_chans: input channels.
        zero_init_residual: zero the last BN scale of each block (off in BYOL; some recipes turn it on).
    """

    def __init__(self, depth: int = 50, width: int = 1, cifar_stem: bool = False, in_chans: int = 3,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(RESNET_DEPTHS)}")
        if width < 1:
            raise ValueError(f"ResNet width multiplier must be >= 1, got {width}")
        block, layers = RESNET_DEPTHS[depth]
        self.depth, self.width, self.cifar_stem = depth, width, cifar_stem
        self.inplanes = 64 * width
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64 * width, layers[0], 1)
        self.layer2 = self._make_layer(block, 128 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 256 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 512 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * width * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (Bottleneck, BasicBlock)) and last is not None:
                    nn.init.zeros_(last.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map [B, num_features, H/32, W/32] (H/8 with the CIFAR stem) before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Global average pool of a feature map: [B, num_features] (no classifier, so pre_logits changes nothing)."""
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, num_features]."""
        return self.forward_head(self.forward_features(x))


class ConvNetTiny(nn.Module):
    """A small, fast CNN encoder for CPU demos and tests (about 0.3M parameters at the default widths).

    Args:
        widths: output channels of the four 3x3 conv stages; stages 2-4 halve the resolution.
        in_chans: input channels.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            prev = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map [B, num_features, H/8, W/8] before pooling."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Global average pool of a feature map: [B, num_features]."""
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, num_features]."""
        return self.forward_head(self.forward_features(x))


def timm_encoder(model_name: str, **kwargs) -> nn.Module:
    """Any timm model as a feature encoder (``num_classes=0``); never downloads weights."""
    import timm

    if kwargs.pop("pretrained", False):
        raise ValueError("timm encoders are built without downloading weights; load a local file with "
                         "zoo.load_backbone(path, arch='timm:<name>') instead of pretrained=True")
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError("Unknown model ...")
        raise UnknownModelError(f"timm has no model {model_name!r}; list them with timm.list_models()") from err


def feature_tokens(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Any zoo vision encoder's unpooled features as tokens [B, N, C]: a map's H' x W' cells row-major, or the
    token sequence a vision transformer returns (its class/register tokens first, as timm orders them)."""
    if not hasattr(encoder, "forward_features"):
        raise TypeError(f"{type(encoder).__name__} has no forward_features; build it with zoo.create(<vision name>)")
    feats = encoder.forward_features(x)
    if feats.dim() == 4:
        if getattr(encoder, "output_fmt", "NCHW") == "NHWC":  # timm families whose maps are channels-last (Swin)
            return feats.flatten(1, 2)
        return feats.flatten(2).transpose(1, 2)
    if feats.dim() == 3:
        return feats
    raise ValueError(f"{type(encoder).__name__}.forward_features returned shape {tuple(feats.shape)}; expected "
                     "[B, C, H, W] or [B, N, C]")


def _resnet_builder(depth: int, width: int = 1, cifar_stem: bool = False):
    def build(**overrides) -> ResNet:
        return ResNet(**{"depth": depth, "width": width, "cifar_stem": cifar_stem, **overrides})

    return build


for _depth in RESNET_DEPTHS:
    register(f"resnet{_depth}", _resnet_builder(_depth))
# BYOL's wide encoders (Grill et al. 2020, Table 1b / Table 6).
register("resnet50x2", _resnet_builder(50, 2))
register("resnet50x4", _resnet_builder(50, 4))
register("resnet200x2", _resnet_builder(200, 2))
register("resnet18_cifar", _resnet_builder(18, cifar_stem=True))
register("resnet50_cifar", _resnet_builder(50, cifar_stem=True))
register("convnet_tiny", ConvNetTiny)
register("timm", timm_encoder)
