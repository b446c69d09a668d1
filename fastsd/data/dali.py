"""NVIDIA DALI input pipelines (``--dali``): the torch path's data sets and epoch semantics.

DALI decodes and augments the images, on the GPU (``device="mixed"`` JPEG decoding, GPU crop,
resize, flip, normalisation) or, without a GPU, with its CPU operators in ``num_threads`` threads.
DALI itself is imported only when :func:`build_dali_loaders` is called; without it that call raises
an ImportError that says how to install it (``pip install "fastsd[dali]"``).

What is fed, what is computed
=============================
DALI's file reader shuffles internally, and its random operators keep their own generator state,
which advances with every batch: the order and augmentation of an epoch would depend on everything
run before it, and ``set_epoch(e)`` could not reproduce epoch ``e`` (after a resume, say) short of
rebuilding the pipeline every epoch. So the pipelines here hold no random operator and no reader.
A numpy "sampler" in this process decides everything that is random, and ``fn.external_source``
feeds it in, one batch per call:

* the order: the torch path's permutation of the training split (``torch.randperm`` seeded with
  ``derive_seed(seed, epoch)``, :mod:`fastsd.data.torch_data`), the same in every process, cut into
  ``world_size`` disjoint shards of ``N // world_size`` samples; batches of ``batch_size``, the last
  partial one dropped. So a run with and without ``--dali`` sees the same samples in the same
  batches;
* the augmentation of each batch: pad-crop offsets and flips (CIFAR), or the candidate areas,
  aspect ratios and corner positions of torchvision's RandomResizedCrop plus flips (ImageNet),
  from a generator seeded with ``(derive_seed(seed, epoch, stream), rank, batch)``, so any batch of
  any epoch is a pure function of its coordinates.

The images are still decoded by DALI, in its threads. The feed passes file *paths*
(``fn.io.file.read`` reads them), or the files' bytes when a split is small enough to be held in
memory encoded (``cache_bytes``: CIFAR-10 as JPEGs is 56 MB; reading 50 000 small files each epoch
took as much CPU time as decoding them), or, for CIFAR in torchvision's binary layout, the uint8
images themselves. The crop window of RandomResizedCrop needs the image size, which only the
encoded file knows; it is computed inside the graph (``fn.peek_image_shape`` + DALI arithmetic,
the same rule as torchvision, see :mod:`fastsd.data.dali_graph`) and the decoder decodes only that
region.

Epoch semantics (as :mod:`fastsd.data.torch_data`): iterating again without ``set_epoch`` repeats
the same epoch; ``set_epoch(e, start=k)`` feeds the pipeline from batch ``k`` on; evaluation
yields this process's contiguous part of the split (parts are disjoint, cover it, and have no
padding or duplicates; sizes may differ by one), the last batch partial.

Errors: a file that cannot be read or decoded stops the pipeline (DALI does not skip samples, and
its message does not say which sample). The loader then decodes the files of the batches in flight
one by one, on the CPU, and raises :class:`~fastsd.data.folders.UnreadableImageError` naming the
file.
"""

import math
import os
import weakref
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .base import DataLoaders, DatasetInfo
from .catalog import (CIFAR_PAD, CIFAR_SETS, IMAGENET_MEAN, IMAGENET_STD, DALI_AUG_STREAM,
                      RRC_RATIO, RRC_SCALE, SMALL_IMAGE_MAX, TRAIN_STREAM, check_epoch, check_int,
                      check_loader_args, check_shard, check_start, cifar_source, derive_seed,
                      eval_range, eval_resize_size)
from .folders import (ImageFolderSplit, UnreadableImageError, check_image_sizes,
                      scan_train_and_eval)
from .torch_data import load_in_memory

__all__ = ["build_dali_loaders", "DaliEpochLoader", "dali_available", "require_dali",
           "resolve_dali_device", "DALI_INSTALL"]

#: how to get DALI (the ``dali`` extra of fastsd pulls the CUDA 13 wheel)
DALI_INSTALL = 'pip install "fastsd[dali]"'

DALI_DEVICES = ("auto", "gpu", "cpu")
#: the image formats DALI's decoder reads, as PIL names them (PPM covers PBM and PGM; MPO is the
#: JPEG of cameras that add a preview): PIL also reads GIF, ICO, PSD, ..., which DALI refuses
DALI_IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"})
#: image folder splits up to this size are held in memory, encoded (see build_dali_loaders)
DEFAULT_CACHE_BYTES = 512 << 20
_LOG_RATIO = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))


def require_dali():
    """Import NVIDIA DALI, or raise an ImportError that says how to install it."""
    try:
        import nvidia.dali
    except ImportError as e:
        raise ImportError(
            f"the DALI input pipeline (--dali) needs NVIDIA DALI, which is not installed: "
            f"install it with  {DALI_INSTALL}  (the CUDA 13 wheel, nvidia-dali-cuda130; on CUDA 12 "
            f"pip install nvidia-dali-cuda120), or drop --dali to use the torch DataLoader") from e
    return nvidia.dali


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        require_dali()
    except ImportError:
        return False
    return True


def resolve_dali_device(dali_device: str, device: torch.device) -> str:
    """"gpu" or "cpu": where DALI runs. "auto" is the GPU iff the batches go to a CUDA device."""
    if not isinstance(dali_device, str) or dali_device.strip().lower() not in DALI_DEVICES:
        raise ValueError(f"dali_device must be one of {', '.join(DALI_DEVICES)}, "
                         f"got {dali_device!r}")
    choice = dali_device.strip().lower()
    if choice == "auto":
        return "gpu" if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    if choice == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("dali_device is gpu but no CUDA GPU is available: pass "
                             "--dali-device cpu (or auto)")
        if device.type != "cuda":
            raise ValueError(f"dali_device is gpu but the batches go to {device}: DALI's GPU "
                             f"output stays on the GPU; pass --device cuda, or --dali-device cpu")
    return choice


def _half(dtype) -> bool:
    names = {"float32": False, "fp32": False, "float": False, "float16": True, "fp16": True,
             "half": True}
    if dtype in (torch.float32, torch.float16):
        return dtype == torch.float16
    if isinstance(dtype, str) and dtype.strip().lower() in names:
        return names[dtype.strip().lower()]
    raise ValueError(f"dtype must be torch.float32 or torch.float16 (or 'fp32' / 'fp16'), "
                     f"got {dtype!r}")


class _PaddedRows:
    """Many byte strings as one zero-padded uint8 matrix plus their lengths.

    ``batch(idx)`` is what the graph's feed passes for a batch: one [B, L] array and int32 [B, 1]
    lengths, trimmed back to the strings inside the graph. (A list of B small arrays costs DALI's
    external_source ~10 us of Python per sample: measured, a third of the throughput on the CIFAR
    JPEGs with 2 cores.) ``skip`` drops that many leading bytes of every string.
    """

    def __init__(self, rows: Sequence[bytes], skip: int = 0):
        self.lengths = np.fromiter((len(r) - skip for r in rows), dtype=np.int32, count=len(rows))
        width = max(1, int(self.lengths.max())) if len(rows) else 1
        self.matrix = np.zeros((len(rows), width), dtype=np.uint8)
        for i, r in enumerate(rows):
            self.matrix[i, :len(r) - skip] = np.frombuffer(r, dtype=np.uint8, offset=skip)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> bytes:
        return self.matrix[i, :self.lengths[i]].tobytes()

    def batch(self, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(uint8 [B, L] zero-padded rows, int32 [B, 1] their lengths)."""
        return self.matrix[idx], self.lengths[idx].reshape(-1, 1)


class _PathTable(_PaddedRows):
    """File paths as padded rows. The common leading folder is stored once (``prefix``) and put
    back in the graph, so the matrix holds only the part that differs
    (ImageNet: ~30 bytes a file)."""

    def __init__(self, paths: Sequence[str]):
        encoded = [os.fsencode(p) for p in paths]
        prefix = os.path.commonprefix(encoded) if len(encoded) > 1 else b""
        self.prefix = prefix[:prefix.rfind(os.sep.encode()) + 1]  # a whole folder, never a name
        super().__init__(encoded, skip=len(self.prefix))

    def path(self, i: int) -> str:
        return os.fsdecode(self.prefix + self.row(i))


def _read_files(paths: Sequence[str]) -> _PaddedRows:
    """The bytes of every file, read now (the cache of small image files,
    see build_dali_loaders)."""
    contents = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                contents.append(f.read())
        except OSError as e:
            raise UnreadableImageError(f"cannot read image file {path!r} "
                                       f"({type(e).__name__}: {e.strerror or e}): replace or "
                                       f"delete the file") from e
    return _PaddedRows(contents)


def _fits_in_memory(paths: Sequence[str], budget: int) -> bool:
    """Whether _read_files(paths) would hold at most ``budget`` bytes (files x the largest file).
    Stops at the first file that settles it: an ImageNet split costs one stat, not a million."""
    largest = 0
    try:
        for path in paths:
            largest = max(largest, os.path.getsize(path))
            if len(paths) * largest > budget:
                return False
    except OSError:
        return False              # read it every epoch: the pipeline names a file it cannot read
    return True


class _Feed:
    """The ``fn.external_source`` callback: batch ``k`` of the current plan per call,
    then StopIteration.

    DALI calls it in this thread, from ``pipeline.run()``, up to ``prefetch`` batches ahead of the
    output; ``in_flight`` remembers which batches were fed and not yet returned, oldest first.
    """

    def __init__(self, make_batch):
        # weakly: the pipeline holds this feed, and a strong reference back to the loader would
        # keep loader, pipeline and DALI's threads alive until a cycle collection
        self.make_batch = weakref.WeakMethod(make_batch)
        self.batches: Sequence[np.ndarray] = ()
        self.next = 0
        self.in_flight: deque = deque()
        self.stopped = True

    def start(self, batches: Sequence[np.ndarray], first: int = 0) -> None:
        """Feed ``batches[first:]``; ``k`` stays the index in the whole plan (it picks the
        batch's augmentation draws)."""
        self.batches, self.next, self.stopped = batches, first, False
        self.in_flight.clear()

    def __call__(self):
        if self.stopped or self.next >= len(self.batches):
            raise StopIteration
        k = self.next
        self.next += 1
        self.in_flight.append(k)
        return self.make_batch()(k, self.batches[k])


class DaliEpochLoader:
    """One split through one DALI pipeline; an :class:`~fastsd.data.base.EpochLoader`.

    Yields ``(images, labels)``: images float32 or float16 [B, 3, S, S], normalised, on ``device``
    (a channels_last view of DALI's NHWC output when ``channels_last``); labels int64 [B].

    Args:
        images: uint8 [N, H, W, 3] held in memory (CIFAR), or None when ``paths`` are given.
        paths: image files decoded by DALI, or None.
        cache_files: with ``paths``: read the files once and keep their (encoded) bytes in memory;
            DALI still decodes them every epoch, but reads no file.
        labels: int [N].
        train: training (shuffled, augmented, last partial batch dropped) or evaluation.
        augment: "cifar" (pad crop + flip), "imagenet" (random-resized crop + flip); evaluation:
            "none" (normalise only) or "center" (resize the shorter side, centre crop).
        image_size: output side. resize_size: evaluation "center": the shorter side before the crop.
        native_size: "cifar"/"none": the side of the images as stored; != image_size resizes after
            the crop (in-memory CIFAR at another size). pre_resize: resize every decoded image to
            image_size first (small-image folders, as the torch path does).
        dali_device: "cpu" or "gpu" (already resolved, see :func:`resolve_dali_device`).
        num_threads: DALI CPU threads. prefetch: batches DALI prepares ahead.
    """

    def __init__(self, *, images: Optional[np.ndarray] = None,
                 paths: Optional[Sequence[str]] = None,
                 labels, train: bool, augment: str, batch_size: int, seed: int, image_size: int,
                 mean, std, device: torch.device, dali_device: str, half: bool = False,
                 channels_last: bool = False, resize_size: int = 256, native_size: int = 0,
                 pre_resize: bool = False, pad: int = CIFAR_PAD, num_threads: int = 2,
                 prefetch: int = 2, rank: int = 0, world_size: int = 1,
                 cache_files: bool = False):
        if (images is None) == (paths is None):
            raise ValueError("give exactly one of images (in memory) and paths (files)")
        self.train = bool(train)
        ok = ("cifar", "imagenet") if self.train else ("none", "center")
        if augment not in ok:
            raise ValueError(f"augment for {'training' if train else 'evaluation'} must be one of "
                             f"{ok}, got {augment!r}")
        if images is not None:
            images = np.ascontiguousarray(images)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} "
                                 f"{images.shape}")
            if augment not in ("cifar", "none"):
                raise ValueError(f"in-memory images take augment 'cifar' or 'none', "
                                 f"not {augment!r}")
            native_size = images.shape[1]
        self.images = images
        self.paths = _PathTable(paths) if paths is not None else None
        cache_files = bool(cache_files) and paths is not None
        # what the feed passes per batch for the files: their bytes, or their paths
        self._file_rows = _read_files(paths) if cache_files else self.paths
        self.labels = np.asarray(labels, dtype=np.int64)
        n = len(self.labels)
        if n != (len(images) if images is not None else len(self.paths)):
            raise ValueError(f"{n} labels for "
                             f"{len(images) if images is not None else len(self.paths)} images")
        self.num_samples = n
        self.augment = augment
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # DALI needs a device id, and the batches' device (cuda:N) must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dali_device = dali_device
        self.num_threads = max(1, int(num_threads))
        self.prefetch = max(1, int(prefetch))
        self.pad = int(pad)
        self.epoch = self.start = 0
        self._dtype = torch.float16 if half else torch.float32
        self._channels_last = bool(channels_last)
        self._spec_args = dict(
            source="memory" if images is not None else "encoded" if cache_files else "files",
            augment=augment,
            image_size=int(image_size), resize_size=int(resize_size),
            native_size=int(native_size or image_size), pre_resize=bool(pre_resize),
            mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
            device=dali_device, half=bool(half), channels_last=bool(channels_last), pad=self.pad)
        if self.train:
            self.shard_size = n // self.world_size
            self._len = self.shard_size // self.batch_size
        else:
            self._range = eval_range(n, self.rank, self.world_size)
            self.shard_size = self._range[1] - self._range[0]
            self._len = math.ceil(self.shard_size / self.batch_size)
        self._pipe = None
        self._feed = _Feed(self._make_batch)
        self._active = None      # the generator of the pass in progress, if any
        self._aug_key = (-1, 0)  # (epoch, its augmentation seed): derived once per epoch

    # ------------------------------------------------------------------ the sampler (numpy only)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = check_epoch(epoch), check_start(start, self._len)

    def __len__(self) -> int:
        return self._len

    def epoch_batches(self, epoch: Optional[int] = None) -> List[np.ndarray]:
        """The sample indices of each batch this process yields in ``epoch``
        (default: the current)."""
        B = self.batch_size
        if not self.train:
            lo, hi = self._range
            return [np.arange(s, min(s + B, hi), dtype=np.int64) for s in range(lo, hi, B)]
        epoch = self.epoch if epoch is None else epoch
        # the torch path's permutation, drawn the same way: the same samples in the same batches
        # with or without --dali (only the augmentation draws differ)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, TRAIN_STREAM))
        perm = torch.randperm(self.num_samples, generator=g).numpy()
        lo = self.rank * self.shard_size
        return list(perm[lo:lo + self._len * B].reshape(self._len, B))

    def augmentation(self, epoch: int, k: int, n: int) -> Tuple[np.ndarray, ...]:
        """The random parameters of batch ``k`` of ``epoch`` (n samples):
        see fastsd.data.dali_graph."""
        if not self.train:
            return ()
        if self._aug_key[0] != epoch:
            self._aug_key = (epoch, derive_seed(self.seed, epoch, DALI_AUG_STREAM))
        rng = np.random.default_rng([self._aug_key[1], self.rank, k])
        if self.augment == "cifar":
            # torchvision RandomCrop(padding=p): the corner in the padded image
            # is uniform in [0, 2p]
            anchor = rng.integers(-self.pad, self.pad + 1, size=(n, 2), dtype=np.int32)
            flip = rng.integers(0, 2, size=n, dtype=np.int32)
            return anchor, flip
        from .dali_graph import RRC_ATTEMPTS

        area = rng.uniform(*RRC_SCALE, size=(n, RRC_ATTEMPTS)).astype(np.float32)
        ratio = np.exp(rng.uniform(*_LOG_RATIO, size=(n, RRC_ATTEMPTS))).astype(np.float32)
        uv = rng.random((n, 2), dtype=np.float32)
        flip = rng.integers(0, 2, size=n, dtype=np.int32)
        return area, ratio, uv, flip

    def _make_batch(self, k: int, idx: np.ndarray):
        if self.images is not None:
            data = (self.images[idx[0]:idx[-1] + 1] if not self.train else self.images[idx],)
        else:
            data = self._file_rows.batch(idx)
        return data + self.augmentation(self._pass_epoch, k, len(idx))

    # ------------------------------------------------------------------ the pipeline

    def _device_id(self):
        return self.device.index if self.dali_device == "gpu" else None

    def _build(self):
        from .dali_graph import GraphSpec, build_pipeline

        spec = GraphSpec(**self._spec_args,
                         path_prefix=self.paths.prefix if self.paths is not None else b"")
        self._pipe = build_pipeline(
            spec, self._feed, batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self._device_id(), prefetch=self.prefetch,
            seed=derive_seed(self.seed, 0, DALI_AUG_STREAM) % (1 << 31))
        self._fresh = True

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close()          # a pass abandoned half-way: drain it first
        batches = self.epoch_batches()
        self._pass_epoch = self.epoch
        gen = self._run_pass(batches, self.start)
        # a weak reference: a pass the caller drops is closed (and drained) at once, not by the
        # cycle collector at some point when the pipeline may be half torn down
        self._active = weakref.ref(gen)
        return gen

    def _run_pass(self, batches, first: int = 0):
        if first >= len(batches):
            return
        if self._pipe is None:
            self._build()
        elif not self._fresh:
            self._pipe.reset()        # the previous pass ended in StopIteration: start a new one
        self._fresh = False
        feed = self._feed
        feed.start(batches, first)
        # GPU output bound to torch's stream: the consumer's kernels wait for DALI's, not the host
        bind_stream = self.dali_device == "gpu" and self._pipe.exec_dynamic
        try:
            for _ in range(len(batches) - first):
                try:
                    if bind_stream:
                        # On the pipeline's GPU: torch's default stream is handle 0, which DALI
                        # takes for the legacy stream of the *current* device.
                        with torch.cuda.device(self.device):
                            (out,) = self._pipe.run(torch.cuda.current_stream(self.device))
                    else:
                        (out,) = self._pipe.run(None)
                except StopIteration:
                    raise RuntimeError("DALI pipeline ended the epoch early "
                                       "(internal error)") from None
                except RuntimeError as e:
                    self._fail(e)
                k = feed.in_flight.popleft()
                labels = torch.from_numpy(self.labels[batches[k]])
                yield self._images(out), labels.to(self.device, non_blocking=True)
        finally:
            self._finish()

    def _finish(self):
        """Make the pipeline ready for the next pass: consume what it still has,
        up to StopIteration."""
        self._active = None
        if self._pipe is None:
            return
        self._feed.stopped = True
        try:
            for _ in range(self.prefetch + 2):
                self._pipe.run()
        except StopIteration:
            return
        except Exception:             # noqa: BLE001 - e.g. a pipeline shut down at exit
            pass
        self._pipe = None             # not in a known state: build a new one next pass

    def _images(self, out) -> torch.Tensor:
        t = out.as_tensor()
        if self._pipe.exec_dynamic:
            # The dynamic executor hands over its output buffers: zero copy, and dlpack makes the
            # consumer's stream wait for DALI's.
            with torch.cuda.device(self.device) if self.dali_device == "gpu" else nullcontext():
                x = torch.from_dlpack(t)
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            on_gpu = self.dali_device == "gpu"
            x = torch.empty(t.shape(), dtype=self._dtype, device=self.device if on_gpu else "cpu")
            feed_ndarray(t, x,
                         cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        if x.device.type != self.device.type:   # CPU DALI feeding a GPU
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self._channels_last:
            x = x.permute(0, 3, 1, 2)   # NHWC bytes seen as NCHW: channels_last memory format
        return x

    # ------------------------------------------------------------------ errors

    def _fail(self, error: RuntimeError):
        """Raise an error naming the file that broke the pipeline (DALI's message does not)."""
        in_flight = [self._feed.batches[k] for k in self._feed.in_flight]
        self._pipe = None             # DALI pipelines are unusable after an error
        self._active = None
        self._feed.stopped = True
        first = str(error).strip().splitlines()
        reason = next((line for line in reversed(first) if "no longer valid" not in line and line),
                      "decoding failed")
        if self.paths is not None:
            bad = _find_bad_file([self.paths.path(i) for idx in in_flight for i in idx],
                                 peek=self.augment in ("imagenet", "center"))
            if bad is not None:
                path, why = bad
                raise UnreadableImageError(
                    f"cannot read image file {path!r} ({why or reason}): replace or delete the "
                    f"file") from error
            files = [self.paths.path(i) for idx in in_flight[:1] for i in idx[:3]]
            raise RuntimeError(f"DALI pipeline failed on a batch of files such as {files} and no "
                               f"single file fails to decode on the CPU: {reason}") from error
        raise RuntimeError(f"DALI pipeline failed: {error}") from error


def _find_bad_file(paths: Sequence[str], peek: bool) -> Optional[Tuple[str, str]]:
    """The first of ``paths`` that cannot be read or decoded by DALI on the CPU, and why."""
    from .dali_graph import build_probe_pipeline

    current: List[np.ndarray] = []
    pipe = build_probe_pipeline(lambda: current, peek)
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return path, f"{type(e).__name__}: {e.strerror or e}"
        if not data:
            return path, "empty file"
        current[:] = [np.frombuffer(data, dtype=np.uint8)]
        try:
            pipe.run()
        except RuntimeError as e:
            lines = [line for line in str(e).splitlines()
                     if line.strip() and "no longer valid" not in line]
            why = f"DALI: {lines[-1].strip() if lines else 'cannot decode'}"
            return path, why + _why_pil_fails(path) + _what_the_file_holds(path)
    return None


def _why_pil_fails(path: str) -> str:
    """"; PIL: <its reason>" where PIL cannot decode the file either, else "". DALI's own reason
    for a truncated or corrupt JPEG is often a codec error number ("nvImageCodec failure:
    '#3'"); PIL's says what is wrong ("image file is truncated (75 bytes not processed)")."""
    from .folders import UnreadableImageError, read_rgb_image

    try:
        read_rgb_image(path)
    except UnreadableImageError as e:
        return f"; PIL: {e.__cause__ if e.__cause__ is not None else e}"
    return ""


def _what_the_file_holds(path: str) -> str:
    """"; it holds GIF data, which DALI does not decode" where PIL reads a format DALI does not
    (DALI's own reason is a codec error number), else ""."""
    from .folders import UnreadableImageError, read_image_header

    try:
        kind, _ = read_image_header(path)
    except UnreadableImageError:
        return ""
    if kind in DALI_IMAGE_FORMATS:
        return ""
    return f"; it holds {kind} data, which DALI does not decode: convert it to JPEG"


# --------------------------------------------------------------------------------------------
# Data sets.

def build_dali_loaders(dataset: str = "synthetic",
                       data_dir: Optional[Union[str, os.PathLike]] = None,
                       *, batch_size: int, eval_batch_size: Optional[int] = None, workers: int = 2,
                       device: Union[str, torch.device] = "cpu", seed: int = 0,
                       channels_last: bool = False, download: bool = False,
                       num_classes: Optional[int] = None, image_size: Optional[int] = None,
                       synthetic_size: Optional[Union[int, Tuple[int, int]]] = None,
                       rank: int = 0, world_size: int = 1, dali_device: str = "auto",
                       dtype: Union[str, torch.dtype] = torch.float32,
                       prefetch: int = 2,
                       cache_bytes: int = DEFAULT_CACHE_BYTES,
                       eval_crop_fraction: Optional[float] = None,
                       eval_only: bool = False) -> DataLoaders:
    """The DALI counterpart of :func:`fastsd.data.build_loaders`: same arguments, same data sets.

    Args (those of build_loaders, see there, plus):
        workers: DALI CPU threads per pipeline (decoding on the CPU, or the CPU part of the GPU
            pipeline); at least 1.
        dali_device: "auto" (GPU when ``device`` is CUDA and a GPU is present, else CPU), "gpu"
            ("mixed" JPEG decoding and GPU operators) or "cpu" (CPU operators, ``device_id=None``;
            the batches are then copied to ``device``).
        dtype: images as torch.float32 or torch.float16 (also "fp32" / "fp16").
        prefetch: batches each pipeline prepares ahead (DALI's prefetch_queue_depth).
        cache_bytes: an image folder split whose files fit in this many bytes (counted as files
            x the largest file) is read once and held in memory, encoded; DALI decodes it every
            epoch but reads no file: on the CIFAR-10 JPEGs (56 MB) that doubles the images/s of
            the CPU mode on 2 cores, where reading files takes the decoding threads' time. 0
            reads the files every epoch. Every process of a distributed run holds its own copy.

    Data sets: cifar10 / cifar100 from torchvision's binary layout (held in memory, fed to DALI) or
    from ``train/`` + ``test/`` JPEG folders (decoded by DALI every epoch); imagefolder (ImageNet
    layout: random-resized crop + flip, evaluation resize to size / eval_crop_fraction + centre
    crop; folders of images <= 64 pixels get the CIFAR treatment, as in the torch path);
    synthetic (in memory).

    Raises:
        ImportError: DALI is not installed (the message gives the install command).
        ValueError, FileNotFoundError: as build_loaders, checked before any pipeline is built.
        fastsd.data.UnreadableImageError: during iteration, naming a file DALI cannot decode.
    """
    require_dali()
    (name, batch_size, eval_batch_size, workers, rank, world_size, num_classes, image_size,
     device, eval_crop_fraction) = check_loader_args(
        dataset, data_dir, batch_size=batch_size, eval_batch_size=eval_batch_size,
        workers=workers, device=device, seed=seed, download=download, num_classes=num_classes,
        image_size=image_size, synthetic_size=synthetic_size, rank=rank, world_size=world_size,
        eval_crop_fraction=eval_crop_fraction)
    prefetch = check_int("prefetch", prefetch, 1)
    cache_bytes = check_int("cache_bytes", cache_bytes, 0)
    where = resolve_dali_device(dali_device, device)
    common = dict(seed=int(seed), device=device, dali_device=where, half=_half(dtype),
                  channels_last=bool(channels_last), num_threads=max(1, workers),
                  prefetch=prefetch, rank=rank, world_size=world_size)

    def loaders(train_kw, test_kw, info):
        train = (DaliEpochLoader(train=True, batch_size=batch_size, **train_kw, **common)
                 if not eval_only else None)
        test = DaliEpochLoader(train=False, batch_size=eval_batch_size, **test_kw, **common)
        return DataLoaders(train, test, info)

    def folder_loaders(train_split: ImageFolderSplit, eval_split: ImageFolderSplit, size: int,
                       small: bool, mean, std, info_name: str, pre_resize: bool):
        """small: CIFAR-style (pad crop + flip; evaluation as is), else ImageNet-style. pre_resize:
        resize every image to size x size first (small-image folders); else they are 32 x 32."""
        shared = dict(image_size=size, mean=mean, std=std,
                      resize_size=eval_resize_size(size, eval_crop_fraction),
                      native_size=size if pre_resize else 32, pre_resize=pre_resize)
        train_kw = None
        if train_split is not None:  # (None: eval_only)
            check_shard(len(train_split), batch_size, world_size, info_name)
            train_paths = [p for p, _ in train_split.samples]
            train_kw = dict(shared, paths=train_paths, labels=[y for _, y in train_split.samples],
                            augment="cifar" if small else "imagenet",
                            cache_files=_fits_in_memory(train_paths, cache_bytes))
        eval_paths = [p for p, _ in eval_split.samples]
        test_kw = dict(shared, paths=eval_paths, labels=[y for _, y in eval_split.samples],
                       augment="none" if small else "center",
                       cache_files=_fits_in_memory(eval_paths, cache_bytes))
        info = DatasetInfo(info_name, len(eval_split.classes), size, tuple(mean), tuple(std),
                           len(train_split or ()), len(eval_split), eval_split.classes)
        return loaders(train_kw, test_kw, info)

    if name == "imagefolder":
        size = image_size or 224
        train_split, eval_split = scan_train_and_eval(data_dir, num_classes, name, eval_only)
        small = size <= SMALL_IMAGE_MAX
        return folder_loaders(train_split, eval_split, size, small, IMAGENET_MEAN, IMAGENET_STD,
                              name, pre_resize=small)

    if name in CIFAR_SETS and cifar_source(name, data_dir) == "folder" and not download:
        classes, _, _, mean, std = CIFAR_SETS[name]
        if num_classes is not None and num_classes != classes:
            raise ValueError(f"{name} has {classes} classes but num_classes is {num_classes}: drop "
                             f"--num-classes or pass {classes}")
        train_split, eval_split = scan_train_and_eval(Path(data_dir).expanduser(), classes, name,
                                                      eval_only)
        # The torch path decodes such a folder into memory and so refuses an image of another
        # size up front; DALI decodes every epoch, and would crop it (training) or fail to batch
        # it (evaluation) without naming it.
        check_image_sizes([p for split in (train_split, eval_split) if split is not None
                           for p, _ in split.samples], 32, workers)
        return folder_loaders(train_split, eval_split, image_size or 32, True, mean, std, name,
                              pre_resize=False)

    x_train, y_train, x_test, y_test, classes, mean, std, size = load_in_memory(
        name, data_dir, num_classes=num_classes, image_size=image_size,
        synthetic_size=synthetic_size, download=download, workers=workers,
        batch_size=batch_size, world_size=world_size, eval_only=eval_only)
    shared = dict(image_size=size, mean=mean, std=std)
    train_kw = dict(shared, images=x_train.numpy(), labels=y_train.numpy(), augment="cifar")
    test_kw = dict(shared, images=x_test.numpy(), labels=y_test.numpy(), augment="none")
    info = DatasetInfo(name, len(classes), size, tuple(mean), tuple(std), len(y_train),
                       len(y_test), tuple(classes))
    return loaders(train_kw, test_kw, info)
