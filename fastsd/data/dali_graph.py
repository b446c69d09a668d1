"""The DALI graphs of fastsd's input pipelines (imports DALI: load it via fastsd.data.dali).

Every random choice (sample order, crop window, flip) is drawn in numpy by fastsd.data.dali and fed
in through ``fn.external_source``; the graphs themselves hold no random operator. That is what makes
an epoch a function of (seed, epoch) alone, whatever ran before it (see fastsd/data/dali.py).

Per-sample inputs of each graph, in the order the feed returns them (B = samples in the batch):

======================  ============================================================================
source="memory"         images uint8 [B, H, W, 3]
source="files"          path tails uint8 [B, L] (``os.fsencode(path)`` after ``path_prefix``, zero
                        padded), their lengths int32 [B, 1]
source="encoded"        the files' bytes, read once and held in memory: uint8 [B, L] zero padded,
                        their lengths int32 [B, 1]
augment="cifar"         + anchor int32 [B, 2]: (x, y) of the crop in the unpadded image, in
                        [-pad, pad]; flip int32 [B]
augment="imagenet"      + area float32 [B, K], ratio float32 [B, K], uv float32 [B, 2] in [0, 1);
                        flip int32 [B] (K candidate crops: torchvision's RandomResizedCrop
                        attempts)
augment="none"          nothing more: normalise only (CIFAR evaluation)
augment="center"        nothing more: resize the shorter side, centre crop (ImageNet evaluation)
======================  ============================================================================

Output: one batch of images, float32 or float16, normalised, "CHW" or "HWC" per sample.
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import Pipeline

from .catalog import RRC_RATIO

__all__ = ["GraphSpec", "define_pipeline", "build_pipeline", "build_probe_pipeline",
           "random_resized_crop_window", "center_crop_position", "RRC_ATTEMPTS"]

#: candidate crops per sample, as torchvision's RandomResizedCrop.get_params tries
RRC_ATTEMPTS = 10


@dataclass(frozen=True)
class GraphSpec:
    source: str                        #: "memory" (uint8 HWC arrays), "files" (paths) or "encoded"
    #: (the files' bytes in memory); DALI decodes the last two
    augment: str                       #: "cifar", "imagenet", "none" or "center" (module doc)
    image_size: int                    #: output side (square)
    resize_size: int                   #: shorter side before the centre crop ("center" only)
    native_size: int                   #: "cifar"/"none": side of the stored images (crop size)
    pre_resize: bool                   #: "cifar"/"none": resize decoded images to image_size first
    mean: Tuple[float, float, float]   #: [0, 1] pixel units
    std: Tuple[float, float, float]
    device: str                        #: "cpu" or "gpu"
    half: bool                         #: float16 output (else float32)
    channels_last: bool                #: "HWC" per sample (else "CHW")
    pad: int = 4                       #: "cifar": zero padding of the random crop
    path_prefix: bytes = b""           #: "files": the folder every path starts with


def _decode(data, spec: GraphSpec, start=None, size=None):
    """JPEG (or any image) bytes -> uint8 HWC RGB, on the GPU with device="mixed"."""
    # torchvision's ImageFolder loader (PIL) ignores EXIF orientation: so must we, or the pixels
    # differ. PIL and DALI's CPU decoder (libjpeg-turbo) interpolate subsampled chroma ("fancy
    # upsampling"); the GPU decoder uses a cruder one unless told otherwise, which can move colour
    # edges by tens of levels on the 4:2:0 CIFAR JPEGs.
    args = dict(output_type=types.RGB, adjust_orientation=False)
    if spec.device == "gpu":
        args.update(device="mixed", jpeg_fancy_upsampling=True)
    else:
        args.update(device="cpu")
    if start is None:
        return fn.decoders.image(data, **args)
    return fn.decoders.image_slice(data, start, size, **args)


def _round(x):
    # torchvision rounds with Python's round(); ties are measure-zero
    # for the square roots rounded here
    return dmath.floor(x + 0.5)


def random_resized_crop_window(hw_shape, area, ratio, uv):
    """torchvision's RandomResizedCrop.get_params in DALI arithmetic, on given random numbers.

    ``hw_shape``: float [>=2] (H, W, ...) of the encoded image (``fn.peek_image_shape``).
    ``area``: float [K], fraction of the image area, uniform in [0.08, 1); ``ratio``: float [K],
    aspect ratio w/h, log-uniform in [3/4, 4/3); ``uv``: float [2] in [0, 1). The first of the K
    candidates that fits wins, its corner drawn from ``uv``; if none fits, the central crop of the
    clamped aspect ratio, as torchvision does. Returns ``(start, size)``: int32 [2] each, in
    (x, y) / (w, h) order.
    """
    h_img, w_img = hw_shape[0], hw_shape[1]
    target = h_img * w_img * area
    w = _round(dmath.sqrt(target * ratio))
    h = _round(dmath.sqrt(target / ratio))
    fits = (w <= w_img) & (h <= h_img) & (w >= 1.0) & (h >= 1.0)
    # pick the *first* candidate that fits: score K, K-1, ..., 1 for fitting candidates, 0 otherwise
    rank = types.Constant(np.arange(RRC_ATTEMPTS, 0, -1, dtype=np.float32))
    score = fits * rank
    best = fn.reductions.max(score)
    found = best > 0.0
    chosen = (score == best) & found
    w_found = fn.reductions.sum(chosen * w)
    h_found = fn.reductions.sum(chosen * h)
    in_ratio = w_img / h_img
    lo, hi = RRC_RATIO
    w_fallback = _round(h_img * hi) * (in_ratio > hi) + w_img * (in_ratio <= hi)
    h_fallback = _round(w_img / lo) * (in_ratio < lo) + h_img * (in_ratio >= lo)
    missed = 1.0 - found
    cw = found * w_found + missed * w_fallback
    ch = found * h_found + missed * h_fallback
    x = found * dmath.floor(uv[0] * (w_img - cw + 1.0)) + missed * dmath.floor((w_img - cw) * 0.5)
    y = found * dmath.floor(uv[1] * (h_img - ch + 1.0)) + missed * dmath.floor((h_img - ch) * 0.5)
    start = fn.cast(fn.stack(x, y), dtype=types.INT32)
    size = fn.cast(fn.stack(cw, ch), dtype=types.INT32)
    return start, size


def center_crop_position(extent, crop: int):
    """crop_pos for fn.crop / crop_mirror_normalize giving torchvision CenterCrop's corner.

    torchvision takes ``int(round((extent - crop) / 2))`` with Python's round (half to even); DALI
    computes the corner as ``crop_pos * (extent - crop)`` and rounds it. Aim a quarter pixel past
    the wanted integer corner, so both rounding to nearest and truncation land on it.
    """
    d = extent - float(crop)
    half = dmath.floor(d * 0.5)
    d_odd = d - 2.0 * half
    half_odd = half - 2.0 * dmath.floor(half * 0.5)
    corner = half + d_odd * half_odd              # x.5 rounds to the even neighbour
    return (corner + 0.25) / dmath.max(d, 1.0)


def _graph(spec: GraphSpec, feed: Callable):
    is_gpu = spec.device == "gpu"
    n_aug = {"cifar": 2, "imagenet": 4, "none": 0, "center": 0}[spec.augment]
    n_data = 1 if spec.source == "memory" else 2
    inputs = list(fn.external_source(source=feed, num_outputs=n_data + n_aug, batch=True,
                                     parallel=False))
    if spec.source == "memory":
        data = inputs[0]
    else:
        data = fn.slice(inputs[0], np.array([0], dtype=np.int32), inputs[1], axes=[0])
        if spec.source == "files":
            if spec.path_prefix:
                prefix = types.Constant(np.frombuffer(spec.path_prefix, dtype=np.uint8).copy(),
                                        dtype=types.UINT8)
                data = fn.cat(prefix, data, axis=0)
            data = fn.io.file.read(data)  # from the encoded path of each sample
    inputs = [data] + inputs[n_data:]
    flip = 0
    crop_args = {}

    if spec.source == "memory":
        images = fn.reshape(data, layout="HWC")
        if is_gpu:
            images = images.gpu()
    elif spec.augment == "imagenet":      # data: the encoded images (JPEG or other bytes)
        area, ratio, uv, flip = inputs[1:]
        shape = fn.peek_image_shape(data, dtype=types.FLOAT, adjust_orientation=False)
        start, window = random_resized_crop_window(shape, area, ratio, uv)
        images = _decode(data, spec, start, window)    # decodes only the window where it can
    else:
        if spec.augment == "center":
            shape = fn.peek_image_shape(data, dtype=types.FLOAT, adjust_orientation=False)
        images = _decode(data, spec)

    size = [spec.image_size, spec.image_size]
    if spec.augment in ("cifar", "none"):
        side = spec.native_size
        if spec.pre_resize:          # small-image folders: every image to the training size first
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            side = spec.image_size
        if spec.augment == "cifar":
            anchor, flip = inputs[1:]
            # torchvision RandomCrop(padding=pad) pads with zeros before normalising: slice past
            # the edges of the unpadded image
            # (a bare numpy shape would become a GPU constant next to GPU images)
            crop_shape = types.Constant(np.array([side, side], dtype=np.int32), device="cpu")
            images = fn.slice(images, anchor, crop_shape, axis_names="WH",
                              out_of_bounds_policy="pad", fill_values=0)
        if side != spec.image_size:  # CIFAR asked at another size: resize the crop, in float
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True,
                               dtype=types.FLOAT)
    elif spec.augment == "imagenet":
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    elif spec.augment == "center":
        h_img, w_img = shape[0], shape[1]
        short = dmath.min(h_img, w_img)
        # torchvision Resize(int): the shorter side becomes resize_size, the longer is truncated
        new_h = dmath.floor(float(spec.resize_size) * h_img / short)
        new_w = dmath.floor(float(spec.resize_size) * w_img / short)
        images = fn.resize(images, resize_x=new_w, resize_y=new_h,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        crop_args = dict(crop=(spec.image_size, spec.image_size),
                         crop_pos_x=center_crop_position(new_w, spec.image_size),
                         crop_pos_y=center_crop_position(new_h, spec.image_size))

    return fn.crop_mirror_normalize(
        images, mirror=flip,
        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
        dtype=types.FLOAT16 if spec.half else types.FLOAT,
        output_layout="HWC" if spec.channels_last else "CHW",
        **crop_args)


def define_pipeline(spec: GraphSpec, feed: Callable, *, batch_size: int, num_threads: int,
                    device_id, prefetch: int, seed: int) -> Pipeline:
    """The pipeline of ``spec``, defined but not built; its only output is the image batch.

    Defining runs DALI's own checks of the graph (argument names, and which device each input of
    each operator may come from), and ``Pipeline.serialize()`` needs no GPU: so the GPU graphs
    can be checked on a machine without one (``device_id=None``), see tests/test_dali.py.
    """
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=prefetch)
    with pipe:
        pipe.set_outputs(_graph(spec, feed))
    return pipe


def build_pipeline(spec: GraphSpec, feed: Callable, **kwargs) -> Pipeline:
    """:func:`define_pipeline`, built: ``feed()`` is called once per batch from ``pipe.run()``."""
    pipe = define_pipeline(spec, feed, **kwargs)
    pipe.build()
    return pipe


def build_probe_pipeline(feed: Callable, peek: bool) -> Pipeline:
    """Decode one encoded image per run on the CPU: finds which file of a failed batch is bad."""
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:
        raw = fn.external_source(source=feed, batch=True, parallel=False)
        out = [fn.decoders.image(raw, device="cpu", output_type=types.RGB,
                                 adjust_orientation=False)]
        if peek:
            out.append(fn.peek_image_shape(raw, adjust_orientation=False))
        pipe.set_outputs(*out)
    pipe.build()
    return pipe
