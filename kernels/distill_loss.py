"""Triton kernels of the fused distillation loss (DESIGN.md section 2) and their launcher.

One pass over the student logits z and the teacher logits t produces, per row, the unweighted
terms (CE, KL, TOL) and the row's gradient

    dl/dz = ce_weight (f - e_y) + (kd_scale / T_s) (q - p) + tol_weight f * (w - TOL),
    (with label smoothing ε, e_y becomes (1 - ε) e_y + ε/C)
    f = softmax(z), q = softmax(z / T_s), p = softmax(t / T), kd_scale = kd_weight * s,

so that the backward pass only scales the stored gradient by the incoming one. Two kernels:

* ``_rows_kernel`` keeps ``BLOCK_R`` whole rows in registers (``C <= MAX_REGISTER_COLUMNS``):
  one read of z and t, one write of the gradient.
* ``_chunked_kernel`` handles one long row per program in chunks: a first sweep keeps running
  maxima and sums (online softmax) and a running top-K, a second sweep writes the gradient.

All arithmetic is float32 whatever the input dtype. This module never imports fastsd.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Rows of the per-row output ``terms``: loss, CE, KL, TOL, counted (1 or 0). The C++ CPU kernel
# (csrc/distill_loss_cpu.cpp) writes the same layout.
TERM_ROWS = 5
# Rows up to this many classes are held in registers; longer rows take the chunked path.
MAX_REGISTER_COLUMNS = 8192
# Elements of a tile each thread holds: 8 for one row per program, 4 when a program holds several
# short rows (Triton's layout then gives a thread parts of several rows, each with statistics of
# its own). With 16 per thread, or 8 over several rows, ptxas allocated up to 255 registers per
# thread (its limit), which leaves room for 8 resident warps per SM out of 64; these settings keep
# 16 or more (bench/kernel_resources.py and tests/test_loss_ops.py, Triton 3.6 and 3.8, sm_90).
ELEMENTS_PER_THREAD = 8
ROWS_ELEMENTS_PER_THREAD = 4
MAX_NUM_WARPS = 32
# Columns per chunk on the chunked path, and its warps per program (one row per program).
CHUNK_COLUMNS = 4096
CHUNKED_NUM_WARPS = CHUNK_COLUMNS // (32 * ELEMENTS_PER_THREAD)
# Short rows share a program up to this many elements (rows x padded columns); a row of this
# width or more has a program of its own.
ROWS_TILE = 512


def gradient_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the stored d(loss)/d(logits): float32 for float16 logits, else the logits' own.

    The gradient is written in the forward pass, before the loss scale of fp16 training is
    applied to it in backward. Stored in float16, its small entries (softmax probabilities below
    ~6e-5, most of a confident student's row) would lose their precision or flush to zero first:
    the very loss the GradScaler exists to prevent. bfloat16 has float32's range, so bf16 logits
    keep a bf16 gradient: half the memory of a float32 one, for a second rounding where backward
    scales it by other than a power of two ("mean" over 6 rows: up to 1.3 bf16 ulps from the
    exact gradient instead of 0.5, well inside bf16 training's noise). (The C++ CPU kernel
    follows the same rule.)
    """
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


@triton.jit
def _rows_kernel(
    z_ptr, z_stride, t_ptr, t_stride, y_ptr, terms_ptr, grad_ptr, grad_stride,
    n_rows, n_cols, inv_temperature, inv_student_temperature,
    ce_weight, kd_scale, tol_weight, label_smoothing, ignore_index,
    HAS_TARGET: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TOL: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    STUDENT_T_IS_ONE: tl.constexpr, TOPK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    kd_grad = kd_scale * inv_student_temperature
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    # Rows past the end re-read the last row (always valid memory); their results are not stored.
    rows64 = tl.minimum(rows, n_rows - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    load_ok = col_ok[None, :] & (rows64[:, None] >= 0)

    z = tl.load(z_ptr + rows64[:, None] * z_stride + cols[None, :], mask=load_ok,
                other=-float("inf")).to(tl.float32)
    z_max = tl.max(z, axis=1)
    z_exp = tl.exp(z - z_max[:, None])
    z_sum = tl.sum(z_exp, axis=1)
    f = z_exp / z_sum[:, None]
    z_lse = z_max + tl.log(z_sum)
    grad = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    zero_rows = tl.zeros([BLOCK_R], dtype=tl.float32)

    counted = row_ok
    ce = zero_rows
    if HAS_TARGET:
        y = tl.load(y_ptr + rows64)
        counted = row_ok & (y != ignore_index)
        label_ok = (y >= 0) & (y < n_cols)
        is_label = cols[None, :] == y[:, None]
        z_label = tl.sum(tl.where(is_label, z, 0.0), axis=1)
        # A label outside [0, C) is never read from memory: its row's loss is NaN.
        ce = tl.where(label_ok, z_lse - z_label, float("nan"))
        if HAS_SMOOTHING:
            # Target (1 - ε) one-hot + ε/C: CE gains ε (lse - mean z).
            # Summed as z / C: a sum of huge logits (|z| > 3.4e38 / C) would overflow to inf.
            z_mean = tl.sum(tl.where(col_ok[None, :], z / n_cols, 0.0), axis=1)
            ce = (1 - label_smoothing) * ce + label_smoothing * (z_lse - z_mean)
            grad += ce_weight * (f - (1 - label_smoothing) * is_label.to(tl.float32)
                                 - label_smoothing / n_cols)
        else:
            grad += ce_weight * (f - is_label.to(tl.float32))

    kl = zero_rows
    if HAS_TEACHER:
        t = tl.load(t_ptr + rows64[:, None] * t_stride + cols[None, :], mask=load_ok,
                    other=-float("inf")).to(tl.float32) * inv_temperature
        t_max = tl.max(t, axis=1)
        t_exp = tl.exp(t - t_max[:, None])
        t_sum = tl.sum(t_exp, axis=1)
        p = t_exp / t_sum[:, None]
        log_p = t - (t_max + tl.log(t_sum))[:, None]
        if STUDENT_T_IS_ONE:
            q = f
            log_q = z - z_lse[:, None]
        else:
            zq = z * inv_student_temperature
            q_exp = tl.exp(zq - (z_max * inv_student_temperature)[:, None])
            q_sum = tl.sum(q_exp, axis=1)
            q = q_exp / q_sum[:, None]
            log_q = zq - (z_max * inv_student_temperature + tl.log(q_sum))[:, None]
        # 0 * log 0 = 0: classes the teacher rules out (p = 0, e.g. a logit of -inf) add
        # nothing; a NaN still propagates.
        kl = tl.sum(tl.where(p == 0, 0.0, p * (log_p - log_q)), axis=1)
        # A weight of 0 leaves the term out of the gradient too (0 * NaN from a bad teacher is NaN).
        grad += tl.where(kd_scale == 0, 0.0, kd_grad * (q - p))

    tol = zero_rows
    if HAS_TOL:
        remaining = z
        is_top1 = cols[None, :] < 0
        is_other = cols[None, :] < 0
        f_top1 = zero_rows
        f_others = zero_rows
        for k in tl.static_range(TOPK):
            # Ties go to the lower class index, as in the reference's stable sort.
            value, index = tl.max(remaining, axis=1, return_indices=True,
                                  return_indices_tie_break_left=True)
            picked = cols[None, :] == index[:, None]
            f_value = tl.exp(value - z_max) / z_sum
            if k == 0:
                is_top1 = picked
                f_top1 = f_value
            else:
                is_other = is_other | picked
                f_others += f_value
            remaining = tl.where(picked, -float("inf"), remaining)
        tol = f_top1 - f_others / (TOPK - 1)
        w = tl.where(is_top1, 1.0, tl.where(is_other, -1.0 / (TOPK - 1), 0.0))
        grad += tol_weight * f * (w - tol[:, None])

    loss = _weighted(ce_weight, ce) + _weighted(kd_scale, kl) + _weighted(tol_weight, tol)
    tl.store(terms_ptr + rows, tl.where(counted, loss, 0.0), mask=row_ok)
    tl.store(terms_ptr + n_rows + rows, tl.where(counted, ce, 0.0), mask=row_ok)
    tl.store(terms_ptr + 2 * n_rows + rows, tl.where(counted, kl, 0.0), mask=row_ok)
    tl.store(terms_ptr + 3 * n_rows + rows, tl.where(counted, tol, 0.0), mask=row_ok)
    tl.store(terms_ptr + 4 * n_rows + rows, tl.where(counted, 1.0, 0.0), mask=row_ok)
    if WRITE_GRAD:
        if HAS_TARGET:
            # A row whose loss is NaN for its label gets a NaN gradient: a check of the gradients
            # alone (GradScaler's) then also sees the bad step.
            grad = tl.where((label_ok | (ce_weight == 0))[:, None], grad, float("nan"))
        grad = tl.where(counted[:, None], grad, 0.0)
        tl.store(grad_ptr + rows64[:, None] * grad_stride + cols[None, :],
                 grad.to(grad_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _weighted(weight, term):
    """``weight * term``, but 0 for a weight of 0: a term switched off is left out of the loss
    even where it is infinite (0 * inf would make the row NaN while its gradient is finite)."""
    return tl.where(weight == 0, 0.0, weight * term)


@triton.jit
def _online_update(run_max, run_sum, chunk):
    """Fold a chunk into a running (max, sum of exp(x - max)); -inf chunks leave it unchanged."""
    new_max = tl.maximum(run_max, tl.max(chunk, axis=0))
    # Subtracting a max of -inf would give NaN: shift by 0 instead (every term is then exp(-inf)).
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    scaled = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(chunk - shift), axis=0)
    return new_max, scaled, shift


@triton.jit
def _chunked_kernel(
    z_ptr, z_stride, t_ptr, t_stride, y_ptr, terms_ptr, grad_ptr, grad_stride,
    n_rows, n_cols, inv_temperature, inv_student_temperature,
    ce_weight, kd_scale, tol_weight, label_smoothing, ignore_index,
    HAS_TARGET: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TOL: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    STUDENT_T_IS_ONE: tl.constexpr, TOPK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    CHUNK: tl.constexpr, TOPK_PAD: tl.constexpr,
):
    kd_grad = kd_scale * inv_student_temperature
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, CHUNK)
    neg_inf = -float("inf")

    # Sweep 1: running max/sum of z (f), of z/T_s (q), of t/T (p); the teacher-weighted sum of
    # (t/T - z/T_s) for the KL; and the running top-K of z.
    zero = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)  # a float32 scalar tensor
    z_max = zero + neg_inf
    z_sum = zero
    q_max = zero + neg_inf
    q_sum = zero
    t_max = zero + neg_inf
    t_sum = zero
    t_dot = zero  # sum over classes of exp(t/T - t_max) * (t/T - z/T_s), where that weight != 0
    z_total = zero  # sum of z, for label smoothing
    slots = tl.arange(0, TOPK_PAD)
    top_val = tl.full([TOPK_PAD], neg_inf, tl.float32)
    top_idx = tl.full([TOPK_PAD], -1, tl.int32)
    for start in range(0, n_cols, CHUNK):
        cols = start + offs
        ok = cols < n_cols
        z = tl.load(z_row + cols, mask=ok, other=neg_inf).to(tl.float32)
        z_max, z_sum, _ = _online_update(z_max, z_sum, z)
        if HAS_SMOOTHING:
            z_total += tl.sum(tl.where(ok, z / n_cols, 0.0), axis=0)  # the mean: no overflow
        if HAS_TEACHER:
            if STUDENT_T_IS_ONE:
                zq = z
            else:
                zq = z * inv_student_temperature
                q_max, q_sum, _ = _online_update(q_max, q_sum, zq)
            t = tl.load(t_row + cols, mask=ok, other=neg_inf).to(tl.float32) * inv_temperature
            old_t_max = t_max
            t_max, t_sum, shift = _online_update(t_max, t_sum, t)
            weight = tl.exp(t - shift)
            # The weights folded in so far shrink by `rescale`; where it underflows to 0 their
            # teacher probabilities are 0 and, by 0 log 0 = 0, so are their terms, even an
            # infinite one (a student logit of -inf): inf * 0 would be NaN.
            rescale = tl.exp(old_t_max - shift)
            t_dot = tl.where(rescale == 0, 0.0, t_dot * rescale) \
                + tl.sum(tl.where(weight == 0, 0.0, weight * (t - zq)), axis=0)
        if HAS_TOL:
            remaining = z
            for _ in tl.static_range(TOPK):
                value, index = tl.max(remaining, axis=0, return_indices=True,
                                      return_indices_tie_break_left=True)
                # The running list's weakest entry: lowest value, and among equal values the
                # highest class index (ties keep the lower index).
                vals = tl.where(slots < TOPK, top_val, float("inf"))
                weakest_val = tl.min(vals, axis=0)
                key = (top_idx + 1) * TOPK_PAD + slots  # >= 0; empty slots have index -1
                weakest_slot = tl.max(tl.where(vals == weakest_val, key, -1), axis=0) % TOPK_PAD
                # Later chunks hold higher indices, so only a strictly larger value gets in.
                take = (slots == weakest_slot) & (top_val < value)
                top_val = tl.where(take, value, top_val)
                top_idx = tl.where(take, start + index, top_idx)
                remaining = tl.where(offs == index, neg_inf, remaining)

    z_lse = z_max + tl.log(z_sum)
    if STUDENT_T_IS_ONE:
        q_max = z_max
        q_sum = z_sum
    q_lse = q_max + tl.log(q_sum)
    t_lse = t_max + tl.log(t_sum)

    counted = row >= 0
    ce = zero
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        counted = y != ignore_index
        label_ok = (y >= 0) & (y < n_cols)
        z_label = tl.load(z_row + y, mask=label_ok, other=0.0).to(tl.float32)
        ce = tl.where(label_ok, z_lse - z_label, float("nan"))
        if HAS_SMOOTHING:
            ce = (1 - label_smoothing) * ce + label_smoothing * (z_lse - z_total)
    kl = zero
    if HAS_TEACHER:
        # KL = sum p (t/T - t_lse - z/T_s + q_lse) = t_dot / t_sum - t_lse + q_lse
        kl = t_dot / t_sum - t_lse + q_lse
    tol = zero
    top1 = -1
    if HAS_TOL:
        valid = slots < TOPK
        best = tl.max(tl.where(valid, top_val, neg_inf), axis=0)
        top1 = tl.min(tl.where(valid & (top_val == best), top_idx, n_cols), axis=0)
        f_top = tl.where(valid, tl.exp(top_val - z_max) / z_sum, 0.0)
        f_top1 = tl.sum(tl.where(top_idx == top1, f_top, 0.0), axis=0)
        tol = f_top1 - (tl.sum(f_top, axis=0) - f_top1) / (TOPK - 1)

    loss = _weighted(ce_weight, ce) + _weighted(kd_scale, kl) + _weighted(tol_weight, tol)
    tl.store(terms_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(terms_ptr + n_rows + row, tl.where(counted, ce, 0.0))
    tl.store(terms_ptr + 2 * n_rows + row, tl.where(counted, kl, 0.0))
    tl.store(terms_ptr + 3 * n_rows + row, tl.where(counted, tol, 0.0))
    tl.store(terms_ptr + 4 * n_rows + row, tl.where(counted, 1.0, 0.0))

    if WRITE_GRAD:
        g_row = grad_ptr + row * grad_stride
        z_shift = tl.where(z_max == neg_inf, 0.0, z_max)
        q_shift = tl.where(q_max == neg_inf, 0.0, q_max)
        t_shift = tl.where(t_max == neg_inf, 0.0, t_max)
        # Sweep 2: the gradient, chunk by chunk, from the row's final normalisers.
        for start in range(0, n_cols, CHUNK):
            cols = start + offs
            ok = cols < n_cols
            z = tl.load(z_row + cols, mask=ok, other=neg_inf).to(tl.float32)
            f = tl.exp(z - z_shift) / z_sum
            grad = tl.zeros([CHUNK], dtype=tl.float32)
            if HAS_TARGET:
                if HAS_SMOOTHING:
                    grad += ce_weight * (f - (1 - label_smoothing) * (cols == y).to(tl.float32)
                                         - label_smoothing / n_cols)
                else:
                    grad += ce_weight * (f - (cols == y).to(tl.float32))
            if HAS_TEACHER:
                if STUDENT_T_IS_ONE:
                    q = f
                else:
                    q = tl.exp(z * inv_student_temperature - q_shift) / q_sum
                t = tl.load(t_row + cols, mask=ok, other=neg_inf).to(tl.float32) * inv_temperature
                p = tl.exp(t - t_shift) / t_sum
                grad += tl.where(kd_scale == 0, 0.0, kd_grad * (q - p))
            if HAS_TOL:
                in_top = tl.max(((cols[:, None] == top_idx[None, :]) & (slots[None, :] < TOPK))
                                .to(tl.int32), axis=1) > 0
                w = tl.where(cols == top1, 1.0, tl.where(in_top, -1.0 / (TOPK - 1), 0.0))
                grad += tol_weight * f * (w - tol)
            if HAS_TARGET:  # a NaN loss for the label, a NaN gradient (as in _rows_kernel)
                grad = tl.where(label_ok | (ce_weight == 0), grad, float("nan"))
            grad = tl.where(counted, grad, 0.0)
            tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=ok)


def topk_pad(topk):
    """Slots of the chunked path's running top-K: a power of two >= TOPK."""
    return triton.next_power_of_2(max(topk, 2))


def register_path_config(n_rows, n_cols, multiprocessors=None):
    """``(BLOCK_R, BLOCK_C, num_warps)`` of the register path for an [n_rows, n_cols] input.

    Several short rows share a program (fewer, fuller programs), but never so many that the grid
    leaves streaming multiprocessors idle (``multiprocessors``: the GPU's count; None on the CPU).
    """
    block_c = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, ROWS_TILE // block_c))
    if multiprocessors is not None:
        # Aim for a few programs per multiprocessor; round down to a power of two.
        enough = max(1, n_rows // (4 * multiprocessors))
        block_r = min(block_r, 1 << (enough.bit_length() - 1))
    block_r = min(block_r, triton.next_power_of_2(n_rows))
    # Warps enough for ELEMENTS_PER_THREAD (ROWS_ELEMENTS_PER_THREAD for several rows) and no
    # more: extra warps would only hold masked-off lanes (a CIFAR-10 row is 16 wide).
    per_thread = ELEMENTS_PER_THREAD if block_r == 1 else ROWS_ELEMENTS_PER_THREAD
    num_warps = max(1, min(MAX_NUM_WARPS, block_r * block_c // (32 * per_thread)))
    return block_r, block_c, num_warps


@functools.lru_cache(maxsize=None)
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def distill_loss_forward(logits, target, teacher_logits, *, temperature, student_temperature,
                         ce_weight, kd_scale, tolerance_weight, topk, ignore_index, write_grad,
                         label_smoothing=0.0):
    """Launch the fused forward pass.

    Shapes: logits [N, C] (float32/bfloat16/float16), target [N] int64 or None, teacher_logits
    [N, C] (any of those float dtypes) or None; any strides (the kernels take the row strides,
    and what they read at unit stride, the columns and the labels, is made so here).
    ``kd_scale`` is the KL term's factor ``kd_weight * s``; ``tolerance_weight`` 0 switches the
    penalty off; ``label_smoothing`` ε makes the CE target (1 - ε) one-hot + ε/C. Returns
    ``(terms, grad)``: terms [5, N] float32 (each row's loss ``ce_weight*CE + kd_scale*KL +
    tolerance_weight*TOL``, then CE, KL, TOL, all zero for rows whose label is ignore_index; then 1
    for the rows that count and 0 for those) and grad [N, C] in ``gradient_dtype(logits.dtype)``,
    the gradient of each row's loss (an empty [0, C] tensor when ``write_grad`` is False).
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if teacher_logits is not None and teacher_logits.stride(-1) != 1:
        teacher_logits = teacher_logits.contiguous()
    if target is not None:
        target = target.contiguous()  # a label column of a table is strided
    n_rows, n_cols = logits.shape
    terms = torch.empty((TERM_ROWS, n_rows), dtype=torch.float32, device=logits.device)
    grad = torch.empty((n_rows if write_grad else 0, n_cols),
                       dtype=gradient_dtype(logits.dtype), device=logits.device)
    has_target = target is not None
    has_teacher = teacher_logits is not None
    has_tol = tolerance_weight > 0
    # Unused pointers still need a tensor: the logits stand in, and are never read through them.
    common = dict(
        n_rows=n_rows, n_cols=n_cols, inv_temperature=1.0 / temperature,
        inv_student_temperature=1.0 / student_temperature, ce_weight=ce_weight,
        kd_scale=kd_scale, tol_weight=tolerance_weight, label_smoothing=label_smoothing,
        ignore_index=ignore_index, HAS_TARGET=has_target, HAS_TEACHER=has_teacher,
        HAS_TOL=has_tol, HAS_SMOOTHING=has_target and label_smoothing > 0,
        STUDENT_T_IS_ONE=student_temperature == 1.0, TOPK=topk if has_tol else 2,
        WRITE_GRAD=write_grad,
    )
    args = (logits, logits.stride(0),
            teacher_logits if has_teacher else logits,
            teacher_logits.stride(0) if has_teacher else 0,
            target if has_target else terms, terms, grad if write_grad else terms,
            grad.stride(0) if write_grad else 0)
    on_gpu = logits.device.type == "cuda"
    # Triton launches on the current device (and its current stream): make that the logits'.
    with torch.cuda.device(logits.device) if on_gpu else contextlib.nullcontext():
        if n_cols <= MAX_REGISTER_COLUMNS:
            block_r, block_c, num_warps = register_path_config(
                n_rows, n_cols, _multiprocessors(logits.device) if on_gpu else None)
            _rows_kernel[(triton.cdiv(n_rows, block_r),)](
                *args, **common, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        else:
            _chunked_kernel[(n_rows,)](*args, **common, CHUNK=CHUNK_COLUMNS,
                                       TOPK_PAD=topk_pad(common["TOPK"]),
                                       num_warps=CHUNKED_NUM_WARPS)
    return terms, grad
