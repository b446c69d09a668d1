"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), §4.2.

Depth 6n + 2: a 3x3 stem of 16 channels, three stages of n basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 halves the resolution), global average pooling and
one linear layer. ResNet-20/32/44/56/110 have n = 3/5/7/9/18.

Shortcuts: option "A" (the paper's CIFAR setting, and the one its parameter counts refer to) is
parameter-free: where the shape changes, the identity is subsampled by 2 and the new channels are
zeros. Option "B" uses a 1x1 convolution + BatchNorm projection there instead (a little more
accurate, 1 % more parameters for ResNet-20: 272 474 vs 269 722); identities elsewhere in both
cases.
"""

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import he_init_

__all__ = ["CifarResNet", "cifar_resnet", "CIFAR_RESNET_DEPTHS"]

#: the depths named in the paper's Table 6 (1202 is the over-deep one of §4.2)
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)


class _PadShortcut(nn.Module):
    """Option A: subsample spatially by ``stride`` and append ``extra`` zero channels."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride = stride
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Zero-padding the channel dim keeps the input's memory format (channels_last stays so).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2. Input [B, 3, H, W] (32x32 in the paper);
    output [B, num_classes]."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A",
                 width: int = 16, zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, "
                             f"...), got {depth}")
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding identity, as in the paper) or "
                             f"'B' (1x1 projection), got {shortcut!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: List[nn.Module] = []
        in_planes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(in_planes, num_classes)

        he_init_(self)
        if zero_init_residual:
            # Each block starts as the identity (Goyal et al. 2017);
            # off by default, as in the paper.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def cifar_resnet(depth: int, num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(depth=depth, num_classes=num_classes, **kwargs)
