"""The fused distillation loss: functional, ``nn.Module`` and ``torch.autograd.Function`` faces.

Per row (logits z, teacher logits t, label y; DESIGN.md section 2)::

    loss = ce_weight * CE(y, softmax(z))
         + kd_weight * s * KL(softmax(t / T) || softmax(z / T_s))      s = T**2 if t2_scaling else 1
         + tolerance_weight * (f[a1] - mean(f[a2..aK]))               f = softmax(z), a = top-K of f

The forward pass also produces d(loss)/d(logits); backward only scales it by the incoming
gradient. Snapshot Distillation's asymmetric setting is the default (student temperature 1).
"""

import torch
from torch import nn

from fastsd.ops import distill as _distill_ops  # registers torch.ops.fastsd.*
from fastsd.ops.loss_api import LossTerms, check_distill_args

__all__ = ["distill_loss", "DistillLoss", "DistillLossFunction", "LossTerms"]


class DistillLossFunction(torch.autograd.Function):
    """The loss as an autograd Function, for code that wants it without argument checks.

    ``DistillLossFunction.apply(logits, target, teacher_logits, temperature, student_temperature,
    ce_weight, kd_weight, t2_scaling, tolerance_weight, topk, ignore_index, reduction,
    label_smoothing)``, every argument positional, in that order, with the meanings of
    :func:`distill_loss` (``label_smoothing`` may be left out: 0); ``target`` and
    ``teacher_logits`` may be None, ``target`` must be int64. Returns ``(loss, terms)``: the loss
    (0-d, or the rows' shape for ``"none"``) and the detached unweighted terms stacked as
    [3] or [3, *rows] (CE, KL, TOL). Gradients flow to ``logits`` only. :func:`distill_loss`
    validates its arguments and calls this.
    """

    @staticmethod
    def forward(ctx, logits, target, teacher_logits, temperature, student_temperature, ce_weight,
                kd_weight, t2_scaling, tolerance_weight, topk, ignore_index, reduction,
                label_smoothing=0.0):
        classes = logits.shape[-1]
        rows_shape = logits.shape[:-1]
        # Any strides: each kernel makes the layout it reads (tests/test_loss.py checks them).
        z = logits.reshape(-1, classes)
        t = None if teacher_logits is None else teacher_logits.reshape(-1, classes)
        y = None if target is None else target.reshape(-1)
        kd_scale = kd_weight * (temperature * temperature if t2_scaling else 1.0)
        write_grad = bool(ctx.needs_input_grad[0])
        terms, grad = _distill_ops.run_distill_loss_fwd(
            z, y, t, float(temperature), float(student_temperature), float(ce_weight),
            float(kd_scale), float(tolerance_weight), int(topk), int(ignore_index), write_grad,
            float(label_smoothing))
        count = None  # the divisor of "mean": the rows that count, at least 1
        if reduction == "none":
            loss = terms[0].reshape(rows_shape)
            parts = terms[1:4].reshape(3, *rows_shape)
        else:
            sums = terms.sum(dim=1)  # loss, CE, KL, TOL, rows that count
            if reduction == "mean":
                count = sums[4].clamp_min(1)
                sums = sums / count
            loss, parts = sums[0], sums[1:4]
        # Outputs of their own, not views of `terms`: autograd refuses to let a view made inside
        # a Function's forward be modified in place (`loss /= accum_steps` would raise). Only a
        # few floats per row.
        loss, parts = loss.clone(), parts.clone()
        ctx.mark_non_differentiable(parts)
        ctx.reduction = reduction
        ctx.logits_shape = logits.shape
        ctx.logits_dtype = logits.dtype
        if write_grad:
            ctx.save_for_backward(grad, *([] if count is None else [count]))
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, grad_parts):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: the stored gradient is a constant, so a second derivative
            # would silently be 0. (once_differentiable would not say so either: it raises
            # only when the incoming gradient itself requires grad.)
            raise RuntimeError(
                "distill_loss has no second derivative (its gradient is computed in the forward "
                "pass); for a gradient penalty or double backward use "
                "fastsd.reference.distill_loss_ref")
        grad, *divisor = ctx.saved_tensors  # divisor: [rows that count] for "mean"
        if ctx.reduction == "none":
            scale = grad_loss.reshape(-1, 1)
        elif divisor:
            scale = grad_loss / divisor[0]
        else:
            scale = grad_loss
        if _last_backward_through_graph() and not _is_batched(scale):
            # The stored gradient is needed by nothing else: scale it in place rather than
            # allocate a second [N, C] tensor, which is what the fused loss exists to avoid.
            grad_logits = grad.mul_(scale)
        else:
            grad_logits = grad * scale  # the graph is kept (retain_graph): leave it intact
        # float16 logits have a float32 stored gradient (kernels' gradient_dtype): it is rounded
        # to float16 only now, after the loss scale of fp16 training is applied.
        grad_logits = grad_logits.to(ctx.logits_dtype)
        return (grad_logits.reshape(ctx.logits_shape),) + (None,) * 12


def _is_batched(t):
    """Whether ``t`` is vmapped (``autograd.grad(..., is_grads_batched=True)``, jacobians): then
    scaling the unbatched stored gradient in place cannot hold the batched result."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t)


def _last_backward_through_graph():
    """True when the running backward frees the graph afterwards (no ``retain_graph``).

    Then a saved tensor will never be read again and may be overwritten. Under torch.compile the
    answer is False: the compiled backward reuses dead buffers by itself.
    """
    if torch.compiler.is_compiling():
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # a torch without it, or no backward running
        return False


def distill_loss(logits, target=None, teacher_logits=None, *, temperature=1.0,
                 student_temperature=1.0, ce_weight=1.0, kd_weight=1.0, t2_scaling=False,
                 tolerance_weight=0.0, topk=5, ignore_index=-100, reduction="mean",
                 return_terms=False, check_labels=True, label_smoothing=0.0):
    """Cross-entropy + distillation KL + tolerant-teacher penalty, fused in one pass.

    Args:
        logits: student scores [..., C], float32/bfloat16/float16 (float64 on the CPU).
        target: class indices [...] (any integer dtype), or None for no cross-entropy.
        teacher_logits: teacher scores [..., C] (any float dtype, e.g. half while logits are
            bf16), or None for no KL. A constant of the loss: it must not require grad.
        temperature: T, divides the teacher logits. student_temperature: T_s, divides the
            student's in the KL term only (1 = SD's asymmetric distillation; T = classic KD).
        ce_weight, kd_weight, tolerance_weight: λ_S, λ_T and μ (all ≥ 0); tolerance_weight 0
            switches the penalty off. t2_scaling: multiply the KL term by T² (classic KD).
        topk: K of the tolerant-teacher penalty, 2..16 (used when tolerance_weight > 0).
        ignore_index: rows with this label contribute nothing, to any term.
        reduction: "mean" (over the rows that count; 0 if none does, also in a batch of no
            rows), "sum" or "none".
        return_terms: also return :class:`LossTerms` (unweighted CE, KL, penalty, reduced like the
            loss) from the same pass, for logging.
        check_labels: check that every label lies in [0, C) (or is ignore_index) first. On CUDA
            this reads the labels on the host (a synchronisation): training loops whose data
            pipeline guarantees valid labels pass False. Unchecked out-of-range labels are never
            read out of bounds: their rows' loss and gradient are NaN (with ce_weight > 0). Skipped
            under torch.compile.
        label_smoothing: ε in [0, 1): the CE target becomes (1 − ε) one-hot + ε/C, as in
            ``torch.nn.functional.cross_entropy``; the teacher term is unchanged.

    Returns:
        float32 loss (float64 for float64 logits): 0-d for "mean"/"sum", rows' shape for "none";
        with ``return_terms``, ``(loss, LossTerms)``.
    """
    check_distill_args(logits, target, teacher_logits, temperature=temperature,
                       student_temperature=student_temperature, ce_weight=ce_weight,
                       kd_weight=kd_weight, tolerance_weight=tolerance_weight, topk=topk,
                       ignore_index=ignore_index, reduction=reduction,
                       check_labels=check_labels and not torch.compiler.is_compiling(),
                       label_smoothing=label_smoothing, t2_scaling=t2_scaling)
    if logits.dtype == torch.float64 and logits.device.type != "cpu":
        raise ValueError("float64 logits run on the CPU path only: cast them to float32 on the "
                         "GPU (the kernels compute in float32 anyway)")
    if target is not None and target.dtype != torch.int64:
        target = target.long()
    if logits.numel() == 0:
        return _loss_of_no_rows(logits, reduction, return_terms)
    if logits.requires_grad and not torch.is_grad_enabled():
        # Under no_grad nothing will call backward: detached, the kernels skip the gradient
        # (needs_input_grad inside the Function does not see the grad mode).
        logits = logits.detach()
    loss, parts = DistillLossFunction.apply(
        logits, target, teacher_logits, temperature, student_temperature, ce_weight, kd_weight,
        t2_scaling, tolerance_weight, topk, ignore_index, reduction, label_smoothing)
    if return_terms:
        return loss, LossTerms(*parts.unbind(0))
    return loss


def _loss_of_no_rows(logits, reduction, return_terms):
    """A batch of no rows (``logits[mask]`` where no row is selected): what ``reduction`` makes of
    nothing, 0 ("mean" of no row that counts, as with ignored rows; "sum") or an empty tensor
    ("none"), tied to ``logits`` so that backward gives its (empty) gradient. No kernel runs."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.sum(dim=-1, dtype=dtype)                       # [*rows], of no element
    loss = rows if reduction == "none" else rows.sum()
    if not return_terms:
        return loss
    terms = torch.zeros((3, *loss.shape), dtype=dtype, device=logits.device)
    return loss, LossTerms(*terms.unbind(0))


class DistillLoss(nn.Module):
    """:func:`distill_loss` with its keywords fixed at construction (and checked there).

    ``forward(logits, target=None, teacher_logits=None)`` returns the loss, or
    ``(loss, LossTerms)`` when built with ``return_terms=True``.
    """

    def __init__(self, *, temperature=1.0, student_temperature=1.0, ce_weight=1.0, kd_weight=1.0,
                 t2_scaling=False, tolerance_weight=0.0, topk=5, ignore_index=-100,
                 reduction="mean", return_terms=False, check_labels=True, label_smoothing=0.0):
        super().__init__()
        self.options = dict(temperature=temperature, student_temperature=student_temperature,
                            ce_weight=ce_weight, kd_weight=kd_weight, t2_scaling=t2_scaling,
                            tolerance_weight=tolerance_weight, topk=topk,
                            ignore_index=ignore_index, reduction=reduction,
                            return_terms=return_terms, check_labels=check_labels,
                            label_smoothing=label_smoothing)
        # Fail at construction, not at the first batch: check the scalars on a dummy row.
        probe_classes = max(2, topk if isinstance(topk, int) else 2)
        check_distill_args(torch.zeros(1, probe_classes), None, None, temperature=temperature,
                           student_temperature=student_temperature, ce_weight=ce_weight,
                           kd_weight=kd_weight, tolerance_weight=tolerance_weight, topk=topk,
                           ignore_index=ignore_index, reduction=reduction, check_labels=False,
                           label_smoothing=label_smoothing, t2_scaling=t2_scaling)

    def forward(self, logits, target=None, teacher_logits=None):
        return distill_loss(logits, target, teacher_logits, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
