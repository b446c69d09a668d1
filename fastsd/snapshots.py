"""Teacher snapshots as half-precision copies of a model: :class:`SnapshotStore`.

Snapshot Distillation keeps the last snapshot of each cycle as the teacher of the next cycle, and
Snapshot Ensembles keep every cycle's snapshot. A :class:`SnapshotStore` holds ``capacity`` such
snapshots of one architecture in memory preallocated once, in half precision, and hands each out
as a ready-to-run ``nn.Module`` whose weights live in the store (no copy, no disk round trip).

Typical use in a training loop (SD)::

    store = SnapshotStore(model, capacity=1, dtype=torch.float16)   # after model.to(device)
    ...
    if end_of_cycle:
        store.capture(model)                      # into the preallocated slot, async on CUDA
    ...
    if store.filled_slots:                        # from the second cycle on
        teacher_logits = store.logits(images, slot=0)      # fp16 logits, no autograd graph
        # the same as:  with torch.no_grad(): store.teacher(0)(images.to(store.dtype))
        loss = distill_loss(student_logits, labels, teacher_logits, temperature=T, ...)

Snapshot Ensembles: ``store = SnapshotStore(model, capacity=M)``, ``store.capture(model)`` at the
end of each cycle (a ring: capture M+1 overwrites the oldest snapshot), and
``store.ensemble_probs(images)`` for the averaged softmax.

Checkpoints: ``checkpoint["snapshots"] = store.state_dict()`` and
``store.load_state_dict(checkpoint["snapshots"])`` on a store built for the same model restores
every slot bit for bit (``torch.load(..., weights_only=True)`` can read it).
"""

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastsd.ops.snapshot import PACK_SRC_DTYPES, pack_tensors

__all__ = ["SnapshotStore"]

# 2: the structure records each tensor's memory layout (1 did not, and so loaded a channels_last
# store's slots into a contiguous one's, scrambling them); version 1 is still read.
_FORMAT_VERSION = 2
_HALF_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Offsets inside a slot are multiples of 64 bytes, so every teacher tensor is as aligned as a
# fresh allocation would be for vectorised kernels (cuDNN, Triton and Inductor check alignment).
_ALIGN_BYTES = 64
# Regions of a slot: "half" holds weights in the store's dtype; "float" holds everything of the
# normalisation layers that keep running statistics, in float32; "exact" holds non-floating
# tensors (num_batches_tracked) unchanged.
_REGIONS = ("half", "float", "exact")


@dataclass(frozen=True)
class _Entry:
    """Where one parameter or buffer of the model lives in a slot."""

    name: str                       # qualified name in the model (model.named_parameters())
    kind: str                       # "parameter" or "buffer"
    region: str                     # one of _REGIONS
    shape: Tuple[int, ...]
    stride: Optional[Tuple[int, ...]]  # strides of the teacher's tensor: the model's layout
    perm: Optional[Tuple[int, ...]]  # dims outermost-to-innermost in memory, None if contiguous
    offset: int                     # first element in the region ("half" and "float")
    numel: int
    dtype: torch.dtype              # the model's dtype when the store was built

    def describe(self):
        """name, kind, region, shape, dtype, layout (dims outermost-to-innermost in memory, or
        None for contiguous): what two stores must agree on to share their slots' bytes."""
        return [self.name, self.kind, self.region, list(self.shape), str(self.dtype),
                None if self.perm is None else list(self.perm)]


def _check_pack_kernel_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Packs one element on ``device``. A registered CUDA kernel may still hold no machine code
    for this GPU (fastsd._C built for other chips), and the launch is what says so: better at the
    store's construction than at its first capture, a cycle's end hours into a run."""
    try:
        pack_tensors([torch.zeros(1, device=device)], torch.empty(1, dtype=dtype, device=device),
                     [0])
    except RuntimeError as err:
        if "no kernel image" not in str(err):
            raise
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(
            f"fastsd._C holds no CUDA kernel for this GPU ({torch.cuda.get_device_name(device)}, "
            f"sm_{major}{minor}), so snapshots cannot be kept on {device}: rebuild it for this "
            f"GPU, e.g. TORCH_CUDA_ARCH_LIST={major}.{minor} FASTSD_BUILD=cuda pip install "
            f"--no-build-isolation -e .") from err


def _unwrap(model):
    """The module whose parameters are the model's: looks through torch.compile, DDP and DP."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    while True:
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _layout(t):
    """How ``t`` is kept in a slot: ``(perm, stride)``. ``stride`` is the teacher tensor's: the
    model's own strides whenever they describe a dense tensor (channels_last, transposed, ...),
    so the teacher has exactly the model's layout, size-1 dims included; ``perm`` lists the dims
    from outermost to innermost in memory (None: row-major order already is memory order), so
    that the pack op, which writes row-major order, fills memory in the right order."""
    if t.is_contiguous():
        return None, tuple(t.stride())
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    if t.permute(perm).is_contiguous():
        return perm, tuple(t.stride())
    return None, _contiguous_strides(t.shape)  # overlapping or with gaps: kept contiguous


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _check_packable(kind: str, name: str, t: torch.Tensor) -> None:
    """Floating-point tensors are converted by the pack op, which reads these dtypes only."""
    if t.is_floating_point() and t.dtype not in PACK_SRC_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in PACK_SRC_DTYPES)
        raise ValueError(f"{kind} '{name}' has dtype {t.dtype}, which SnapshotStore cannot "
                         f"convert (it reads {names}): keep the model in one of those, e.g. "
                         f"model.float()")


def _normalisation_tensor_ids(model):
    """ids of the parameters and buffers of layers with running statistics (BatchNorm*d,
    SyncBatchNorm, InstanceNorm*d with track_running_stats, and any layer that keeps
    running_mean and running_var buffers, as torchvision's FrozenBatchNorm2d does): they are
    kept in float32."""
    ids = set()
    for module in model.modules():
        own_buffers = dict(module.named_buffers(recurse=False))
        if isinstance(module, nn.modules.batchnorm._NormBase) or \
                {"running_mean", "running_var"} <= own_buffers.keys():
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                ids.add(id(t))
    return ids


def _align(n, dtype):
    step = _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    return (n + step - 1) // step * step


def _is_weight_hook(hook) -> bool:
    """A forward pre-hook that computes a module's weight from its parameters before every
    forward (the old weight_norm, spectral_norm, torch.nn.utils.prune)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def drop_user_hooks(model: nn.Module) -> None:
    """Remove the forward and backward hooks a deep copy of ``model`` took over from it (feature
    taps, activation loggers, FLOP counters put on the student): a teacher running them would
    overwrite what they recorded of the student. Hooks that compute weights stay
    (:func:`_is_weight_hook`): without them the module would run other weights."""
    for module in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            hooks = getattr(module, attr, {})
            for key in [k for k, hook in hooks.items() if not _is_weight_hook(hook)]:
                del hooks[key]
                for flags in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(module, flags, {}).pop(key, None)


def copy_without_user_hooks(model: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """``copy.deepcopy(model, memo)`` with :func:`drop_user_hooks` applied: the module tree a
    teacher is made of. A weight that a weight hook computes is a plain attribute and no graph
    leaf once the student has run with grad, which deepcopy refuses: the copy gets it on the
    meta device (no memory), as its own hook computes it again before every forward."""
    memo = dict(memo or {})
    for module in model.modules():
        if any(_is_weight_hook(h) for h in module._forward_pre_hooks.values()):
            for value in vars(module).values():
                if isinstance(value, torch.Tensor) and id(value) not in memo:
                    memo[id(value)] = torch.empty_like(value.detach(), device="meta")
    copied = copy.deepcopy(model, memo)
    drop_user_hooks(copied)
    return copied


class SnapshotStore:
    """``capacity`` half-precision snapshots of one model, each usable as a teacher module.

    Args:
        model: the network to snapshot (an ``nn.Module``; ``torch.compile``, DDP and
            DataParallel wrappers are looked through). Only its structure (names, shapes,
            strides, dtypes of its parameters and buffers) is recorded here; call
            :meth:`capture` to copy its weights.
        capacity: number of slots (>= 1): 1 for SD, the number of cycles for Snapshot Ensembles.
        dtype: ``torch.float16`` (default; the GPU choice) or ``torch.bfloat16`` (the CPU choice,
            see "On the CPU" below); the strings ``"float16"``/``"bfloat16"`` are accepted.
        device: where the slots live; default: the device of the model's first parameter.

    What a slot holds (all allocated once, here):

    - every floating-point parameter and buffer in ``dtype`` (2 bytes per element), each in the
      memory layout the model had when the store was built (channels_last weights stay
      channels_last), at 64-byte aligned offsets of one flat buffer per slot;
    - the parameters and running statistics of BatchNorm-type layers (any
      ``nn.modules.batchnorm._NormBase``: BatchNorm*d, SyncBatchNorm, tracked InstanceNorm; and
      any layer with ``running_mean`` and ``running_var`` buffers, such as torchvision's
      FrozenBatchNorm2d) in **float32**. Why: ``running_var`` can exceed float16's range
      (65504) or fall below its normal range, and bfloat16 keeps only 8 bits of it; these
      tensors are 0.5 % (ResNet-152) to 1 % (ResNet-20) of a ResNet's elements, so float32
      costs little. Keeping the layer's weight and bias in float32 too is what lets the teacher
      run: BatchNorm kernels accept half activations with all-float32 parameters (the mode
      autocast uses, on CPU and CUDA), but the CPU kernel rejects half weights with float32
      statistics;
    - non-floating buffers (``num_batches_tracked``) unchanged.

    Weights that a forward pre-hook computes from parameters (the old ``weight_norm``,
    ``spectral_norm``, ``torch.nn.utils.prune``) are not stored: the teacher keeps the hook and
    computes them from the slot's parameters, as the model does. The model's other hooks
    (feature taps, loggers) are not run by teachers.

    Memory: :attr:`nbytes` (all slots), :attr:`slot_nbytes` (one slot), and :meth:`memory_report`.

    Calling a teacher: the teacher's weights are ``dtype`` and it expects its input in ``dtype``
    (the way ``model.half()`` would). Recommended::

        with torch.no_grad():
            t_logits = store.teacher(slot)(x.to(store.dtype))   # == store.logits(x, slot)

    ``x.to(dtype)`` keeps channels_last. Logits come back in ``dtype``; the fused distillation
    loss takes them as they are (it computes in float32). Autocast works on CUDA too
    (``torch.autocast("cuda", dtype=store.dtype)``, then casting x is not needed) but not across
    dtypes: a float16 teacher under a bfloat16 autocast would convert every weight on each call.
    Do not call a teacher under ``torch.inference_mode()`` if its output feeds a loss that is
    differentiated: inference tensors cannot be saved for backward (``torch.no_grad()`` is fine).

    On the CPU (torch 2.14): convolution (contiguous and channels_last), linear, pooling and
    BatchNorm (half input with float32 parameters) all run in float16 and in bfloat16, and
    ``torch.compile`` compiles the teacher (both tested). Speed differs: on an AVX512-BF16 CPU
    without float16 arithmetic (no AVX512-FP16/AMX-FP16), a float16 CIFAR ResNet-20 ran 2-7x
    slower than float32, a bfloat16 one as fast or up to ~1.9x faster (bench/bench_snapshots.py):
    use ``dtype=torch.bfloat16`` on the CPU. Running BatchNorm with float16 weights and float32
    statistics fails on the CPU ("expected scalar type Half but found Float"), which is why the
    BatchNorm weights are float32 here as well.

    Errors: a model whose parameters or buffers differ from the store's (names, shapes, kinds),
    a slot out of range, a teacher for an empty slot, a dtype that is not float16/bfloat16, or a
    model on another device than the store each raise ValueError/RuntimeError naming the
    offending item and what to do.
    """

    def __init__(self, model: nn.Module, capacity: int = 1, dtype=torch.float16, device=None):
        model = _unwrap(model)
        self.dtype = self._check_dtype(dtype)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1 (the number of snapshots to keep), "
                             f"got {capacity!r}")
        self.capacity = capacity
        if device is None:
            first = next(iter(model.parameters()), None)
            if first is None:
                first = next(iter(model.buffers()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type != "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "fastsd::pack_tensors", self.device.type.upper()):
            # now, not at the first capture: in a training run that is a cycle's end, hours in
            raise RuntimeError(
                f"fastsd._C was built without {self.device.type.upper()} kernels, so snapshots "
                f"cannot be kept on {self.device}: rebuild it with the CUDA toolkit, e.g. "
                f"FASTSD_BUILD=cuda CUDA_HOME=/usr/local/cuda pip install --no-build-isolation "
                f"-e .")
        if self.device.type == "cuda":
            _check_pack_kernel_runs(self.device, self.dtype)

        self._entries = self._plan(model)
        self._params = [e for e in self._entries if e.kind == "parameter"]
        self._buffers = [e for e in self._entries if e.kind == "buffer"]
        sizes = {"half": 0, "float": 0}
        for e in self._entries:
            if e.region in sizes:
                sizes[e.region] = max(sizes[e.region], e.offset + e.numel)
        # Not inference tensors even when the store is built under torch.inference_mode():
        # those could never be captured into outside it.
        with torch.inference_mode(False):
            self._half = torch.zeros(capacity, _align(sizes["half"], self.dtype),
                                     dtype=self.dtype, device=self.device)
            self._float = torch.zeros(capacity, _align(sizes["float"], torch.float32),
                                      dtype=torch.float32, device=self.device)
            self._exact: Dict[str, torch.Tensor] = {
                e.name: torch.zeros((capacity,) + e.shape, dtype=e.dtype, device=self.device)
                for e in self._entries if e.region == "exact"}
        # what capture() passes to the pack op, per region, in entry order
        self._order = {r: [i for i, e in enumerate(self._entries) if e.region == r]
                       for r in _REGIONS}
        self._offsets = {r: [self._entries[i].offset for i in self._order[r]]
                         for r in ("half", "float")}
        self._skeleton, self._skeleton_tensors = self._make_skeleton(model)
        self._filled = [False] * capacity
        self._next = 0
        self._teachers: List[Optional[nn.Module]] = [None] * capacity

    # ---------------------------------------------------------------------------- construction
    @staticmethod
    def _check_dtype(dtype):
        if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _HALF_DTYPES:
            return _HALF_DTYPES[dtype.lower().removeprefix("torch.")]
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
        raise ValueError(f"SnapshotStore keeps snapshots in half precision: dtype must be "
                         f"torch.float16 or torch.bfloat16, got {dtype!r} (float16 for GPUs, "
                         f"bfloat16 for CPUs or where float16's range is too small)")

    def _plan(self, model):
        norm_ids = _normalisation_tensor_ids(model)
        used = {"half": 0, "float": 0}
        entries = []
        named = [("parameter", n, t) for n, t in model.named_parameters()]
        named += [("buffer", n, t) for n, t in model.named_buffers()]
        for kind, name, t in named:
            _check_packable(kind, name, t)
            if t.is_floating_point():
                region = "float" if id(t) in norm_ids else "half"
            else:
                region = "exact"
            perm, stride = _layout(t) if region != "exact" else (None, None)
            offset = 0
            if region != "exact":
                offset = used[region]
                store_dtype = self.dtype if region == "half" else torch.float32
                used[region] = _align(offset + t.numel(), store_dtype)
            entries.append(_Entry(name=name, kind=kind, region=region, shape=tuple(t.shape),
                                  stride=stride, perm=perm, offset=offset, numel=t.numel(),
                                  dtype=t.dtype))
        return entries

    @staticmethod
    def _make_skeleton(model):
        """A copy of the model's module tree whose tensors are on the meta device (no memory):
        the template every teacher is deep-copied from."""
        memo = {}
        for _, p in model.named_parameters():
            memo[id(p)] = nn.Parameter(
                torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta"),
                requires_grad=False)
        for _, b in model.named_buffers():
            memo[id(b)] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="meta")
        skeleton = copy_without_user_hooks(model, memo)
        tensors = dict(skeleton.named_parameters())
        tensors.update(dict(skeleton.named_buffers()))
        return skeleton, tensors

    # ---------------------------------------------------------------------------- checks
    def _check_slot(self, slot):
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int in [0, {self.capacity}), got {slot!r}")
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is out of range: this store has {self.capacity} "
                             f"slot(s), 0..{self.capacity - 1} (create it with a larger "
                             f"capacity to keep more snapshots)")
        return slot

    def _check_filled(self, slot):
        self._check_slot(slot)
        if not self._filled[slot]:
            filled = self.filled_slots
            raise RuntimeError(f"slot {slot} is empty: call store.capture(model, slot={slot}) "
                               f"before using it (filled slots: {filled if filled else 'none'})")
        return slot

    def _model_tensors(self, model):
        """The model's parameters and buffers in entry order, after checking that the model has
        the structure the store was built for."""
        model = _unwrap(model)
        found = [("parameter", n, t) for n, t in model.named_parameters()]
        found += [("buffer", n, t) for n, t in model.named_buffers()]
        if len(found) != len(self._entries) or any(
                (k, n) != (e.kind, e.name) for (k, n, _), e in zip(found, self._entries)):
            ours = {(e.kind, e.name) for e in self._entries}
            theirs = {(k, n) for k, n, _ in found}
            missing = sorted(n for k, n in ours - theirs)
            extra = sorted(n for k, n in theirs - ours)
            detail = (f"missing {missing[:5]}" if missing else "") + (
                ("; " if missing else "") + f"unexpected {extra[:5]}" if extra else "")
            raise ValueError(
                f"the model's structure differs from the one this SnapshotStore was built for "
                f"({detail or 'parameters or buffers in a different order'}): capture only "
                f"models of the same architecture, or build a new SnapshotStore for this one")
        tensors = []
        for (_, name, t), e in zip(found, self._entries):
            if tuple(t.shape) != e.shape:
                raise ValueError(
                    f"{e.kind} '{name}' has shape {tuple(t.shape)} but the store was built for "
                    f"{e.shape}: the model differs from the store's (another width or number of "
                    f"classes?); build a new SnapshotStore for this model")
            if (e.region == "exact") != (not t.is_floating_point()) or (
                    e.region == "exact" and t.dtype != e.dtype):
                raise ValueError(f"{e.kind} '{name}' has dtype {t.dtype} but the store was "
                                 f"built for {e.dtype}; build a new SnapshotStore for this model")
            _check_packable(e.kind, name, t)
            if t.device != self.device:
                raise ValueError(f"{e.kind} '{name}' is on {t.device} but the store is on "
                                 f"{self.device}: capture the model on the store's device, or "
                                 f"build the store with device={str(t.device)!r}")
            tensors.append(t)
        return tensors

    # ---------------------------------------------------------------------------- public API
    @property
    def filled_slots(self) -> List[int]:
        """Indices of the slots that hold a snapshot, in increasing order."""
        return [i for i, f in enumerate(self._filled) if f]

    @property
    def nbytes(self) -> int:
        """Bytes held by all slots: ``dtype`` weights + float32 BatchNorm tensors + the rest."""
        return (self._half.nbytes + self._float.nbytes
                + sum(t.nbytes for t in self._exact.values()))

    @property
    def slot_nbytes(self) -> int:
        """Bytes held by one slot."""
        return self.nbytes // self.capacity

    def memory_report(self) -> Dict[str, int]:
        """Element and byte counts of one slot, by what they hold."""
        half = [e for e in self._entries if e.region == "half"]
        flt = [e for e in self._entries if e.region == "float"]
        return {
            "half_elements": sum(e.numel for e in half),
            "half_bytes": self._half[0].nbytes,
            "float32_elements": sum(e.numel for e in flt),
            "float32_bytes": self._float[0].nbytes,
            "exact_bytes": sum(t[0].nbytes for t in self._exact.values()),
            "slot_bytes": self.slot_nbytes,
            "slots": self.capacity,
            "total_bytes": self.nbytes,
        }

    def capture(self, model: nn.Module, slot: Optional[int] = None) -> int:
        """Copy the model's current parameters and buffers into a slot; return its index.

        Args:
            model: a model of the architecture the store was built for, on the store's device
                (train or eval mode alike; it is not modified).
            slot: the slot to overwrite; None takes the next slot of the ring (0, 1, ...,
                capacity - 1, 0, ...). An explicit slot does not move the ring.

        No slot memory is allocated (on CUDA the pack op only takes its few-KB launch table from
        the caching allocators): one kernel launch for the ``dtype`` weights, one for the float32
        BatchNorm tensors and one ``_foreach_copy_`` for integer buffers, all on the current
        stream, without host synchronisation. Host cost: about 2 ms of Python for ResNet-152's
        932 tensors (the structure check walks the model each time). Not CUDA-graph
        capturable (the launch table is copied from pinned host memory). A teacher already built
        for the slot sees the new weights at once (it is a view of the slot).
        """
        tensors = self._model_tensors(model)
        ring = slot is None
        if ring:
            slot = self._next
        else:
            self._check_slot(slot)
        with torch.no_grad():
            for region, buffer in (("half", self._half), ("float", self._float)):
                srcs = []
                for i in self._order[region]:
                    t, perm = tensors[i], self._entries[i].perm
                    # the pack op writes in row-major order: walk the tensor in memory order
                    srcs.append(t if perm is None else t.permute(perm))
                if srcs:
                    pack_tensors(srcs, buffer[slot], self._offsets[region])
            if self._order["exact"]:
                dsts = [self._exact[self._entries[i].name][slot] for i in self._order["exact"]]
                torch._foreach_copy_(dsts, [tensors[i] for i in self._order["exact"]])
        self._filled[slot] = True
        if ring:   # only once the copy was accepted: a refused capture leaves the ring as it was
            self._next = (slot + 1) % self.capacity
        return slot

    def _view(self, entry, slot):
        if entry.region == "exact":
            return self._exact[entry.name][slot]
        row = (self._half if entry.region == "half" else self._float)[slot]
        return row.as_strided(entry.shape, entry.stride, row.storage_offset() + entry.offset)

    def teacher(self, slot: int) -> nn.Module:
        """The snapshot in ``slot`` as a module: the model's architecture in eval mode, whose
        parameters and buffers are views into the slot (no copy of the weights), with
        ``requires_grad`` off and the model's memory format.

        Built on first use and kept: later captures into the slot update it in place, so the
        same module (and anything compiled from it) always runs the slot's latest snapshot.
        Input must be in ``store.dtype`` (see the class docstring); outputs are ``store.dtype``.
        """
        self._check_filled(slot)
        teacher = self._teachers[slot]
        if teacher is None:
            memo = {}
            for e in self._entries:
                view = self._view(e, slot)
                if e.kind == "parameter":
                    view = nn.Parameter(view, requires_grad=False)
                memo[id(self._skeleton_tensors[e.name])] = view
            teacher = copy.deepcopy(self._skeleton, memo)
            teacher.requires_grad_(False)
            teacher.eval()
            self._teachers[slot] = teacher
        elif teacher.training:
            teacher.eval()
        return teacher

    def logits(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """``store.teacher(slot)(x.to(store.dtype))`` under ``torch.no_grad()``.

        x: the batch as the student gets it, e.g. [B, 3, H, W] float images (any float dtype,
        any memory format). Returns the teacher's output in ``store.dtype``, e.g. [B, C].
        """
        teacher = self.teacher(slot)
        with torch.no_grad():
            return teacher(x.to(self.dtype) if x.is_floating_point() else x)

    def ensemble_probs(self, x: torch.Tensor, slots: Optional[Sequence[int]] = None
                       ) -> torch.Tensor:
        """Mean of the snapshots' softmax outputs (Snapshot Ensembles), float32 [B, C].

        x: a batch, as for :meth:`logits`. slots: which snapshots; default all filled slots.
        """
        if slots is None:
            slots = self.filled_slots
            if not slots:
                raise RuntimeError("no snapshot to ensemble: the store is empty; call "
                                   "store.capture(model) first")
        slots = list(slots)
        if not slots:
            raise ValueError("ensemble_probs(slots=[]): give at least one slot, or None for "
                             "every filled one")
        for s in slots:
            self._check_filled(s)
        total = None
        with torch.no_grad():
            for s in slots:
                probs = torch.softmax(self.logits(x, s).float(), dim=-1)
                total = probs if total is None else total.add_(probs)
        return total.div_(len(slots))

    # ---------------------------------------------------------------------------- checkpoints
    def _structure(self):
        return [e.describe() for e in self._entries]

    def state_dict(self) -> dict:
        """Everything needed to restore every slot exactly: the slot tensors (not copies, as
        ``nn.Module.state_dict``), which slots are filled, the ring position, and a description
        of the model structure to check against on load. Only tensors, ints, bools, strings
        and lists: readable with ``torch.load(weights_only=True)``."""
        return {
            "format_version": _FORMAT_VERSION,
            "dtype": str(self.dtype).removeprefix("torch."),
            "capacity": self.capacity,
            "structure": self._structure(),
            "half": self._half,
            "float": self._float,
            "exact": dict(self._exact),
            "filled": list(self._filled),
            "next": self._next,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the slots from :meth:`state_dict` of a store built for the same model with
        the same capacity and dtype (tensors may come from another device). Copies into the
        existing memory, so teachers already built stay valid."""
        if not isinstance(state, dict) or "format_version" not in state:
            raise ValueError("not a SnapshotStore state dict (no 'format_version' key): pass "
                             "what SnapshotStore.state_dict() returned")
        if state["format_version"] == 1:
            # Format 1 kept each tensor in its model's memory layout without saying which, so
            # its bytes would land scrambled, without an error, in a store of another layout.
            raise ValueError("SnapshotStore state dict format 1 recorded no memory layouts, so "
                             "its slots cannot be placed safely: capture the snapshots again "
                             "with this version of fastsd")
        if state["format_version"] != _FORMAT_VERSION:
            raise ValueError(f"SnapshotStore state dict format {state['format_version']} is not "
                             f"supported (this version reads format {_FORMAT_VERSION})")
        theirs = _HALF_DTYPES.get(state["dtype"])
        if theirs != self.dtype:
            raise ValueError(f"the checkpoint's snapshots are {state['dtype']} but this store "
                             f"keeps {str(self.dtype).removeprefix('torch.')}: build the store "
                             f"with dtype=torch.{state['dtype']}")
        if state["capacity"] != self.capacity:
            raise ValueError(f"the checkpoint holds {state['capacity']} slot(s) but this store "
                             f"{self.capacity}: build the store with "
                             f"capacity={state['capacity']}")
        ours = self._structure()

        def comparable(entry):
            # a floating-point tensor's bytes in a slot are the store's dtype (or float32),
            # whatever the model's: only integer buffers, kept as they are, must agree on it
            return entry[:4] + [entry[4] if entry[2] == "exact" else "floating"] + entry[5:]

        theirs_s = state["structure"]
        if [comparable(e) for e in theirs_s] != [comparable(e) for e in ours]:
            for a, b in zip(theirs_s, ours):
                if comparable(a)[:5] != comparable(b)[:5]:
                    raise ValueError(f"the checkpoint's snapshots are of another model: it has "
                                     f"{a[1]} '{a[0]}' {tuple(a[3])} ({a[4]}) where this store "
                                     f"has {b[1]} '{b[0]}' {tuple(b[3])} ({b[4]}); build the "
                                     f"store for the checkpoint's architecture")
            if len(theirs_s) != len(ours):
                raise ValueError(f"the checkpoint's snapshots are of another model: it has "
                                 f"{len(theirs_s)} parameters and buffers where this store has "
                                 f"{len(ours)}; build the store for the checkpoint's architecture")

            def layout(perm):
                return "contiguous" if perm is None else f"dims in memory order {perm}"

            a, b = next((a, b) for a, b in zip(theirs_s, ours) if comparable(a) != comparable(b))
            raise ValueError(f"the checkpoint's snapshots hold {a[1]} '{a[0]}' in another memory "
                             f"layout ({layout(a[5])}) than this store ({layout(b[5])}): build "
                             f"the store from the model in the checkpoint's layout (e.g. "
                             f"model.to(memory_format=torch.channels_last)) before loading")
        pairs = [(self._half, state["half"]), (self._float, state["float"])]
        if set(state["exact"]) != set(self._exact):
            raise ValueError("the checkpoint's integer buffers differ from this store's: build "
                             "the store for the checkpoint's architecture")
        pairs += [(t, state["exact"][n]) for n, t in self._exact.items()]
        for ours_t, theirs_t in pairs:
            if theirs_t.shape != ours_t.shape or theirs_t.dtype != ours_t.dtype:
                raise ValueError(f"a checkpoint tensor has shape {tuple(theirs_t.shape)} and "
                                 f"dtype {theirs_t.dtype} where the store expects "
                                 f"{tuple(ours_t.shape)} and {ours_t.dtype}: the checkpoint was "
                                 f"written by another version or for another model")
        with torch.no_grad():
            for ours_t, theirs_t in pairs:
                ours_t.copy_(theirs_t)
        self._filled = [bool(f) for f in state["filled"]]
        self._next = int(state["next"])

    def __repr__(self):
        return (f"SnapshotStore(capacity={self.capacity}, dtype={self.dtype}, "
                f"device={self.device}, filled={self.filled_slots}, "
                f"slot_nbytes={self.slot_nbytes})")
