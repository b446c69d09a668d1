"""The interface every input pipeline of fastsd provides (torch DataLoader path and DALI path).

The trainer only sees :class:`DataLoaders`; a pipeline is free in how it produces the batches.
"""

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence, Tuple

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the trainer need to know about a data set."""

    name: str                      #: "synthetic", "cifar10", "cifar100", "imagefolder"
    num_classes: int
    image_size: int                #: side of the square images the network sees (train and eval)
    mean: Tuple[float, float, float]  #: per-channel normalisation, in [0, 1] pixel units
    std: Tuple[float, float, float]
    train_size: int                #: samples in the training split (this process's shard: no)
    test_size: int                 #: samples in the evaluation split
    class_names: Optional[Sequence[str]] = None


class EpochLoader(Protocol):
    """An iterable of ``(images, labels)`` batches with epoch semantics.

    ``images``: float tensor [B, 3, H, W], normalised, on the training device (channels_last memory
    format when the pipeline was asked for it). ``labels``: int64 tensor [B] on the same device,
    each in [0, num_classes).
    """

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        """Batches per epoch."""

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Fix the order and augmentation of the next pass from (seed, epoch): deterministic, new
        each epoch. ``start``: the pass begins at batch ``start`` (a resumed epoch) and yields
        batches start .. len - 1 exactly as a whole pass would, without reading the ones before."""


@dataclass
class DataLoaders:
    """The training and evaluation loaders of one data set.

    ``train`` shuffles anew each epoch and drops the last partial batch (None when built with
    ``eval_only``). ``test`` yields every sample exactly once, in a fixed order (also when sharded
    across processes).
    """

    train: Optional[EpochLoader]
    test: EpochLoader
    info: DatasetInfo
