"""DenseNet-BC for CIFAR: Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017).

Three dense blocks of n = (depth - 4) / 6 bottleneck layers each (BN-ReLU-Conv1x1 to 4k channels,
BN-ReLU-Conv3x3 to k channels, concatenated to the layer's input), a 3x3 stem of 2k channels,
transitions BN-ReLU-Conv1x1 compressing the channels by θ = 0.5 followed by 2x2 average pooling,
and BN-ReLU-global average pooling-linear at the end. DenseNet-BC-100 has k = 12 (0.8 M
parameters), DenseNet-BC-190 has k = 40 (25.6 M).

``memory_efficient=True`` recomputes each layer's concatenation + bottleneck in the backward pass
(activation checkpointing) instead of storing it: the usual remedy for DenseNet's quadratic
activation memory (Pleiss et al. 2017), at the cost of ~15-20 % more compute.
"""

import contextlib
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from .init import he_init_

__all__ = ["DenseNetBC", "densenet_bc"]


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int, drop_rate: float,
                 memory_efficient: bool):
        super().__init__()
        inner = bottleneck_width * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        self._recomputing = False

    @contextlib.contextmanager
    def _recomputation(self):
        self._recomputing = True
        try:
            yield
        finally:
            self._recomputing = False

    def _bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, 1)
        bn = self.bn1
        if self._recomputing:
            # The backward pass's rerun of a checkpointed forward: the same batch statistics,
            # but the running ones (and num_batches_tracked) were updated once already, so it
            # updates copies. Otherwise memory_efficient would change the model's BatchNorm
            # statistics, not only its memory.
            x = F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                             bn.bias, True, 0.0, bn.eps)
        else:
            x = bn(x)
        return self.conv1(F.relu(x))

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and self.training and any(f.requires_grad for f in features):
            # (torch.compile takes no custom context_fn; its compiled backward recomputes from
            # the traced graph, which updates the statistics once, in the forward)
            context = {} if torch.compiler.is_compiling() else dict(
                context_fn=lambda: (contextlib.nullcontext(), self._recomputation()))
            out = cp.checkpoint(self._bottleneck, *features, use_reentrant=False, **context)
        else:
            out = self._bottleneck(*features)
        out = self.conv2(F.relu(self.bn2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bottleneck_width: int,
                 drop_rate: float, memory_efficient: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck_width, drop_rate,
                        memory_efficient)
            for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs. Input [B, 3, H, W]; output [B, num_classes]."""

    def __init__(self, depth: int = 100, growth_rate: int = 12, num_classes: int = 10,
                 compression: float = 0.5, bottleneck_width: int = 4, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (100, 190, ...), "
                             f"got {depth}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if growth_rate < 1 or num_classes < 1:
            raise ValueError(f"growth_rate and num_classes must be >= 1, got {growth_rate} and "
                             f"{num_classes}")
        n = (depth - 4) // 6
        channels = 2 * growth_rate
        self.conv0 = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
        stages: List[nn.Module] = []
        for i in range(3):
            stages.append(_DenseBlock(n, channels, growth_rate, bottleneck_width, drop_rate,
                                      memory_efficient))
            channels += n * growth_rate
            if i < 2:
                out = int(channels * compression)
                stages.append(_Transition(channels, out))
                channels = out
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

        he_init_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv0(x))
        x = F.relu(self.norm(x), inplace=True)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def densenet_bc(depth: int, growth_rate: int, num_classes: int = 10, **kwargs) -> DenseNetBC:
    return DenseNetBC(depth=depth, growth_rate=growth_rate, num_classes=num_classes, **kwargs)
