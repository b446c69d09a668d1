"""The snapshot ops of the C++/CUDA extension: ``torch.ops.fastsd.pack_tensors``.

Importing this module loads ``fastsd._C`` (which registers the op's schema and its CPU and CUDA
kernels) and registers the op's fake kernel, so that ``torch.compile(fullgraph=True)`` traces it.

``pack_tensors(srcs, dst, offsets=None)`` copies every tensor of ``srcs`` into the flat buffer
``dst``, converting on the way:

- ``srcs``: float32, float16, bfloat16 or float64 tensors of any shape and strides (transposed,
  sliced, channels_last, expanded views are fine), on ``dst``'s device.
- ``dst``: a contiguous 1-D float16, bfloat16 or float32 tensor; mutated in place.
- ``offsets``: where each source starts in ``dst``; without it the sources are laid out back to
  back from 0. Ranges must fit in ``dst`` and must not overlap; elements of ``dst`` outside them
  are left untouched. No source may read memory that ``dst`` holds (another part of the same
  storage is fine).

Source ``i`` lands in ``dst[offsets[i] : offsets[i] + srcs[i].numel()]`` in its logical row-major
order, each finite or infinite value equal bit for bit to ``srcs[i].to(dst.dtype)`` (round to
nearest even); a NaN stays a NaN, but its sign and payload bits may differ from torch's and between
the CPU and CUDA kernels (no arithmetic reads them). On CUDA the whole list is one kernel launch
on the current stream; on the CPU the work is split into equal pieces over ATen's thread pool.

For tests, ``torch.ops.fastsd._pack_tensors_cuda_emulated`` (same arguments, CPU tensors) runs the
CUDA kernel's own code on the CPU, every block and thread of the launch in turn
(csrc/snapshot_pack_kernel.h): its indexing is checked where no GPU is.
"""

import torch

from fastsd._extension import REBUILD_HINT, load_extension

load_extension()
if not hasattr(torch.ops.fastsd, "pack_tensors"):
    raise ImportError("fastsd's compiled extension fastsd._C has no op fastsd::pack_tensors: it "
                      f"was built from older sources. {REBUILD_HINT}")

PACK_DST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PACK_SRC_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@torch.library.register_fake("fastsd::pack_tensors")
def _pack_tensors_fake(srcs, dst, offsets=None):
    # The C++ kernels' checks of shapes, dtypes and offsets, so that a traced program fails at
    # trace time; whether a source reads memory that dst holds needs addresses, so only the
    # kernels check that.
    torch._check(dst.dim() == 1 and dst.is_contiguous(),
                 lambda: f"fastsd::pack_tensors: dst must be a contiguous 1-D (flat) buffer, got "
                         f"shape {tuple(dst.shape)} and strides {dst.stride()}")
    torch._check(dst.dtype in PACK_DST_DTYPES,
                 lambda: f"fastsd::pack_tensors: dst must be float16, bfloat16 or float32, "
                         f"got {dst.dtype}")
    if offsets is not None:
        torch._check(len(offsets) == len(srcs),
                     lambda: f"fastsd::pack_tensors: got {len(offsets)} offsets for "
                             f"{len(srcs)} sources")
    start = 0
    for i, src in enumerate(srcs):
        torch._check(src.dtype in PACK_SRC_DTYPES,
                     lambda: f"fastsd::pack_tensors: srcs[{i}] has dtype {src.dtype}")
        torch._check(src.device == dst.device,
                     lambda: f"fastsd::pack_tensors: srcs[{i}] is on {src.device}, dst on "
                             f"{dst.device}")
        if offsets is not None:
            start = offsets[i]
        torch._check(start >= 0, lambda: f"fastsd::pack_tensors: offsets[{i}] is negative")
        torch._check(start + src.numel() <= dst.numel(),
                     lambda: f"fastsd::pack_tensors: srcs[{i}] does not fit in dst")
        start = start + src.numel()
    if offsets is not None and all(isinstance(o, int) for o in offsets):  # not symbolic
        ranges = sorted((o, src.numel(), i) for i, (o, src) in enumerate(zip(offsets, srcs))
                        if src.numel() > 0)
        for (a, n, i), (b, _, j) in zip(ranges, ranges[1:]):
            torch._check(a + n <= b, lambda: f"fastsd::pack_tensors: the ranges of srcs[{i}] "
                                             f"and srcs[{j}] overlap in dst (offsets {a} and "
                                             f"{b}); give every source its own range")
    return None


def pack_tensors(srcs, dst, offsets=None):
    """Copy ``srcs`` into the flat buffer ``dst`` (in place), converting to ``dst.dtype``.

    See the module docstring for the exact semantics. ``srcs`` may require grad: the copy is not
    differentiable and is recorded by no autograd graph, so call it under ``torch.no_grad()``.
    """
    torch.ops.fastsd.pack_tensors(list(srcs), dst, None if offsets is None else list(offsets))
