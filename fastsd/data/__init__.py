"""Input pipelines of fastsd: the torch path (in-memory on-device augmentation, DataLoader for image
folders), synthetic data, and (in :mod:`fastsd.data.dali`, imported only when used) DALI.

Every pipeline returns :class:`DataLoaders` (``train``, ``test``, ``info``); see
:mod:`fastsd.data.base` for the contract and :func:`build_loaders` for the torch path.
"""

from .base import DataLoaders, DatasetInfo, EpochLoader
from .folders import (IMAGE_EXTENSIONS, ImageFolderSplit, UnreadableImageError, find_split_dirs,
                      scan_image_folder, scan_train_and_eval)
from .synthetic import make_synthetic
from .torch_data import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DATASETS,
                         IMAGENET_MEAN, IMAGENET_STD, FileEpochLoader, TensorEpochLoader,
                         build_loaders, derive_seed, list_datasets)

__all__ = ["DataLoaders", "DatasetInfo", "EpochLoader", "build_loaders", "list_datasets", "DATASETS",
           "UnreadableImageError", "ImageFolderSplit", "IMAGE_EXTENSIONS", "find_split_dirs",
           "scan_image_folder", "scan_train_and_eval", "make_synthetic", "TensorEpochLoader",
           "FileEpochLoader", "derive_seed", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
