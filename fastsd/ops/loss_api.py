"""The distillation loss's argument checks and result type, shared by the fused op and reference.

Every check runs on the host before any kernel is launched, so bad input is reported by name
instead of surfacing as a wrong number or an out-of-bounds read.
"""

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

MAX_TOPK = 16  # the largest K whose top-K the fused kernels select on chip
REDUCTIONS = ("mean", "sum", "none")


class LossTerms(NamedTuple):
    """The unweighted terms of the distillation loss, detached,
    float32 (float64 for float64 logits).

    For a reduced loss ("mean"/"sum") each field is a 0-d tensor reduced the same way as the loss;
    for ``reduction="none"`` each has the shape of the rows. A term that is absent (no target, no
    teacher, no penalty) is zero.
    """

    ce: torch.Tensor
    kl: torch.Tensor
    tolerance: torch.Tensor


def _is_finite_number(value):
    # Comparisons (which NaN fails too) rather than math.isfinite: under
    # torch.compile(dynamic=True) a float argument is a SymFloat, which math.isfinite cannot
    # trace. numbers.Real admits numpy scalars (np.float32(2.0)); bool is not a number here.
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and -math.inf < value < math.inf)


def _check_positive(name, value):
    if not (_is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_weight(name, value):
    if not (_is_finite_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_labels_in_range(target, classes, ignore_index):
    """Raise if a label is outside [0, classes) and is not ignore_index.

    This reads the labels on the host: a synchronisation for CUDA tensors, so a training loop
    whose labels were validated by its data pipeline can skip it (``check_labels=False``).
    """
    # Compared as int64: in a narrower type ignore_index would wrap (-100 is 156 as uint8).
    target = target.long()
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0]) if target.dim() == 1 else bad.nonzero()[0].tolist()
        value = int(target[first] if target.dim() == 1 else target[tuple(first)])
        raise ValueError(f"target holds label {value} at index {first}, outside [0, {classes}) "
                         f"and not ignore_index ({ignore_index}): labels must be class indices "
                         f"of the logits' last dimension")


# What the kernels read (float8 scores would need a scale the loss does not take).
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _kind(value) -> str:
    """A tensor's dtype, else the value's type: a NumPy array's dtype alone ("float32") would
    read as if the value were fine."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype)
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def check_distill_args(logits, target, teacher_logits, *, temperature, student_temperature,
                       ce_weight, kd_weight, tolerance_weight, topk, ignore_index, reduction,
                       check_labels, label_smoothing=0.0, t2_scaling=False):
    """Validate the loss arguments; return the shape of the rows (``logits.shape[:-1]``)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        hint = (": pass the network's raw scores, not class indices"
                if not logits.is_floating_point() else
                ": cast them first, e.g. logits.float()")
        raise ValueError(f"logits must be float32, bfloat16, float16 or float64, got "
                         f"{logits.dtype}{hint}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [batch, classes] (or [..., classes]), got a "
                         f"{logits.dim()}-D tensor of shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits have no classes (shape {tuple(logits.shape)}): the last dim "
                         f"holds each row's class scores")
    classes = logits.shape[-1]
    rows_shape = logits.shape[:-1]
    if teacher_logits is not None:
        if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dtype not in LOGIT_DTYPES:
            raise ValueError(f"teacher_logits must be a float32, bfloat16, float16 or float64 "
                             f"tensor of the same shape as logits, got {_kind(teacher_logits)}")
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but logits "
                             f"have {tuple(logits.shape)}: the teacher must score the same rows "
                             f"and classes")
        if teacher_logits.device != logits.device:
            raise ValueError(f"teacher_logits are on {teacher_logits.device} but logits on "
                             f"{logits.device}: move both to one device")
        if teacher_logits.requires_grad:
            raise ValueError("teacher_logits require grad, but the teacher is a constant of the "
                             "loss: compute it under torch.no_grad() or pass "
                             "teacher_logits.detach()")
    if target is not None:
        if not isinstance(target, torch.Tensor) or target.is_floating_point() \
                or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must be an integer tensor of class indices, got "
                             f"{_kind(target)}")
        if target.shape != rows_shape:
            raise ValueError(f"target has shape {tuple(target.shape)} but logits of shape "
                             f"{tuple(logits.shape)} need one label per row, shape "
                             f"{tuple(rows_shape)}")
        if target.device != logits.device:
            raise ValueError(f"target is on {target.device} but logits on {logits.device}: move "
                             f"both to one device")
    _check_positive("temperature", temperature)
    _check_positive("student_temperature", student_temperature)
    _check_weight("ce_weight", ce_weight)
    _check_weight("kd_weight", kd_weight)
    _check_weight("tolerance_weight", tolerance_weight)
    if not (_is_finite_number(label_smoothing) and 0 <= label_smoothing < 1):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an integer label value, got {ignore_index!r}")
    # a bool, not any truthy value: t2_scaling="false" or "no" from a hand-made config would
    # otherwise scale the KL term by T² without a word
    if not isinstance(t2_scaling, (bool, np.bool_)):
        raise ValueError(f"t2_scaling must be True or False, got {t2_scaling!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # topk is checked even while the penalty is off, so that a bad value is not found only once
    # the penalty is switched on (a tolerant-teacher generation late in a run).
    if (not isinstance(topk, numbers.Integral) or isinstance(topk, (bool, np.bool_))
            or not 2 <= topk <= MAX_TOPK):
        raise ValueError(f"topk must be an integer in [2, {MAX_TOPK}] (the K of the tolerance "
                         f"penalty), got {topk!r}")
    if tolerance_weight > 0:
        if topk > classes:
            raise ValueError(f"topk={topk} is larger than the number of classes ({classes}): "
                             f"the penalty compares the top-{topk} scores of each row")
    if target is not None and check_labels:
        check_labels_in_range(target, classes, ignore_index)
    return rows_shape
