"""Input pipelines of fastsd: the torch path (in-memory on-device augmentation, DataLoader for image
folders), synthetic data, and (in :mod:`fastsd.data.dali`, imported only when used) DALI.

Every pipeline returns :class:`DataLoaders` (``train``, ``test``, ``info``); see
:mod:`fastsd.data.base` for the contract and :func:`build_loaders` for the torch path.

The names below are loaded on first use, so that light modules (:mod:`fastsd.data.catalog`, which
the trainer's configuration reads) import without torch.
"""

import importlib

_EXPORTS = {
    "base": ("DataLoaders", "DatasetInfo", "EpochLoader"),
    "catalog": ("DATASETS", "list_datasets", "derive_seed", "CIFAR10_MEAN", "CIFAR10_STD",
                "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD"),
    "folders": ("UnreadableImageError", "ImageFolderSplit", "IMAGE_EXTENSIONS", "find_split_dirs",
                "scan_image_folder", "scan_train_and_eval"),
    "synthetic": ("make_synthetic",),
    "torch_data": ("build_loaders", "TensorEpochLoader", "FileEpochLoader"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
