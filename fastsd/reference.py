"""Plain-PyTorch definitions of fastsd's ops: the tests' oracle and the benchmarks' baseline.

Everything here is written for clarity, from the definitions in DESIGN.md section 2, with autograd
providing the gradient. It shares no code with the kernels it checks, except the argument checks
(:mod:`fastsd.ops.loss_api`), so that both reject bad input the same way.
"""

import torch
import torch.nn.functional as F

from fastsd.ops.loss_api import LossTerms, check_distill_args


def distill_loss_rows_ref(logits, target=None, teacher_logits=None, *, temperature=1.0,
                          student_temperature=1.0, topk=5, ignore_index=-100,
                          with_tolerance=False, label_smoothing=0.0):
    """Per-row CE, KL and tolerant-teacher penalty, unweighted, and the mask of rows that count.

    Shapes: logits [N, C], target [N] or None, teacher_logits [N, C] or None. Returns
    ``(ce, kl, tol, counted)``, each [N]; rows that do not count are zero. Arithmetic in float32,
    or float64 for float64 input.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(compute_dtype)
    rows = z.shape[0]
    zero = z.new_zeros(rows)
    if target is not None:
        counted = target != ignore_index
        safe_target = torch.where(counted, target, torch.zeros_like(target))
        # An ignored row's logits are replaced before any term: a row of -inf (or NaN) would
        # otherwise give a NaN gradient through the where below (0 * NaN).
        z = torch.where(counted[:, None], z, z.detach().new_zeros(()))
        log_f = F.log_softmax(z, dim=-1)
        ce = -log_f.gather(-1, safe_target[:, None]).squeeze(-1)
        if label_smoothing > 0:
            # The target is (1 - ε) one-hot + ε uniform, as in torch's cross_entropy.
            ce = (1 - label_smoothing) * ce - label_smoothing * log_f.mean(-1)
    else:
        counted = torch.ones(rows, dtype=torch.bool, device=z.device)
        ce = zero
    if teacher_logits is not None:
        t = teacher_logits.to(compute_dtype)
        t = torch.where(counted[:, None], t, t.new_zeros(()))
        log_p = F.log_softmax(t / temperature, dim=-1)
        p = log_p.exp()
        log_q = F.log_softmax(z / student_temperature, dim=-1)
        # 0 · log 0 = 0: a teacher logit of -inf contributes nothing (and no NaN gradient);
        # a NaN anywhere still makes the row NaN.
        kl = torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1)
    else:
        kl = zero
    if with_tolerance:
        f = F.softmax(z, dim=-1)
        # The K largest scores are constants of the penalty; ties go to the lower class index.
        order = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :topk]
        top = f.gather(-1, order)
        tol = top[:, 0] - top[:, 1:].sum(-1) / (topk - 1)
    else:
        tol = zero
    # where, not a product with 0/1: an ignored row's infinite term contributes 0, not NaN.
    return tuple(torch.where(counted, term, 0) for term in (ce, kl, tol)) + (counted,)


def distill_loss_ref(logits, target=None, teacher_logits=None, *, temperature=1.0,
                     student_temperature=1.0, ce_weight=1.0, kd_weight=1.0, t2_scaling=False,
                     tolerance_weight=0.0, topk=5, ignore_index=-100, reduction="mean",
                     return_terms=False, label_smoothing=0.0, check_labels=True):
    """The fused distillation loss of DESIGN.md section 2, in plain PyTorch.

    ``loss = ce_weight·CE(y, softmax(z)) + kd_weight·s·KL(softmax(t/T) ‖ softmax(z/T_s))
    + tolerance_weight·TOL``, with ``s = T²`` when ``t2_scaling``; ``label_smoothing`` ε replaces
    the one-hot target of CE by (1 − ε) one-hot + ε/C, as ``torch.nn.functional.cross_entropy``.
    Shapes: logits [..., C], target [...] (integer) or None, teacher_logits [..., C] or None.
    Returns a float32 (float64 for float64 input) scalar for "mean"/"sum", or the per-row losses
    for "none"; with ``return_terms`` a pair ``(loss, LossTerms)``. "mean" divides by the number of
    rows whose label is not ignore_index (all rows without a target); with no such row the mean is
    0. ``check_labels=False`` skips the range check of the labels (a host sync), as
    :func:`fastsd.distill_loss` can.
    """
    rows_shape = check_distill_args(logits, target, teacher_logits, temperature=temperature,
                                    student_temperature=student_temperature, ce_weight=ce_weight,
                                    kd_weight=kd_weight, tolerance_weight=tolerance_weight,
                                    topk=topk, ignore_index=ignore_index, reduction=reduction,
                                    check_labels=check_labels,
                                    label_smoothing=label_smoothing, t2_scaling=t2_scaling)
    classes = logits.shape[-1]
    ce, kl, tol, counted = distill_loss_rows_ref(
        logits.reshape(-1, classes),
        None if target is None else target.reshape(-1),
        None if teacher_logits is None else teacher_logits.reshape(-1, classes),
        temperature=temperature, student_temperature=student_temperature, topk=topk,
        ignore_index=ignore_index, with_tolerance=tolerance_weight > 0,
        label_smoothing=label_smoothing)
    kd_scale = kd_weight * (temperature ** 2 if t2_scaling else 1.0)
    # A weight of 0 leaves its term out, also where the term is infinite (0 * inf is NaN). The
    # sum starts from a zero that is still a function of the logits (a where, not ce * 0, which
    # is NaN where ce is inf), so even a loss of all-zero weights has a gradient: 0.
    zero_rows = torch.where(torch.zeros_like(counted), ce, 0)
    rows = sum((weight * term for weight, term in ((ce_weight, ce), (kd_scale, kl),
                                                   (tolerance_weight, tol)) if weight != 0),
               zero_rows)
    terms = torch.stack([ce, kl, tol]).detach()
    if reduction == "none":
        loss, terms = rows.reshape(rows_shape), terms.reshape(3, *rows_shape)
    else:
        loss, terms = rows.sum(), terms.sum(-1)
        if reduction == "mean":
            count = counted.sum().clamp_min(1)
            loss, terms = loss / count, terms / count
    if return_terms:
        return loss, LossTerms(*terms.unbind(0))
    return loss
