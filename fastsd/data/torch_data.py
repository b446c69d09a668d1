"""The torch input pipeline: in-memory data augmented on the device, image folders via DataLoader.

Two kinds of loaders implement :class:`fastsd.data.base.EpochLoader`:

* :class:`TensorEpochLoader` for data sets that fit in memory (``synthetic``, CIFAR in torchvision's
  binary layout or as a JPEG image folder, which is decoded once up front). The uint8 images live
  on the training device; a training batch is one gather that applies the random crop (pad 4) and
  the horizontal flip of every sample at once, then one fused normalisation. No per-sample Python,
  no host-to-device copies after the start.
* :class:`FileEpochLoader` for image folders (ImageNet layout): a ``torch.utils.data.DataLoader``
  whose workers decode and augment each file (random-resized crop + flip, or resize + centre crop
  for evaluation) into uint8; the batch is copied to the device (pinned memory, non-blocking on
  CUDA) and normalised there.

Epoch semantics, the same for both (the trainer's bit-exact resume relies on them):
``train.set_epoch(e)`` makes the order *and* every random augmentation parameter of epoch ``e`` a
pure function of ``(seed, e)``: the loader draws a permutation and one augmentation seed per
position from a generator seeded with ``(seed, e)``, in the main process, and the workers derive
each sample's crop and flip from that seed alone. So the batches do not depend on the number of
workers, on which worker reads which file, on the global RNG state, or on how often the loader was
iterated before. Iterating again without calling ``set_epoch`` repeats the same epoch.
``set_epoch(e, start=k)`` (a resumed epoch) begins the pass at batch ``k``: the same batches as a
whole pass from there on, and the files of batches 0 .. k-1 are not read.

With ``world_size`` processes, the training permutation (the same in every process) is cut into
``world_size`` disjoint shards of ``N // world_size`` samples (the remainder is left out of that
epoch, a different one each epoch), and every process gets the same number of batches; the last
partial batch is dropped. The evaluation set is split into contiguous, disjoint parts without
padding or duplicates (sizes may differ by one), so summing correct counts over the processes
counts every image exactly once.
"""

import math
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .base import DataLoaders, DatasetInfo
from .catalog import (CIFAR_PAD, CIFAR_SETS, IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE,
                      SMALL_IMAGE_MAX, check_epoch, check_int, check_start, check_loader_args,
                      check_shard, derive_seed, eval_range, eval_resize_size)
from .folders import ImageFolderSplit, read_rgb_image, scan_train_and_eval, wrong_size_error
from .synthetic import SYNTHETIC_DEFAULTS, make_synthetic

__all__ = ["build_loaders", "TensorEpochLoader", "FileEpochLoader", "load_in_memory",
           "InMemoryData"]


class _Normalize:
    """uint8 [B, H, W, 3] on the device -> normalised float32 [B, 3, H, W]
    (optionally channels_last)."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool,
                 output_size: Optional[int]):
        mean_t = torch.tensor(mean, dtype=torch.float32)
        std_t = torch.tensor(std, dtype=torch.float32)
        # x/255 - mean) / std as one multiply-add.
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
        self.shift = (-mean_t / std_t).view(1, 3, 1, 1).to(device)
        self.channels_last = channels_last
        self.output_size = output_size

    def __call__(self, u8_nhwc: torch.Tensor) -> torch.Tensor:
        x = u8_nhwc.permute(0, 3, 1, 2)   # a channels_last view of the NHWC bytes: free
        if not self.channels_last:
            x = x.contiguous()            # reorder the bytes, not the floats
        x = torch.addcmul(self.shift, x.float(), self.scale)
        size = self.output_size
        if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < min(x.shape[-2:]))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x


class TensorEpochLoader:
    """Batches of an in-memory uint8 data set, augmented on the device a whole batch at a time.

    ``images``: uint8 [N, H, W, 3]; ``labels``: int64 [N]. Both are moved to ``device`` once.
    Training batches: random crop after zero padding by ``pad`` pixels and horizontal flip, per
    sample, drawn from (seed, epoch). Evaluation batches: the images as they are, in order.
    Yields ``(images float32 [B, 3, S, S] normalised, labels int64 [B])`` on ``device``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, train: bool,
                 seed: int, mean, std, device, channels_last: bool = False,
                 output_size: Optional[int] = None, pad: int = CIFAR_PAD, rank: int = 0,
                 world_size: int = 1):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}")
        self.device = torch.device(device)
        self.train = bool(train)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.pad = int(pad) if self.train else 0
        self.epoch = self.start = 0
        self.num_samples = int(images.shape[0])
        self.height, self.width = int(images.shape[1]), int(images.shape[2])
        self._normalize = _Normalize(mean, std, self.device, channels_last, output_size)
        if self.pad:
            # Padded once here, so a training batch is a single gather from the padded images.
            images = F.pad(images, (0, 0, self.pad, self.pad, self.pad, self.pad))
        self.images = images.to(self.device)
        self.labels = labels.to(torch.int64).to(self.device)
        if self.train:
            self.shard_size = self.num_samples // self.world_size
            self._len = self.shard_size // self.batch_size
        else:
            lo, hi = eval_range(self.num_samples, self.rank, self.world_size)
            self._range = (lo, hi)
            self.shard_size = hi - lo
            self._len = math.ceil(self.shard_size / self.batch_size)
        self._rows = torch.arange(self.height, device=self.device)
        self._cols = torch.arange(self.width, device=self.device)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = check_epoch(epoch), check_start(start, self._len)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self._iter_train() if self.train else self._iter_eval()

    def epoch_plan(self, epoch: int):
        """(indices, crop row offsets, crop column offsets, flips) of this process's shard,
        on the CPU."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        n = self.num_samples
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        lo = self.rank * self.shard_size
        hi = lo + self._len * self.batch_size
        return perm[lo:hi], offsets[0, lo:hi], offsets[1, lo:hi], flips[lo:hi]

    def _iter_train(self):
        plan = self.epoch_plan(self.epoch)
        if self.device.type == "cuda":
            plan = [t.pin_memory() for t in plan]
        idx, oy, ox, flip = (t.to(self.device, non_blocking=True) for t in plan)
        B, rows, cols = self.batch_size, self._rows, self._cols
        for b in range(self.start, self._len):
            s = slice(b * B, (b + 1) * B)
            r = oy[s, None] + rows[None, :]                                        # [B, H]
            c = torch.where(flip[s, None], ox[s, None] + (self.width - 1) - cols[None, :],
                            ox[s, None] + cols[None, :])                           # [B, W]
            # One gather does crop and flip: [B, 1, 1] x [B, H, 1] x [B, 1, W] -> [B, H, W, 3].
            u8 = self.images[idx[s, None, None], r[:, :, None], c[:, None, :]]
            yield self._normalize(u8), self.labels[idx[s]]

    def _iter_eval(self):
        lo, hi = self._range
        for s in range(lo + self.start * self.batch_size, hi, self.batch_size):
            e = min(s + self.batch_size, hi)
            yield self._normalize(self.images[s:e]), self.labels[s:e]


# --------------------------------------------------------------------------------------------
# Image files: decoded and augmented in DataLoader workers.

def _random_resized_crop_params(width: int, height: int, rng) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style crop: area fraction in [0.08, 1], aspect in
    [3/4, 4/3] (log-uniform), 10 tries, then the largest centred crop of clamped aspect."""
    area = width * height
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _ImageTransform:
    """PIL RGB image + augmentation seed -> uint8 numpy [S, S, 3]. Uses no global RNG state."""

    def __init__(self, train: bool, size: int, style: str, resize_size: int, pad: int = CIFAR_PAD):
        self.train, self.size, self.style = train, size, style
        self.resize_size, self.pad = resize_size, pad

    def __call__(self, img, aug_seed: int) -> np.ndarray:
        import random

        from PIL import Image
        from torchvision.transforms import functional as TF

        s = self.size
        if self.style == "imagenet":
            if self.train:
                rng = random.Random(aug_seed)
                top, left, h, w = _random_resized_crop_params(img.width, img.height, rng)
                img = img.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                img = TF.center_crop(TF.resize(img, self.resize_size), [s, s])
            return np.array(img, dtype=np.uint8)
        if img.size != (s, s):
            img = img.resize((s, s), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        if not self.train:
            return arr.copy()
        rng = random.Random(aug_seed)
        p = self.pad
        oy, ox = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
        arr = np.pad(arr, ((p, p), (p, p), (0, 0)))[oy:oy + s, ox:ox + s]
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr)


class _FileDataset(torch.utils.data.Dataset):
    """Reads ``samples[i]`` for keys ``(i, aug_seed)``; returns (uint8 [S, S, 3] tensor, label)."""

    def __init__(self, split: ImageFolderSplit, transform, expect_size: Optional[int] = None):
        root = str(split.root)
        self.expect_size = expect_size
        # One numpy bytes array instead of a list of str: forked workers would otherwise touch
        # (copy) the pages of a million Python objects by reference counting alone.
        self.root = root
        # os.fsencode / fsdecode: file names need not be valid UTF-8 (str.encode would fail)
        self.paths = np.array([os.fsencode(os.path.relpath(p, root)) for p, _ in split.samples])
        self.labels = np.array([label for _, label in split.samples], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def __getitem__(self, key):
        i, aug_seed = key
        path = self.path(i)
        try:
            img = read_rgb_image(path)
            if self.expect_size is not None and img.size != (self.expect_size, self.expect_size):
                raise wrong_size_error(path, img.width, img.height, self.expect_size)
        except ValueError as e:          # UnreadableImageError included
            return _SampleError(e)
        return torch.from_numpy(self.transform(img, aug_seed)), int(self.labels[i])


class _SampleError:
    """A bad file, passed from the worker to the main process instead of raised in the worker.

    The main process raises the same exception (its message names the file) as soon as it gets
    the batch, after leaving the DataLoader loop. An exception raised inside the worker would be
    re-raised from within the DataLoader iterator, whose traceback then keeps the iterator alive
    in a reference cycle; collected later, it waits 5 s per worker to shut down.
    """

    def __init__(self, exc: Exception):
        self.exc = exc


def _collate(batch):
    for item in batch:
        if isinstance(item, _SampleError):
            return item
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class _EpochBatchSampler:
    """Batches of (index, augmentation seed) keys: a pure function of (seed, epoch, rank)."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.start = 0
        if train:
            self.shard_size = n // world_size
            self._len = self.shard_size // batch_size
        else:
            self._range = eval_range(n, rank, world_size)
            self.shard_size = self._range[1] - self._range[0]
            self._len = math.ceil(self.shard_size / batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        B = self.batch_size
        if not self.train:
            lo, hi = self._range
            for s in range(lo + self.start * B, hi, B):
                yield [(i, 0) for i in range(s, min(s + B, hi))]
            return
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 1 << 62, (self.n,), generator=g)
        lo = self.rank * self.shard_size
        idx = perm[lo:lo + self._len * B].tolist()
        aug = seeds[lo:lo + self._len * B].tolist()
        for b in range(self.start, self._len):
            yield list(zip(idx[b * B:(b + 1) * B], aug[b * B:(b + 1) * B]))


class FileEpochLoader:
    """Batches of an image folder split, read by a DataLoader (``workers`` processes).

    Yields ``(images float32 [B, 3, S, S] normalised, labels int64 [B])`` on ``device``. An
    unreadable file raises :class:`~fastsd.data.folders.UnreadableImageError` naming it (also
    from inside a worker).
    """

    def __init__(self, split: ImageFolderSplit, *, train: bool, batch_size: int, seed: int,
                 image_size: int, style: str, resize_size: int, mean, std, device,
                 channels_last: bool = False, workers: int = 4, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.train = bool(train)
        self.dataset = _FileDataset(split, _ImageTransform(train, image_size, style, resize_size))
        self.sampler = _EpochBatchSampler(len(self.dataset), int(batch_size), self.train, int(seed),
                                          int(rank), int(world_size))
        self._normalize = _Normalize(mean, std, self.device, channels_last, None)
        # Workers are started per epoch, not persistent: a finished epoch shuts its workers down
        # itself. Persistent workers stay alive inside the DataLoader, and if the loader then ends
        # up in a reference cycle, the garbage collector finalises the worker queues before the
        # iterator, which then waits 5 s per worker to join them. Starting workers (fork) costs
        # a fraction of a second per epoch.
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers > 0 else None)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        # the sampler draws the whole epoch's plan and hands out its batches from ``start``
        self.sampler.epoch = check_epoch(epoch)
        self.sampler.start = check_start(start, len(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        error = None
        for batch in self._loader:
            if isinstance(batch, _SampleError):
                error = batch.exc
                break
            u8, labels = batch
            u8 = u8.to(self.device, non_blocking=True)
            yield self._normalize(u8), labels.to(self.device, non_blocking=True)
        if error is not None:
            raise error   # outside the loop: the DataLoader iterator is released first


# --------------------------------------------------------------------------------------------
# Data sets.

def _decode_folder(split: ImageFolderSplit, size: int,
                   workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of a split (each must be size x size) into uint8 [N, S, S, 3] + labels."""
    dataset = _FileDataset(split, _as_array, expect_size=size)
    keys = [(i, 0) for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, sampler=keys, batch_size=1024,
                                         num_workers=workers, collate_fn=_collate)
    batches, error = [], None
    it = iter(loader)
    for batch in it:
        if isinstance(batch, _SampleError):
            error = batch.exc
            break
        batches.append(batch)
    # Shut the workers down now, not when a traceback that references the iterator is collected
    # (then the queues may be finalised first and the workers only stop after a 5 s timeout).
    del it
    if error is not None:
        raise error
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


def _as_array(img, aug_seed) -> np.ndarray:
    return np.array(img, dtype=np.uint8)


def _load_cifar(name: str, data_dir, num_classes: Optional[int], download: bool, workers: int,
                eval_only: bool = False):
    """CIFAR from torchvision's binary layout or an image folder:
    uint8 NHWC arrays + class names (eval_only: the training arrays are empty, nothing read)."""
    classes, folder, tv_class, _, _ = CIFAR_SETS[name]
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"{name} has {classes} classes but num_classes is {num_classes}: drop "
                         f"--num-classes or pass {classes}")
    expected = (f"{name} expects DATA_DIR/{folder}/ (torchvision's layout; --download fetches it) "
                f"or DATA_DIR/train/<class>/*.jpg and DATA_DIR/test/<class>/*.jpg")
    if data_dir is None or str(data_dir) == "":
        raise FileNotFoundError(f"no data directory given for {name}: pass --data DIR ({expected})")
    root = Path(data_dir).expanduser()
    if root.name == folder and root.is_dir():
        root = root.parent
    binary = root / folder
    if not binary.is_dir():
        if root.exists() and not root.is_dir():
            raise FileNotFoundError(f"data directory {str(root)!r} is not a directory (extract "
                                    f"archives first): {expected}")
        if any((root / split).is_dir() for split in ("train", "test", "val")):
            train_split, test_split = scan_train_and_eval(root, classes, name, eval_only)
            x_test, y_test = _decode_folder(test_split, 32, workers)
            x_train, y_train = (_decode_folder(train_split, 32, workers) if not eval_only
                                else _no_images(x_test))
            return x_train, y_train, x_test, y_test, test_split.classes
        if not download:
            if not root.exists():
                raise FileNotFoundError(f"data directory {str(root)!r} does not exist: {expected}")
            raise FileNotFoundError(f"no {name} data in {str(root)!r}: {expected}")
    import torchvision.datasets

    cls = getattr(torchvision.datasets, tv_class)
    try:
        test = cls(str(root), train=False, download=download)
        train = None if eval_only else cls(str(root), train=True, download=download)
    except RuntimeError as e:
        raise ValueError(f"{name} files in {str(binary)!r} are incomplete or corrupt ({e}): delete "
                         f"the folder and download again (--download)") from e
    x_test = torch.from_numpy(np.ascontiguousarray(test.data))
    x_train, y_train = ((torch.from_numpy(np.ascontiguousarray(train.data)),
                         torch.tensor(train.targets)) if train is not None else _no_images(x_test))
    return x_train, y_train, x_test, torch.tensor(test.targets), tuple(test.classes)


def _no_images(like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An empty (images, labels) pair shaped like ``like``'s: a split that was not read."""
    return like[:0].clone(), torch.zeros(0, dtype=torch.long)


def _synthetic_sizes(synthetic_size) -> Tuple[int, int]:
    _, _, train, test = SYNTHETIC_DEFAULTS
    if synthetic_size is None:
        return train, test
    if isinstance(synthetic_size, Sequence) and len(synthetic_size) == 1:
        synthetic_size = synthetic_size[0]  # [N], as config.yaml holds --synthetic-size N
    if isinstance(synthetic_size, (int, np.integer)) and not isinstance(synthetic_size, bool):
        n = check_int("synthetic_size", synthetic_size, 1)
        return n, max(1, n // 5)
    if isinstance(synthetic_size, Sequence) and len(synthetic_size) == 2:
        return (check_int("synthetic_size[0] (train images)", synthetic_size[0], 1),
                check_int("synthetic_size[1] (test images)", synthetic_size[1], 1))
    raise ValueError(f"synthetic_size must be an int (train images; test = train // 5) or a pair "
                     f"(train images, test images), got {synthetic_size!r}")


def build_loaders(dataset: str = "synthetic", data_dir: Optional[Union[str, os.PathLike]] = None, *,
                  batch_size: int, eval_batch_size: Optional[int] = None, workers: int = 4,
                  device: Union[str, torch.device] = "cpu", seed: int = 0,
                  channels_last: bool = False, download: bool = False,
                  num_classes: Optional[int] = None, image_size: Optional[int] = None,
                  synthetic_size: Optional[Union[int, Tuple[int, int]]] = None,
                  rank: int = 0, world_size: int = 1,
                  eval_crop_fraction: Optional[float] = None,
                  eval_only: bool = False) -> DataLoaders:
    """Build the training and evaluation loaders of a data set; check everything first.

    Args:
        dataset: "synthetic" (generated in memory), "cifar10", "cifar100" or "imagefolder"
            ("imagenet" is an alias).
        data_dir: cifar10/cifar100: a folder holding torchvision's ``cifar-10-batches-py`` /
            ``cifar-100-python`` (or that folder itself), or ``train/`` and ``test/`` folders of
            32x32 images, one sub-folder per class (decoded into memory once). imagefolder: a folder
            with ``train/`` and ``val/`` (or ``test/``), one sub-folder per class. Must be None
            for synthetic.
        batch_size: training batch size per process. eval_batch_size: per process, default
            ``batch_size``.
        workers: DataLoader worker processes for image folders (also used to decode a CIFAR image
            folder once); the in-memory data sets need none.
        device: where the batches are delivered (and in-memory data sets are kept).
        seed: fixes the order and augmentation of every epoch (see ``set_epoch``). The synthetic
            images themselves do not depend on it: they are the same for every run.
        channels_last: deliver images in channels_last memory format.
        download: cifar10/cifar100 only: fetch torchvision's files into ``data_dir`` if missing.
        num_classes: if given, the data set must have exactly this many classes (for synthetic:
            how many it has, default 10).
        image_size: side of the images delivered. Defaults: 32 for synthetic and CIFAR (other
            values resize CIFAR on the device), 224 for imagefolder. Image folders of size <= 64
            get CIFAR-style augmentation (resize to the size, pad-4 crop, flip), larger ones
            ImageNet-style (random-resized crop + flip; evaluation resize of the shorter side and
            centre crop, see ``eval_crop_fraction``).
        synthetic_size: synthetic only: number of train images, or (train, test); default
            (5000, 1000).
        rank, world_size: this process's place in distributed training (shards, see the module
            docstring). ``DatasetInfo`` sizes are those of the whole splits.
        eval_crop_fraction: ImageNet-style image folders: the evaluation centre crop keeps this
            part of the resized shorter side (timm's crop_pct), which is resized to
            image_size / eval_crop_fraction. Default 0.875 (256 for a 224 crop); the trainer
            passes the model's own recipe (1.0 for efficientnet_b7: 600 -> 600).
        eval_only: read the evaluation split only (fastsd.evaluate): ``train`` is None and
            ``info.train_size`` 0; folders need no train/ (where there is one, its class folder
            names must still be the evaluation split's). The synthetic set is made whole.

    Raises:
        ValueError: unknown data set or bad argument, a folder layout that does not fit (no class
            folders, an empty class folder, class count != num_classes, train and evaluation
            classes differ), a CIFAR image of the wrong size, fewer training samples per process
            than one batch.
        FileNotFoundError: data_dir missing or not given, no train/ or val|test/ folder.
        fastsd.data.UnreadableImageError (a ValueError): an image file that cannot be decoded,
            when it is read (at build time for CIFAR image folders, otherwise during iteration);
            the message names the file.
    """
    (name, batch_size, eval_batch_size, workers, rank, world_size, num_classes, image_size,
     device, eval_crop_fraction) = check_loader_args(
        dataset, data_dir, batch_size=batch_size, eval_batch_size=eval_batch_size,
        workers=workers, device=device, seed=seed, download=download, num_classes=num_classes,
        image_size=image_size, synthetic_size=synthetic_size, rank=rank, world_size=world_size,
        eval_crop_fraction=eval_crop_fraction)

    common = dict(seed=int(seed), device=device, channels_last=bool(channels_last), rank=rank,
                  world_size=world_size)
    if name == "imagefolder":
        size = image_size or 224
        train_split, eval_split = scan_train_and_eval(data_dir, num_classes, name, eval_only)
        if not eval_only:
            check_shard(len(train_split), batch_size, world_size, name)
        style = "cifar" if size <= SMALL_IMAGE_MAX else "imagenet"
        resize = eval_resize_size(size, eval_crop_fraction)
        kw = dict(common, image_size=size, style=style, resize_size=resize, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, workers=workers)
        train = (FileEpochLoader(train_split, train=True, batch_size=batch_size, **kw)
                 if not eval_only else None)
        test = FileEpochLoader(eval_split, train=False, batch_size=eval_batch_size, **kw)
        info = DatasetInfo(name, len(eval_split.classes), size, IMAGENET_MEAN, IMAGENET_STD,
                           len(train_split) if not eval_only else 0, len(eval_split),
                           eval_split.classes)
        return DataLoaders(train, test, info)

    data = load_in_memory(name, data_dir, num_classes=num_classes, image_size=image_size,
                          synthetic_size=synthetic_size, download=download, workers=workers,
                          batch_size=batch_size, world_size=world_size, eval_only=eval_only)
    x_train, y_train, x_test, y_test, classes, mean, std, size = data
    output_size = size if size != x_test.shape[1] else None
    kw = dict(common, mean=mean, std=std, output_size=output_size)
    train = (TensorEpochLoader(x_train, y_train, batch_size=batch_size, train=True, **kw)
             if not eval_only else None)
    test = TensorEpochLoader(x_test, y_test, batch_size=eval_batch_size, train=False, **kw)
    info = DatasetInfo(name, len(classes), size, tuple(mean), tuple(std), len(y_train),
                       len(y_test), tuple(classes))
    return DataLoaders(train, test, info)


class InMemoryData(NamedTuple):
    """A data set held in memory: uint8 images [N, H, W, 3], int64 labels, its normalisation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: Tuple[str, ...]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    image_size: int          #: side of the images delivered (may differ from the stored side)


def load_in_memory(name, data_dir, *, num_classes, image_size, synthetic_size, download, workers,
                   batch_size, world_size, eval_only: bool = False) -> InMemoryData:
    """The synthetic set or CIFAR in torchvision's binary layout, loaded for either pipeline.
    eval_only: the training arrays are empty. CIFAR's are not read; the synthetic set is made
    whole and its training images dropped after they gave the normalisation."""
    if name == "synthetic":
        k = num_classes if num_classes is not None else SYNTHETIC_DEFAULTS[0]
        if k < 2:
            raise ValueError(f"the synthetic dataset needs num_classes >= 2, got {k}")
        size = image_size or SYNTHETIC_DEFAULTS[1]
        n_train, n_test = _synthetic_sizes(synthetic_size)
        if not eval_only:
            check_shard(n_train, batch_size, world_size, name)
        x_train, y_train, x_test, y_test = make_synthetic(k, size, n_train, n_test)
        # Normalised with its own pixel statistics.
        pixels = x_train.reshape(-1, 3).to(torch.float64) / 255.0
        mean = tuple(float(v) for v in pixels.mean(0))
        std = tuple(float(v) for v in pixels.std(0).clamp_min(1e-3))
        classes = tuple(f"class_{i}" for i in range(k))
        if eval_only:
            x_train, y_train = _no_images(x_test)
    else:
        x_train, y_train, x_test, y_test, classes = _load_cifar(name, data_dir, num_classes,
                                                                 download, workers, eval_only)
        if not eval_only:
            check_shard(len(y_train), batch_size, world_size, name)
        mean, std = CIFAR_SETS[name][3], CIFAR_SETS[name][4]
        size = image_size or 32
    return InMemoryData(x_train, y_train, x_test, y_test, tuple(classes), tuple(mean),
                        tuple(std), size)


