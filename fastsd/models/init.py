"""Weight initialisation shared by the CIFAR models."""

from torch import nn


def he_init_(model: nn.Module) -> None:
    """He et al.'s initialisation ("MSRA", from their PReLU paper) of every convolution, and
    BatchNorm at weight 1, bias 0: what the CIFAR ResNet and DenseNet papers train from."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
