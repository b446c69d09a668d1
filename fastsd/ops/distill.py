"""The fused distillation loss as torch.library custom ops, and which kernel runs where.

``fastsd::distill_loss_fwd`` is the one op every device goes through. Its implementation picks:

* CUDA tensors: the Triton kernels of :mod:`fastsd.kernels.distill_loss`.
* CPU tensors with ``TRITON_INTERPRET=1`` (set before fastsd is imported): the same Triton kernels
  under Triton's interpreter, which is how the tests check the real kernel code without a GPU.
* other CPU tensors, and float64 on the CPU: ``fastsd::distill_loss_fwd_cpu``, the C++ kernel of
  the extension (csrc/distill_loss_cpu.cpp), vectorised and parallel over rows.

:func:`cpu_backend` overrides the CPU choice for a block of code (tests compare both).
"""

import contextlib
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastsd._extension import load_extension

CPU_BACKENDS = ("auto", "native", "triton")
_cpu_backend = "auto"


def triton_interpreting() -> bool:
    """True when Triton's kernels were compiled for its CPU interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastsd.kernels import distill_loss as kernels
    return isinstance(kernels._rows_kernel, InterpretedFunction)


@contextlib.contextmanager
def cpu_backend(name: str):
    """Run the loss on CPU tensors with ``"native"`` (C++),
    ``"triton"`` (interpreter) or ``"auto"``."""
    global _cpu_backend
    if name not in CPU_BACKENDS:
        raise ValueError(f"cpu_backend must be one of {CPU_BACKENDS}, got {name!r}")
    if name == "triton" and not triton_interpreting():
        raise RuntimeError("the Triton kernels run on CPU tensors only under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before importing fastsd")
    previous, _cpu_backend = _cpu_backend, name
    try:
        yield
    finally:
        _cpu_backend = previous


def _runs_triton(logits: Tensor) -> bool:
    if logits.device.type != "cpu":
        return True
    if logits.dtype == torch.float64:
        return False
    return _cpu_backend == "triton" or (_cpu_backend == "auto" and triton_interpreting())


@functools.lru_cache(maxsize=None)
def _native_cpu_op():
    load_extension()
    op = torch.ops.fastsd.distill_loss_fwd_cpu

    @torch.library.register_fake("fastsd::distill_loss_fwd_cpu")
    def _(logits, target, teacher_logits, temperature, student_temperature, ce_weight, kd_scale,
          tolerance_weight, topk, ignore_index, write_grad, label_smoothing):
        return _fake_outputs(logits, write_grad)

    return op


def _fake_outputs(logits, write_grad):
    from fastsd.kernels.distill_loss import TERM_ROWS, gradient_dtype

    rows, classes = logits.shape
    terms = logits.new_empty((TERM_ROWS, rows),
                             dtype=torch.promote_types(logits.dtype, torch.float32))
    return terms, logits.new_empty((rows if write_grad else 0, classes),
                                   dtype=gradient_dtype(logits.dtype))


def _distill_loss_fwd(logits: Tensor, target: Optional[Tensor], teacher_logits: Optional[Tensor],
                      temperature: float, student_temperature: float, ce_weight: float,
                      kd_scale: float, tolerance_weight: float, topk: int, ignore_index: int,
                      write_grad: bool, label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    """One fused pass over the rows: per-row loss and terms, and the per-row gradient.

    Shapes: logits [N, C] with unit stride along C; target [N] int64 or None; teacher_logits
    [N, C] or None. ``kd_scale`` multiplies KL in the loss (``kd_weight * s``); label_smoothing
    ε makes the CE target (1 - ε) one-hot + ε/C. Returns
    ``(terms, grad)``: terms [5, N] float32 (float64 for float64 logits) holding each row's loss
    ``ce_weight*CE + kd_scale*KL + tolerance_weight*TOL``, its CE, KL and TOL (zero for ignored
    rows), and whether the row counts (1 or 0: summed on the device, the divisor of a mean); and
    grad [N, C], d(row loss)/d(logits), in the logits' dtype except float32 for float16 logits
    (``kernels.distill_loss.gradient_dtype``: backward scales it before it is rounded to
    float16); an empty [0, C] tensor when ``write_grad`` is False.
    """
    if _runs_triton(logits):
        if logits.dtype == torch.float64:
            raise ValueError("float64 logits run on the CPU path only: cast them to float32 on "
                             "the GPU (the kernels compute in float32 anyway)")
        from fastsd.kernels.distill_loss import distill_loss_forward
        return distill_loss_forward(
            logits, target, teacher_logits, temperature=temperature,
            student_temperature=student_temperature, ce_weight=ce_weight, kd_scale=kd_scale,
            tolerance_weight=tolerance_weight, topk=topk, ignore_index=ignore_index,
            write_grad=write_grad, label_smoothing=label_smoothing)
    return _native_cpu_op()(logits, target, teacher_logits, temperature, student_temperature,
                            ce_weight, kd_scale, tolerance_weight, topk, ignore_index, write_grad,
                            label_smoothing)


distill_loss_fwd = torch.library.custom_op("fastsd::distill_loss_fwd", mutates_args=())(
    _distill_loss_fwd)


def run_distill_loss_fwd(logits: Tensor, target: Optional[Tensor],
                         teacher_logits: Optional[Tensor], *args) -> Tuple[Tensor, Tensor]:
    """``torch.ops.fastsd.distill_loss_fwd(...)``; plain eager calls go straight to its body.

    The op is what torch.compile, export, fake tensors and dispatch modes see; a plain call on plain
    tensors gains nothing from the trip through the dispatcher and the custom-op machinery, which
    costs about 20 us per call (measured on the CPU: a tenth of the whole loss at 256 x 1000).
    """
    plain = (type(logits) is Tensor and type(target) in (Tensor, type(None))
             and type(teacher_logits) in (Tensor, type(None)))
    if (plain and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()):
        return _distill_loss_fwd(logits, target, teacher_logits, *args)
    return torch.ops.fastsd.distill_loss_fwd(logits, target, teacher_logits, *args)


@distill_loss_fwd.register_fake
def _(logits, target, teacher_logits, temperature, student_temperature, ce_weight, kd_scale,
      tolerance_weight, topk, ignore_index, write_grad, label_smoothing=0.0):
    return _fake_outputs(logits, write_grad)
