"""The data sets fastsd knows and what every input pipeline shares about them.

The torch path (:mod:`fastsd.data.torch_data`) and the DALI path (:mod:`fastsd.data.dali`) take the
same arguments, deliver the same data sets with the same normalisation and augmentation rules, and
cut epochs and shards the same way: the names, statistics, seeds and argument checks they share
are defined here, once.
"""

from pathlib import Path
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DATASETS", "list_datasets", "CIFAR_SETS", "CIFAR10_MEAN", "CIFAR10_STD",
           "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR_PAD",
           "SMALL_IMAGE_MAX", "IMAGENET_CROP_RATIO", "RRC_SCALE", "RRC_RATIO", "TRAIN_STREAM",
           "DALI_AUG_STREAM", "PROCESS_RNG_STREAM", "derive_seed", "check_epoch", "check_start",
           "eval_range", "check_int", "check_shard", "eval_resize_size", "LoaderArgs",
           "check_loader_args", "cifar_source"]

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "imagenet": "imagefolder",
            "image_folder": "imagefolder", "folder": "imagefolder"}

# Per-channel statistics of the training images in [0, 1] units (std over all pixels).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_SETS = {  # name -> (classes, torchvision folder, torchvision class name, mean, std)
    "cifar10": (10, "cifar-10-batches-py", "CIFAR10", CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (100, "cifar-100-python", "CIFAR100", CIFAR100_MEAN, CIFAR100_STD),
}
CIFAR_PAD = 4             #: zero padding of the CIFAR random crop
SMALL_IMAGE_MAX = 64      #: image folders at or below this size get CIFAR-style augmentation
IMAGENET_CROP_RATIO = 0.875  #: default eval crop fraction: resize to size / 0.875 (256 <- 224)
RRC_SCALE = (0.08, 1.0)   #: RandomResizedCrop: area fraction range (torchvision's default)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  #: RandomResizedCrop: aspect ratio (w / h) range
# The derive_seed streams: one value per consumer, all defined here so no two can collide.
TRAIN_STREAM = 1        #: the training order and the torch path's augmentation
DALI_AUG_STREAM = 2     #: the DALI pipelines' augmentation parameters
PROCESS_RNG_STREAM = 3  #: each DDP process's global generators (dropout, other in-model noise)


def cifar_source(name: str, data_dir) -> str:
    """Where a CIFAR set's images come from: "binary" (torchvision's layout, DATA_DIR/<its
    folder>/, or nothing there yet) or "folder" (DATA_DIR/train/ and test/ of image files)."""
    folder = CIFAR_SETS[name][1]
    if data_dir is None or str(data_dir) == "":
        return "binary"               # the loaders raise the error that says what to pass
    root = Path(data_dir).expanduser()
    if (root.name == folder and root.is_dir()) or (root / folder).is_dir():
        return "binary"
    if any((root / s).is_dir() for s in ("train", "test", "val")):
        return "folder"
    return "binary"


def list_datasets() -> List[str]:
    """The dataset names :func:`fastsd.data.build_loaders` accepts."""
    return list(DATASETS)


def derive_seed(seed: int, epoch: int, stream: int = TRAIN_STREAM) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, stream), well mixed (SplitMix-free:
    numpy's SeedSequence), so nearby seeds and epochs give unrelated streams."""
    words = [int(seed) % (1 << 64), int(epoch), int(stream)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_epoch(epoch) -> int:
    """``epoch`` as an int >= 0, else a ValueError."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return int(epoch)


def check_start(start, batches: int) -> int:
    """``start`` (the first batch of a pass) as an int in [0, batches], else a ValueError."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) \
            or not 0 <= start <= batches:
        raise ValueError(f"start must be a batch index in [0, {batches}] (the epoch has {batches} "
                         f"batches), got {start!r}")
    return int(start)


def eval_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[lo, hi) of the evaluation samples of process ``rank``: contiguous, disjoint, covering n."""
    return rank * n // world_size, (rank + 1) * n // world_size


def check_int(name: str, value, lo: int, optional: bool = False):
    """``value`` as an int >= lo (None passes when optional), else a ValueError naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


def eval_resize_size(image_size: int, crop_fraction: float) -> int:
    """The shorter side an ImageNet-style evaluation image is resized to before its centre crop of
    ``image_size``: the crop keeps ``crop_fraction`` of it (timm's crop_pct); 256 for 224 at
    0.875."""
    return max(int(image_size), int(round(image_size / crop_fraction)))


def _check_crop_fraction(value) -> float:
    if value is None:
        return IMAGENET_CROP_RATIO
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"eval_crop_fraction must be a number in (0, 1] (the part of the resized "
                         f"shorter side the evaluation centre crop keeps; {IMAGENET_CROP_RATIO} "
                         f"resizes to 256 for a 224 crop), got {value!r}")
    return float(value)


class LoaderArgs(NamedTuple):
    """The arguments every input pipeline shares, checked and normalised."""

    name: str                  #: canonical data set name (aliases resolved)
    batch_size: int
    eval_batch_size: int
    workers: int
    rank: int
    world_size: int
    num_classes: Optional[int]
    image_size: Optional[int]
    device: "torch.device"
    eval_crop_fraction: float  #: ImageNet-style evaluation: see eval_resize_size


def check_loader_args(dataset, data_dir, *, batch_size, eval_batch_size, workers, device, seed,
                      download, num_classes, image_size, synthetic_size, rank,
                      world_size, eval_crop_fraction=None) -> LoaderArgs:
    """Check the arguments of :func:`fastsd.data.build_loaders` (and of the DALI path, which takes
    the same) before anything is read or built; raise ValueError naming the argument and the fix."""
    import torch  # here, not at the top: the trainer's configuration reads this module without it

    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a string, one of {', '.join(DATASETS)}; got {dataset!r}")
    name = _ALIASES.get(dataset.strip().lower(), dataset.strip().lower())
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, DATASETS, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown dataset {dataset!r}.{hint} Choose one of {', '.join(DATASETS)} "
                         f"(imagefolder reads any train/ + val/ folder of class sub-folders)")
    batch_size = check_int("batch_size", batch_size, 1)
    eval_batch_size = check_int("eval_batch_size", eval_batch_size, 1, optional=True) or batch_size
    workers = check_int("workers", workers, 0)
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    num_classes = check_int("num_classes", num_classes, 1, optional=True)
    image_size = check_int("image_size", image_size, 8, optional=True)
    eval_crop_fraction = _check_crop_fraction(eval_crop_fraction)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', "
                         f"got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but no CUDA GPU is available: pass --device cpu")
    if download and name not in CIFAR_SETS:
        raise ValueError(f"download is only possible for cifar10 and cifar100, not {name}")
    if name == "synthetic" and data_dir is not None and str(data_dir) != "":
        raise ValueError(f"a data directory ({str(data_dir)!r}) was given but the dataset is "
                         f"synthetic, which reads no files: pass --dataset cifar10, cifar100 or "
                         f"imagefolder to use it, or drop --data")
    if synthetic_size is not None and name != "synthetic":
        raise ValueError(f"synthetic_size only applies to the synthetic dataset, not {name}")
    return LoaderArgs(name, batch_size, eval_batch_size, workers, rank, world_size, num_classes,
                      image_size, device, eval_crop_fraction)


def check_shard(n_train: int, batch_size: int, world_size: int, name: str) -> None:
    """Every process must get at least one full training batch per epoch."""
    if n_train // world_size < batch_size:
        shard = (f", {n_train // world_size} per process ({world_size} processes)"
                 if world_size > 1 else "")
        raise ValueError(f"{name} has {n_train} training images{shard}: fewer than one batch of "
                         f"{batch_size} (the last partial batch is dropped); use a smaller batch "
                         f"size (--batch-size)")
