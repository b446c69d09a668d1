"""The fused distillation loss against the plain-PyTorch reference, on every backend.

Backends: "native" (the C++ CPU kernel), "triton" (the real Triton kernels under
TRITON_INTERPRET=1, on CPU tensors) and "cuda" (the Triton kernels on a GPU, when there is one).
"""

import math

import pytest
import torch

from fastsd import DistillLoss, DistillLossFunction, LossTerms, distill_loss
from fastsd.kernels import distill_loss as kernels
from fastsd.ops.distill import cpu_backend, triton_interpreting
from fastsd.reference import distill_loss_ref

BACKENDS = [
    "native",
    pytest.param("triton", marks=pytest.mark.skipif(
        not triton_interpreting(), reason="Triton's interpreter is off (TRITON_INTERPRET unset)")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

# Gradient tolerances: for bf16 logits the kernels round the row gradient to bf16 and scale it in
# backward, a second rounding (float16 logits keep a float32 gradient until it is scaled); the
# reference rounds once. Loss values are float32 in both.
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 4e-3), torch.float16: (3e-3, 5e-4),
            torch.float64: (1e-10, 1e-12)}


def on_backend(backend, *tensors):
    device = "cuda" if backend == "cuda" else "cpu"
    return [None if t is None else t.to(device) for t in tensors]


def run_both(backend, logits, target=None, teacher=None, upstream=None, **kw):
    """Loss, terms and gradient of the fused loss on ``backend`` and of the reference.

    The reference runs in float64 on the same input values, so it stands for the exact result:
    the fused kernels, which compute in float32, must come within float32 rounding of it.
    """
    ref_logits = logits.detach().double().requires_grad_()
    ref_loss, ref_terms = distill_loss_ref(ref_logits, target,
                                           None if teacher is None else teacher.double(),
                                           return_terms=True, **kw)
    if upstream is None:
        upstream = torch.randn(ref_loss.shape, dtype=ref_loss.dtype, generator=torch.Generator()
                               .manual_seed(7))
    (ref_loss * upstream).sum().backward()

    x, y, t = on_backend(backend, logits, target, teacher)
    x = x.detach().clone().requires_grad_()
    backend_ctx = cpu_backend(backend if backend != "cuda" else "auto")
    with backend_ctx:
        loss, terms = distill_loss(x, y, t, return_terms=True, **kw)
        (loss * upstream.to(loss.device)).sum().backward()
    return (loss.cpu(), LossTerms(*(v.cpu() for v in terms)), x.grad.cpu(),
            ref_loss.detach(), ref_terms, ref_logits.grad)


def assert_matches(backend, logits, target=None, teacher=None, **kw):
    loss, terms, grad, ref_loss, ref_terms, ref_grad = run_both(backend, logits, target, teacher,
                                                                **kw)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.shape == ref_loss.shape
    value_tol = dict(rtol=1e-5, atol=1e-5) if logits.dtype != torch.float64 else dict(
        rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss.double(), ref_loss, **value_tol)
    for name, got, want in zip(LossTerms._fields, terms, ref_terms):
        torch.testing.assert_close(got.double(), want, **value_tol,
                                   msg=lambda m: f"term {name}: {m}")
    rtol, atol = GRAD_TOL[logits.dtype]
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    scale = max(ref_grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=rtol, atol=atol * scale)


def make_inputs(rows, classes, dtype=torch.float32, seed=0, teacher_dtype=None, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=g) * spread).to(dtype)
    teacher = (torch.randn(rows, classes, generator=g) * spread).to(teacher_dtype or dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    return logits, target, teacher


TERM_SETS = {
    "ce": dict(with_target=True, with_teacher=False, kw={}),
    "kl": dict(with_target=False, with_teacher=True, kw=dict(temperature=2.0)),
    "tol": dict(with_target=False, with_teacher=False, kw=dict(tolerance_weight=0.7, topk=4)),
    "sd": dict(with_target=True, with_teacher=True,
               kw=dict(temperature=3.0, ce_weight=1 + 1 / 3, kd_weight=1.0)),
    "kd": dict(with_target=True, with_teacher=True,
               kw=dict(temperature=4.0, student_temperature=4.0, t2_scaling=True,
                       ce_weight=0.1, kd_weight=0.9)),
    "smoothed_sd": dict(with_target=True, with_teacher=True,
                        kw=dict(temperature=2.0, ce_weight=1.5, label_smoothing=0.1)),
    "all": dict(with_target=True, with_teacher=True,
                kw=dict(temperature=2.5, student_temperature=1.5, t2_scaling=True, ce_weight=0.6,
                        kd_weight=0.8, tolerance_weight=0.4, topk=5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("terms", list(TERM_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows,classes", [(1, 2), (7, 10), (5, 100), (3, 1000), (4, 1271)])
def test_terms_reductions_shapes(backend, terms, reduction, rows, classes):
    spec = TERM_SETS[terms]
    if spec["kw"].get("topk", 0) > classes:
        pytest.skip("topk above the class count")
    logits, target, teacher = make_inputs(rows, classes, seed=rows * classes)
    if rows > 2 and spec["with_target"]:
        target[1] = -100  # an ignored row
    assert_matches(backend, logits, target if spec["with_target"] else None,
                   teacher if spec["with_teacher"] else None, reduction=reduction, **spec["kw"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [None, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes_and_mixed_teacher(backend, dtype, teacher_dtype, reduction):
    logits, target, teacher = make_inputs(6, 333, dtype=dtype, teacher_dtype=teacher_dtype)
    target[0] = -100
    assert_matches(backend, logits, target, teacher, reduction=reduction,
                   **TERM_SETS["all"]["kw"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed and column-sliced logits, an expanded teacher and a strided label column give
    the contiguous inputs' loss and gradient (the kernels read labels at unit stride)."""
    logits, target, teacher = make_inputs(6, 40, seed=11)
    kw = dict(reduction="none", **TERM_SETS["all"]["kw"])
    with cpu_backend(backend if backend != "cuda" else "auto"):
        def loss_and_grad(z, y, t):
            z = z.detach().requires_grad_()
            loss = distill_loss(z, y, t, **kw)
            loss.backward(torch.arange(1.0, 7.0, device=loss.device))
            return loss, z.grad

        x, y, t = on_backend(backend, logits, target, teacher)
        want = loss_and_grad(x, y, t)
        label_table = torch.stack([y, torch.zeros_like(y)], dim=1)    # y is a column of it
        shapes = {
            "transposed": (x.t().contiguous().t(), y, t),
            "sliced": (torch.stack([x, x * 0], dim=2)[..., 0], label_table[:, 0], t),
            "expanded": (x[:1].expand(6, 40), y, t[:1].expand(6, 40)),
        }
        assert not shapes["sliced"][0].is_contiguous()
        assert label_table[:, 0].stride() == (2,)
        for name, (z, labels, tt) in shapes.items():
            ref = want if name != "expanded" else loss_and_grad(x[:1].repeat(6, 1), y,
                                                                 t[:1].repeat(6, 1))
            got = loss_and_grad(z, labels, tt)
            torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6, msg=name)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6, msg=name)
        # The op itself (what a user of torch.ops.fastsd calls) takes any strides too.
        args = (1.0, 1.0, 1.0, 1.0, 0.0, 5, -100, True)
        op = torch.ops.fastsd.distill_loss_fwd
        for got, want_op in zip(op(shapes["sliced"][0], label_table[:, 0], t[:1].expand(6, 40),
                                   *args),
                                op(x, y, t[:1].repeat(6, 1), *args)):
            torch.testing.assert_close(got, want_op, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_narrow_label_dtypes(backend):
    """int32 and uint8 labels are class indices like int64 ones; a uint8 label outside the classes
    is refused (compared as uint8, ignore_index -100 would wrap to 156 and let it through)."""
    logits, target, teacher = make_inputs(5, 100, seed=4)
    with cpu_backend(backend if backend != "cuda" else "auto"):
        x, y, t = on_backend(backend, logits, target, teacher)
        want = distill_loss(x, y, t, reduction="none")
        for dtype in (torch.int32, torch.uint8):
            torch.testing.assert_close(distill_loss(x, y.to(dtype), t, reduction="none"), want)
        bad = y.to(torch.uint8)
        bad[1] = 156
        with pytest.raises(ValueError, match="label 156 at index 1"):
            distill_loss(x, bad, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_terms_that_do_not_count(backend):
    """A term that does not count adds nothing, also where it is infinite (0 * inf is NaN): an
    ignored row whose logits make CE or KL infinite, and a term whose weight is 0."""
    logits, target, teacher = make_inputs(4, 30, seed=8)
    logits[1, :] = 0.0
    logits[1, 0] = -math.inf            # an ignored row; CE at the placeholder class 0 is inf
    target[1] = -100
    kw = dict(TERM_SETS["sd"]["kw"])
    assert_matches(backend, logits, target, teacher, **kw)
    assert_matches(backend, logits, target, None)
    logits, target, teacher = make_inputs(4, 30, seed=9)
    logits[0, target[0]] = -math.inf    # CE of row 0 is inf, and KL too (the teacher is finite)
    for switched_off in (dict(ce_weight=0.0, kd_weight=0.0, tolerance_weight=0.5, topk=3),
                         dict(ce_weight=0.0, kd_weight=0.0)):
        for reduction in ("none", "sum"):
            loss, terms, grad, ref_loss, _, ref_grad = run_both(
                backend, logits, target, teacher, reduction=reduction, temperature=2.0,
                **switched_off)
            assert torch.isinf(terms.ce).any() if reduction == "none" else torch.isinf(terms.ce)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    # a teacher that overflowed (an fp16 snapshot's inf) under kd_weight 0: the loss is CE's and
    # so is the gradient, with no 0 * NaN of the left-out term; on the chunked path too
    for classes in (30, 5000):
        logits, target, teacher = make_inputs(3, classes, seed=10)
        teacher[0, 0] = math.inf
        _, terms, grad, _, _, _ = run_both(backend, logits, target, teacher, kd_weight=0.0,
                                           reduction="sum", upstream=torch.tensor(1.0))
        ref = logits.detach().double().requires_grad_()
        torch.nn.functional.cross_entropy(ref, target, reduction="sum").backward()
        assert torch.isnan(terms.kl).any()  # (the logged term still says what the teacher was)
        torch.testing.assert_close(grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [9, 5000], ids=["one-tile", "chunked"])
def test_label_smoothing_of_huge_logits_does_not_overflow(backend, classes):
    """ε (lse - mean z): the mean of logits near float32's largest is taken without their sum,
    which would overflow to inf (the float64 reference stays finite)."""
    logits = torch.full((2, classes), 1e38)  # (their sum: 9e38 and 5e41, past 3.4e38)
    logits[:, 0] = 2e38
    target = torch.tensor([0, 1])
    loss, _, grad, ref_loss, _, ref_grad = run_both(backend, logits, target, None,
                                                    label_smoothing=0.1, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_second_derivative_is_refused():
    """The gradient is computed in the forward pass (a constant to autograd), so a second
    derivative would silently be 0: create_graph=True is an error that names the way out."""
    logits, target, teacher = make_inputs(3, 10)
    x = logits.clone().requires_grad_()
    loss = distill_loss(x, target, teacher, temperature=2.0)
    with pytest.raises(RuntimeError, match="no second derivative.*distill_loss_ref"):
        torch.autograd.grad(loss, x, create_graph=True)
    first, = torch.autograd.grad(distill_loss_ref(x, target, teacher, temperature=2.0), x,
                                 create_graph=True)
    assert first.requires_grad  # the reference's is a real function of x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [9000, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_chunked(backend, classes, dtype):
    """Rows longer than the register tile take the chunked online-softmax path."""
    assert classes > kernels.MAX_REGISTER_COLUMNS
    rows = 3 if classes < 100_000 else 2
    logits, target, teacher = make_inputs(rows, classes, dtype=dtype, seed=classes)
    # The largest logits sit in different chunks, and a tie across chunks must go to the
    # lower index, as in the reference.
    logits[0, 5] = logits[0, classes - 3] = logits[0].max() + 1
    target[-1] = -100
    for kw in (TERM_SETS["all"]["kw"], dict(tolerance_weight=0.3, topk=16), {}):
        assert_matches(backend, logits, target, teacher, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_infinite_kl_term_whose_teacher_weight_vanishes(backend):
    """The chunked path rescales its running KL sum when a later chunk raises the teacher's
    max. A student logit of -inf where the first chunk's teacher is finite makes that sum
    infinite; once the teacher's max is 1000 higher (beyond even float64's exp, so the float64
    reference agrees) its weight there is 0 and, by 0 log 0 = 0, so is its term: the KL is
    finite (inf * 0 once gave NaN)."""
    classes = 9000
    assert classes > kernels.CHUNK_COLUMNS
    logits, target, teacher = make_inputs(2, classes, seed=4)
    logits[:, 0] = -math.inf
    teacher[:, :kernels.CHUNK_COLUMNS] = 0.0
    teacher[0, classes - 5] = 2000.0  # row 0: the max in the last chunk; row 1: mass at class 0
    loss, terms, grad, ref_loss, ref_terms, ref_grad = run_both(
        backend, logits, target, teacher, temperature=2.0, reduction="none")
    assert torch.isfinite(terms.kl[0]) and torch.isinf(terms.kl[1])
    torch.testing.assert_close(terms.kl.double(), ref_terms.kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[0].double(), ref_grad[0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.skipif(not triton_interpreting(), reason="Triton's interpreter is off")
@pytest.mark.parametrize("rows,classes", [(300, 10), (600, 100), (1100, 60)])
def test_kernels_in_the_tiles_the_launcher_picks_for_a_gpu(monkeypatch, rows, classes):
    """On CUDA the launcher sizes the row tiles by the number of SMs (fewer rows per program than
    on the CPU); run those tiles under the interpreter: an H100's 132 SMs, and a small GPU's 8."""
    from fastsd.kernels import distill_loss as K

    picked = []
    config = K.register_path_config
    for sms in (132, 8):
        def gpu_config(n_rows, n_cols, multiprocessors=None, sms=sms):
            picked.append(config(n_rows, n_cols, sms))
            return picked[-1]

        monkeypatch.setattr(K, "register_path_config", gpu_config)
        logits, target, teacher = make_inputs(rows, classes, seed=rows)
        assert_matches("triton", logits, target, teacher, **TERM_SETS["all"]["kw"])
    assert len({block_r for block_r, _, _ in picked}) > 1     # the two GPUs tile differently


@pytest.mark.parametrize("backend", BACKENDS)
def test_b_equals_one_and_leading_dims(backend):
    logits, target, teacher = make_inputs(1, 50)
    assert_matches(backend, logits, target, teacher, reduction="mean", **TERM_SETS["sd"]["kw"])
    logits, target, teacher = make_inputs(12, 37)
    assert_matches(backend, logits.reshape(3, 4, 37), target.reshape(3, 4),
                   teacher.reshape(3, 4, 37), reduction="none", **TERM_SETS["all"]["kw"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_rows_contribute_nothing(backend):
    logits, target, teacher = make_inputs(6, 20)
    target[[0, 3, 4]] = -1
    kw = dict(ignore_index=-1, **TERM_SETS["all"]["kw"])
    assert_matches(backend, logits, target, teacher, **kw)
    _, _, grad, *_ = run_both(backend, logits, target, teacher, **kw)
    assert torch.all(grad[[0, 3, 4]] == 0) and torch.all(grad[[1, 2, 5]].abs().sum(-1) > 0)
    # "mean" divides by the three rows that count: equal to the mean over those rows alone.
    keep = target != -1
    with cpu_backend(backend if backend != "cuda" else "auto"):
        whole = distill_loss(*on_backend(backend, logits, target, teacher), **kw)
        part = distill_loss(*on_backend(backend, logits[keep], target[keep], teacher[keep]), **kw)
        terms, _ = torch.ops.fastsd.distill_loss_fwd(
            *on_backend(backend, logits, target, teacher), 1.0, 1.0, 1.0, 1.0, 0.0, 5, -1, False)
    torch.testing.assert_close(whole, part)
    assert terms[4].tolist() == keep.float().tolist()      # the op's "counted" row
    # All rows ignored: the mean is 0, not NaN.
    target[:] = -1
    assert_matches(backend, logits, target, teacher, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["fp16_extremes", "teacher_neg_inf", "equal_logits", "tiny_T",
                                  "huge_T", "student_neg_inf"])
def test_edge_cases(backend, case):
    logits, target, teacher = make_inputs(5, 64, seed=3)
    dtype = torch.float32
    kw = dict(TERM_SETS["all"]["kw"])
    if case == "fp16_extremes":
        dtype = torch.float16
        logits = logits.to(dtype)
        teacher = teacher.to(dtype)
        logits[0, :2] = torch.tensor([65504.0, -65504.0], dtype=dtype)
        logits[1, 10] = -65504.0
        target[1] = 10
        teacher[2, :3] = torch.tensor([65504.0, -65504.0, 65504.0], dtype=dtype)
    elif case == "teacher_neg_inf":
        teacher[0, 3] = -math.inf
        teacher[1, :60] = -math.inf
    elif case == "student_neg_inf":
        logits[0, 7] = -math.inf  # the teacher gives it no mass either: 0 * log 0 = 0
        teacher[0, 7] = -math.inf
        target[0] = 2
    elif case == "equal_logits":
        logits[0] = 1.5
        teacher[1] = -2.0
        logits[2, :10] = 4.0  # a tie inside the top-K
    elif case == "tiny_T":
        kw.update(temperature=0.02, student_temperature=0.05)
    elif case == "huge_T":
        # Both softmaxes are nearly uniform, so KL (about 1e-5 here) is a difference of nearly
        # equal logs: float32 gets it to about 3e-7 absolute, fine on its own but not once
        # multiplied by T² = 1e6. Hence no T² scaling in this check.
        kw.update(temperature=1000.0, student_temperature=300.0, t2_scaling=False)
    assert_matches(backend, logits, target, teacher, **kw)
    loss, *_ = run_both(backend, logits, target, teacher, **kw)
    assert torch.isfinite(loss).all()
    if case == "huge_T":
        # Next to CE's, the KL gradient is 1e-8 of the total here: check it alone, at its own
        # scale, and the KL to float32's reach (3e-7 of 5.3e-5: a 1 % error fails). Its
        # gradient (q - p) / T_s is a difference of nearly equal probabilities (1/64 ± 1e-4),
        # which float32 gets to about 1e-5 of its largest entry.
        kl_only = dict(kw, ce_weight=0.0, tolerance_weight=0.0)
        _, terms, grad, _, ref_terms, ref_grad = run_both(backend, logits, target, teacher,
                                                          **kl_only)
        torch.testing.assert_close(terms.kl.double(), ref_terms.kl, rtol=0, atol=5e-7)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0,
                                   atol=3e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["logits", "teacher"])
def test_nan_input_gives_nan_loss(backend, where):
    logits, target, teacher = make_inputs(3, 40)
    (logits if where == "logits" else teacher)[1, 5] = math.nan
    with cpu_backend(backend if backend != "cuda" else "auto"):
        loss = distill_loss(*on_backend(backend, logits, target, teacher), temperature=2.0)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_module_and_functional_agree(backend):
    logits, target, teacher = make_inputs(7, 30)
    kw = TERM_SETS["all"]["kw"]
    x, y, t = on_backend(backend, logits, target, teacher)
    with cpu_backend(backend if backend != "cuda" else "auto"):
        functional = distill_loss(x, y, t, **kw)
        module = DistillLoss(**kw)(x, y, t)
        loss, parts = DistillLossFunction.apply(
            x, y, t, kw["temperature"], kw["student_temperature"], kw["ce_weight"],
            kw["kd_weight"], kw["t2_scaling"], kw["tolerance_weight"], kw["topk"], -100, "mean")
        module_terms = DistillLoss(return_terms=True, **kw)(x, y, t)
    ref = distill_loss_ref(logits, target, teacher, **kw)
    for value in (functional, module, loss, module_terms[0]):
        torch.testing.assert_close(value.cpu(), ref)
    assert parts.shape == (3,)
    assert isinstance(module_terms[1], LossTerms)


@pytest.mark.parametrize("backend", ["native", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_logged_terms_recombine_to_the_loss(backend):
    """The logged terms are the unweighted means, and their weighted sum is the loss."""
    logits, target, teacher = make_inputs(9, 12)
    kw = TERM_SETS["all"]["kw"]
    with cpu_backend(backend if backend != "cuda" else "auto"):
        loss, terms = distill_loss(*on_backend(backend, logits, target, teacher),
                                   return_terms=True, **kw)
    kd_scale = kw["kd_weight"] * kw["temperature"] ** 2
    combined = kw["ce_weight"] * terms.ce + kd_scale * terms.kl + kw["tolerance_weight"] * \
        terms.tolerance
    torch.testing.assert_close(loss, combined)
    assert not any(term.requires_grad for term in terms)


@pytest.mark.parametrize("backend", ["native", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_bf16_gradient_is_rounded_to_nearest(backend):
    """With "sum" and an upstream gradient of 1 backward's scale is exact, so the bf16 gradient
    is the kernel's float32 one rounded once: within half a bf16 ulp of the exact value.
    Truncation, which Triton's interpreter does (so "triton" is left out), would be up to a
    whole ulp off."""
    logits, target, teacher = make_inputs(64, 300, dtype=torch.bfloat16, seed=3)
    kw = TERM_SETS["all"]["kw"]
    ref_x = logits.double().requires_grad_()
    distill_loss_ref(ref_x, target, teacher.double(), reduction="sum", **kw).backward()
    x, y, t = on_backend(backend, logits, target, teacher)
    x.requires_grad_()
    with cpu_backend(backend if backend != "cuda" else "auto"):
        distill_loss(x, y, t, reduction="sum", **kw).backward()
    exact, got = ref_x.grad, x.grad.cpu().double()
    # Entries far below the row's largest carry float32's cancellation error (a difference of
    # probabilities near 1), itself up to a bf16 ulp of theirs: they are left out.
    large = exact.abs() >= 1e-3 * exact.abs().amax()
    ulp = torch.exp2(torch.floor(torch.log2(exact[large].abs())) - 7)   # bf16: 8 bits
    error_in_ulps = (got[large] - exact[large]).abs() / ulp
    assert error_in_ulps.max().item() <= 0.51, error_in_ulps.max().item()
    assert int(large.sum()) > 0.5 * exact.numel()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_logits_gpu_not_the_current_one():
    logits, target, teacher = make_inputs(8, 100)
    kw = TERM_SETS["sd"]["kw"]
    ref_x = logits.double().requires_grad_()
    ref = distill_loss_ref(ref_x, target, teacher.double(), **kw)
    ref.backward()
    with torch.cuda.device(0):
        x = logits.to("cuda:1").requires_grad_()
        loss = distill_loss(x, target.to("cuda:1"), teacher.to("cuda:1"), **kw)
        loss.backward()
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), ref_x.grad, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64_native():
    """float64 runs the C++ kernel in float64: its analytic gradient against finite differences."""
    logits, target, teacher = make_inputs(3, 7, dtype=torch.float64, spread=1.0)
    target[2] = -100
    for kw in (TERM_SETS["all"]["kw"], dict(tolerance_weight=0.5, topk=3), {},
               dict(label_smoothing=0.3, temperature=2.0)):
        for reduction in ("mean", "sum", "none"):
            x = logits.clone().requires_grad_()
            assert torch.autograd.gradcheck(
                lambda z: distill_loss(z, target, teacher, reduction=reduction, **kw), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [10, 9000])
def test_label_smoothing_equals_torch_cross_entropy(backend, classes):
    """An independent oracle for the smoothed CE: torch's own cross_entropy(label_smoothing=ε)."""
    logits, target, _ = make_inputs(5, classes)
    target[2] = -100
    x = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x, target, label_smoothing=0.2)
    expected.backward()
    ours = logits.clone().requires_grad_()
    with cpu_backend(backend if backend != "cuda" else "auto"):
        xs, ys = on_backend(backend, ours, target)
        loss = distill_loss(xs, ys, label_smoothing=0.2)
        loss.backward()
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad, x.grad, rtol=1e-4, atol=1e-7)


def test_gradcheck_float64_reference():
    """The oracle itself: its autograd gradient against finite differences."""
    logits, target, teacher = make_inputs(3, 7, dtype=torch.float64, spread=1.0)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: distill_loss_ref(z, target, teacher, **TERM_SETS["all"]["kw"]), (x,))


def test_reference_gives_an_ignored_row_no_gradient():
    """The oracle: an ignored row adds nothing, also when its logits are a padding row of -inf
    or NaN (a where after the terms would pass back 0 * NaN)."""
    logits, target, teacher = make_inputs(3, 6, dtype=torch.float64)
    logits[1] = -math.inf
    logits[2, 0] = math.nan
    target[1:] = -100
    x = logits.clone().requires_grad_()
    distill_loss_ref(x, target, teacher, temperature=2.0).backward()
    assert torch.equal(x.grad[1:], torch.zeros(2, 6, dtype=torch.float64))
    assert torch.isfinite(x.grad[0]).all() and x.grad[0].abs().sum() > 0


def test_gradient_matches_design_formula():
    """d loss / dz = λS (f − e_y) + (λT s / Ts)(q − p) + μ f ⊙ (w − TOL), written out by hand."""
    logits, target, teacher = make_inputs(4, 9, dtype=torch.float64, spread=1.0)
    T, Ts, lam_s, lam_t, mu, k = 2.0, 1.5, 0.7, 0.9, 0.3, 3
    x = logits.clone().requires_grad_()
    distill_loss(x, target, teacher, temperature=T, student_temperature=Ts, ce_weight=lam_s,
                 kd_weight=lam_t, t2_scaling=True, tolerance_weight=mu, topk=k,
                 reduction="sum").backward()
    f = torch.softmax(logits, -1)
    q = torch.softmax(logits / Ts, -1)
    p = torch.softmax(teacher / T, -1)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    w = torch.zeros_like(f).scatter_(1, order[:, 1:], -1 / (k - 1)).scatter_(1, order[:, :1], 1.0)
    tol = (w * f).sum(-1, keepdim=True)
    expected = lam_s * (f - torch.nn.functional.one_hot(target, 9)) \
        + lam_t * T * T / Ts * (q - p) + mu * f * (w - tol)
    torch.testing.assert_close(x.grad, expected)


def test_no_gradient_written_without_requires_grad():
    logits, target, teacher = make_inputs(3, 10)
    terms, grad = torch.ops.fastsd.distill_loss_fwd(logits, target, teacher, 1.0, 1.0, 1.0, 1.0,
                                                    0.0, 5, -100, False)
    assert grad.numel() == 0 and terms.shape == (5, 3)
    loss = distill_loss(logits, target, teacher)
    torch.testing.assert_close(loss, distill_loss_ref(logits, target, teacher))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [100, 9000])
def test_fp16_gradient_survives_the_loss_scale(backend, classes):
    """fp16 training: backward receives the GradScaler's scale (2**16 at first) and the gradient
    of float16 logits must be the exact one rounded to float16 once, after scaling. A confident
    student's small softmax entries (here 1e-9 .. 1e-4) flush to zero or lose most of their
    digits if the stored gradient is float16 (it is float32: kernels' gradient_dtype)."""
    rows = 32 if classes < 1000 else 4
    logits, target, teacher = make_inputs(rows, classes, seed=5, spread=1.0)
    g = torch.Generator().manual_seed(6)
    logits[torch.arange(rows), target] += 10 + 10 * torch.rand(rows, generator=g)
    logits = logits.half()
    teacher = (teacher * 3).half()
    kw = TERM_SETS["sd"]["kw"]
    _, _, grad, _, _, ref_grad = run_both(backend, logits, target, teacher,
                                          upstream=torch.tensor(2.0 ** 16, dtype=torch.float64),
                                          **kw)
    assert grad.dtype == torch.float16
    expected = ref_grad.to(torch.float16).float()
    assert (expected != 0).sum() > 0.9 * expected.numel()
    # One rounding each (fused kernel in float32, reference in float64): at most one fp16 step
    # apart, the smallest subnormal (6e-8) for the tiniest entries.
    torch.testing.assert_close(grad.float(), expected, rtol=2 ** -10, atol=6e-8)
    if backend != "cuda":
        with cpu_backend(backend):
            _, stored = torch.ops.fastsd.distill_loss_fwd(logits, target, teacher, 3.0, 1.0, 1.0,
                                                          1.0, 0.0, 5, -100, True)
        assert stored.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_can_be_changed_in_place(backend, reduction):
    """`loss /= accum_steps`, as with F.cross_entropy: the loss and the terms are tensors of
    their own, not views of the kernels' output (which autograd forbids to modify in place)."""
    logits, target, teacher = on_backend(backend, *make_inputs(4, 12, seed=3))
    x = logits.clone().requires_grad_()
    with cpu_backend(backend if backend != "cuda" else "auto"):
        loss, terms = distill_loss(x, target, teacher, temperature=2.0, reduction=reduction,
                                   return_terms=True)
    loss /= 4
    terms.ce.mul_(2)
    loss.sum().backward()
    ref_x = logits.detach().double().requires_grad_()
    ref = distill_loss_ref(ref_x, target, teacher.double(), temperature=2.0, reduction=reduction)
    (ref.sum() / 4).backward()
    torch.testing.assert_close(loss.double(), ref / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-7)


def test_no_gradient_computed_under_no_grad(monkeypatch):
    """Under torch.no_grad nothing calls backward, so the kernels are not asked for the
    gradient even when the logits require grad (an evaluation of a training model)."""
    from fastsd import losses
    asked = []
    real = losses._distill_ops.run_distill_loss_fwd

    def spy(*args):
        asked.append(args[10])  # write_grad
        return real(*args)

    monkeypatch.setattr(losses._distill_ops, "run_distill_loss_fwd", spy)
    logits, target, teacher = make_inputs(3, 10)
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        loss = distill_loss(x, target, teacher, temperature=2.0)
    assert asked == [False] and loss.grad_fn is None
    torch.testing.assert_close(loss, distill_loss_ref(logits, target, teacher, temperature=2.0))
    distill_loss(x, target, teacher, temperature=2.0)
    assert asked == [False, True]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_gradients(reduction):
    """autograd.grad(..., is_grads_batched=True) (what vectorised jacobians use) runs backward
    under vmap: each incoming gradient scales the stored one out of place."""
    logits, target, teacher = make_inputs(3, 7, seed=2)
    upstream = torch.eye(3) if reduction == "none" else torch.tensor([1.0, -2.0])
    grads = []
    for fn in (distill_loss, distill_loss_ref):
        x = logits.clone().requires_grad_()
        loss = fn(x, target, teacher, temperature=2.0, reduction=reduction)
        grads.append(torch.autograd.grad(loss, x, upstream, is_grads_batched=True)[0])
    assert grads[0].shape == (upstream.shape[0], 3, 7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_retained_graph_gives_the_same_gradient_twice():
    """With retain_graph the stored gradient is scaled out of place, so a second pass is right."""
    logits, target, teacher = make_inputs(3, 10)
    x = logits.clone().requires_grad_()
    loss = distill_loss(x, target, teacher, temperature=2.0)
    first, = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    second, = torch.autograd.grad(loss * 3.0, x)
    torch.testing.assert_close(second, first * 1.5)
