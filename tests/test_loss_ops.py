"""The loss as torch.library ops: opcheck, torch.compile, bad input, GPU kernel compilation."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fastsd import DistillLoss, distill_loss
from fastsd.ops.distill import cpu_backend, triton_interpreting
from fastsd.reference import distill_loss_ref

CPU_BACKENDS = ["native", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_interpreting(), reason="Triton's interpreter is off"))]


def inputs(rows=5, classes=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(rows, classes, generator=g).to(dtype),
            torch.randint(0, classes, (rows,), generator=g),
            torch.randn(rows, classes, generator=g).to(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_teacher,with_target,tol", [(True, True, 0.3), (False, True, 0.0),
                                                          (True, False, 0.0), (False, False, 0.5)])
@pytest.mark.parametrize("write_grad", [True, False])
def test_opcheck_distill_loss_fwd(backend, with_teacher, with_target, tol, write_grad):
    z, y, t = inputs()
    args = (z, y if with_target else None, t if with_teacher else None, 2.0, 1.5, 0.7, 0.9, tol,
            3, -100, write_grad, 0.1)
    with cpu_backend(backend):
        torch.library.opcheck(torch.ops.fastsd.distill_loss_fwd.default, args)


def test_opcheck_native_cpu_op():
    from fastsd.ops.distill import _native_cpu_op
    op = _native_cpu_op()
    z, y, t = inputs(dtype=torch.float64)
    torch.library.opcheck(op.default, (z, y, t, 2.0, 1.0, 1.0, 1.0, 0.2, 4, -100, True, 0.1))


class TinyNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_model_and_loss_matches_eager(backend):
    torch.manual_seed(0)
    student, teacher = TinyNet(), TinyNet().eval()
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 10, (6,))
    kw = dict(temperature=3.0, ce_weight=4 / 3, tolerance_weight=0.2, topk=3)

    def forward(model, images, labels):
        with torch.no_grad():
            teacher_logits = teacher(images)
        return distill_loss(model(images), labels, teacher_logits, return_terms=True,
                            check_labels=False, **kw)

    eager_model = TinyNet()
    eager_model.load_state_dict(student.state_dict())
    with cpu_backend(backend):
        eager_loss, eager_terms = forward(eager_model, x, y)
        eager_loss.backward()
        torch._dynamo.reset()
        compiled = torch.compile(forward, fullgraph=True, backend="inductor")
        loss, terms = compiled(student, x, y)
        loss.backward()  # the backward graph AOTAutograd compiled with the forward
    torch.testing.assert_close(loss.detach(), eager_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(terms), torch.stack(eager_terms), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(student.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_module_face():
    x, y, t = inputs(rows=4, classes=9)
    criterion = DistillLoss(temperature=2.0, reduction="none")
    compiled = torch.compile(criterion, fullgraph=True)
    torch.testing.assert_close(compiled(x, y, t), distill_loss_ref(x, y, t, temperature=2.0,
                                                                   reduction="none"))


BAD_INPUTS = [
    (dict(logits=torch.arange(10).reshape(2, 5)),
     "float32, bfloat16, float16 or float64, got torch.int64: pass the network's raw scores"),
    # float8 is floating point too, but no kernel reads it (the C++ one refused it late)
    (dict(logits=torch.randn(3, 5).to(torch.float8_e4m3fn)),
     "got torch.float8_e4m3fn: cast them first"),
    (dict(teacher_logits=torch.randn(3, 5).to(torch.float8_e5m2)),
     "teacher_logits must be a float32, .* got torch.float8_e5m2"),
    (dict(logits=torch.randn(5)), "shape \\[batch, classes\\]"),
    (dict(logits=torch.randn(3, 0)), "logits have no classes"),
    (dict(target=torch.tensor([0, 1, 5])), "label 5 at index 2, outside \\[0, 5\\)"),
    (dict(target=torch.tensor([0, -3, 1])), "label -3"),
    (dict(target=torch.tensor([0, 1])), "target has shape"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), "integer tensor"),
    # a NumPy array's dtype alone ("int64") would read as if the value were fine
    (dict(target=np.array([0, 1, 2])), "integer tensor of class indices, got numpy.ndarray"),
    (dict(teacher_logits=np.ones((3, 5), np.float32)), "tensor of the same shape as logits, got "
                                                        "numpy.ndarray"),
    (dict(teacher_logits=torch.randn(3, 4)), "teacher_logits has shape"),
    (dict(teacher_logits=torch.randn(3, 5, requires_grad=True)), "constant of the loss"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(student_temperature=math.inf), "student_temperature must be"),
    (dict(ce_weight=-0.5), "ce_weight must be a finite number >= 0"),
    (dict(kd_weight=math.nan), "kd_weight must be"),
    (dict(tolerance_weight=-1.0), "tolerance_weight must be"),
    (dict(tolerance_weight=0.5, topk=1), "topk must be an integer in \\[2, 16\\]"),
    (dict(tolerance_weight=0.5, topk=17), "topk must be an integer in \\[2, 16\\]"),
    (dict(tolerance_weight=0.5, topk=6), "topk=6 is larger than the number of classes \\(5\\)"),
    # topk is checked with the penalty off too (the C++ kernel once sized its lists by it)
    (dict(topk=-1), "topk must be an integer in \\[2, 16\\]"),
    (dict(topk=None), "topk must be an integer in \\[2, 16\\]"),
    (dict(temperature=True), "temperature must be a finite number > 0"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(label_smoothing=1.0), "label_smoothing must be a number in \\[0, 1\\)"),
    (dict(label_smoothing=-0.1), "label_smoothing must be"),
    # the kernels would truncate 1.5 to 1 where the label check compares with 1.5
    (dict(ignore_index=1.5), "ignore_index must be an integer label value, got 1.5"),
    (dict(ignore_index=None), "ignore_index must be an integer"),
    (dict(ignore_index="-100"), "ignore_index must be an integer"),
    # a truthy string from a hand-written config would otherwise scale the KL term by T²
    (dict(t2_scaling="false"), "t2_scaling must be True or False, got 'false'"),
    (dict(t2_scaling=1), "t2_scaling must be True or False"),
]


@pytest.mark.parametrize("fn", ["fused", "reference"])
@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_bad_input_is_named(fn, override, message):
    args = dict(logits=torch.randn(3, 5), target=torch.tensor([0, 1, 2]),
                teacher_logits=torch.randn(3, 5))
    kwargs = {k: v for k, v in override.items() if k not in args}
    args.update({k: v for k, v in override.items() if k in args})
    loss_fn = distill_loss if fn == "fused" else distill_loss_ref
    with pytest.raises(ValueError, match=message):
        loss_fn(args["logits"], args["target"], args["teacher_logits"], **kwargs)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        DistillLoss(temperature=0)
    with pytest.raises(ValueError, match="topk"):
        DistillLoss(tolerance_weight=0.1, topk=40)
    with pytest.raises(ValueError, match="topk"):
        DistillLoss(topk=None)
    with pytest.raises(ValueError, match="t2_scaling"):
        DistillLoss(t2_scaling="no")


def test_numpy_scalars_are_numbers():
    x, y, t = inputs()
    got = distill_loss(x, y, t, temperature=np.float32(2.0), ce_weight=np.float64(1.5),
                       t2_scaling=np.bool_(True), tolerance_weight=0.5, topk=np.int64(3))
    torch.testing.assert_close(got, distill_loss_ref(x, y, t, temperature=2.0, ce_weight=1.5,
                                                     t2_scaling=True, tolerance_weight=0.5,
                                                     topk=3))
    with pytest.raises(ValueError, match="topk must be an integer"):
        distill_loss(x, y, t, topk=np.bool_(True))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_batch_of_no_rows(reduction):
    """logits[mask] with no row selected: 0 for "sum" and an empty tensor for "none", as
    F.cross_entropy gives, and 0 for "mean" (no row counts, as when all are ignored; there
    F.cross_entropy gives NaN); backward an empty gradient. The reference computes the same
    from its formula."""
    x = torch.randn(0, 7, requires_grad=True)
    y, t = torch.zeros(0, dtype=torch.long), torch.randn(0, 7)
    kw = dict(temperature=2.0, tolerance_weight=0.5, topk=3, reduction=reduction)
    loss, terms = distill_loss(x, y, t, return_terms=True, **kw)
    expected = distill_loss_ref(x, y, t, **kw)
    assert loss.dtype == expected.dtype == torch.float32 and loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(
        x, y, reduction=reduction).nan_to_num(0.0), rtol=0, atol=0, check_dtype=False)
    assert all(term.shape == loss.shape and not term.any() for term in terms)
    loss.sum().backward()
    assert x.grad.shape == (0, 7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_dynamic_shapes(backend):
    """dynamic=True makes the float arguments symbolic (SymFloat): the argument checks must
    trace them (math.isfinite could not), and the result must follow the batch size."""
    def loss_and_kl(x, y, t, temperature):
        loss, terms = distill_loss(x, y, t, temperature=temperature, ce_weight=1.5,
                                   return_terms=True)
        return loss, terms.kl

    compiled = torch.compile(loss_and_kl, fullgraph=True, dynamic=True, backend="aot_eager")
    with cpu_backend(backend):
        for rows, temperature in ((5, 2.0), (3, 3.0)):
            x, y, t = inputs(rows=rows)
            x = x.requires_grad_()
            loss, kl = compiled(x, y, t, temperature)
            loss.backward()
            ref_x = x.detach().double().requires_grad_()
            ref, ref_terms = distill_loss_ref(ref_x, y, t.double(), temperature=temperature,
                                              ce_weight=1.5, return_terms=True)
            ref.backward()
            torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(kl.double(), ref_terms.kl, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("classes", [6, 9000])
def test_unchecked_out_of_range_label_gives_nan_not_a_wild_read(backend, classes):
    """The row's loss and its gradient are NaN (so a check of the gradients alone, GradScaler's,
    skips the step); the other rows are exact; without the CE term the label is not read."""
    z, y, t = inputs(rows=3, classes=classes)
    y[1] = 1_000_000
    good = [0, 2]
    with cpu_backend(backend):
        for ce_weight in (1.0, 0.0):
            x = z.clone().requires_grad_()
            loss = distill_loss(x, y, t, temperature=2.0, ce_weight=ce_weight,
                                check_labels=False, reduction="none")
            loss.sum().backward()
            ref_x = z.double()[good].requires_grad_()
            ref = distill_loss_ref(ref_x, y[good], t.double()[good], temperature=2.0,
                                   ce_weight=ce_weight, reduction="none")
            ref.sum().backward()
            torch.testing.assert_close(loss[good].double(), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad[good].double(), ref_x.grad, rtol=1e-5, atol=1e-7)
            if ce_weight:
                assert torch.isnan(loss[1]) and torch.isnan(x.grad[1]).all()
            else:
                assert torch.isfinite(loss[1]) and torch.isfinite(x.grad[1]).all()


# Compiling the Triton kernels for the GPUs needs no GPU: this catches code that runs under the
# interpreter but would not compile (types, shapes, unsupported ops) on every CI run, and tile
# choices of the launcher whose registers would leave an SM few resident warps.
AOT_SCRIPT = textwrap.dedent("""
    import itertools
    from fastsd.kernels.aot import (
        K, compile_kernel, loss_constexprs, register_occupancy, resource_usage)

    shapes = {K._rows_kernel: dict(BLOCK_R=4, BLOCK_C=1024),
              K._chunked_kernel: dict(CHUNK=K.CHUNK_COLUMNS, TOPK_PAD=16)}
    count, spills = 0, []
    for fn, extra in shapes.items():
        for dtype, flags in itertools.product(("fp32", "bf16", "fp16"), ((1, 1, 1, 0, 1, 1),
                                                                        (1, 0, 0, 1, 0, 0),
                                                                        (0, 1, 1, 1, 1, 0))):
            target, teacher, tol, t_one, write, smoothing = flags
            constexprs = dict(loss_constexprs(target=target, teacher=teacher, tol=tol,
                                              student_t_is_one=t_one, write_grad=write,
                                              smoothing=smoothing, topk=16), **extra)
            for arch in (80, 90):
                kernel = compile_kernel(fn, dtype, constexprs, arch=arch, num_warps=8)
                if resource_usage(kernel)["local"]:
                    spills.append((fn.__name__, dtype, flags, arch))
                count += 1
    # and the configurations the launcher picks on an H100 (132 SMs), from one row per program to
    # 32, 1 to 32 warps: none spills, and each leaves room for a quarter of an SM's 64 warps
    crowded = []
    for tol in (0, 1):
        for rows, classes in ((256, 10), (65536, 10), (4096, 100), (16384, 100), (128, 300),
                              (4096, 300), (256, 1000), (4096, 1000), (2048, 8192)):
            block_r, block_c, warps = K.register_path_config(rows, classes, 132)
            kernel = compile_kernel(K._rows_kernel, "bf16",
                                    dict(loss_constexprs(tol=tol), BLOCK_R=block_r,
                                         BLOCK_C=block_c), arch=90, num_warps=warps)
            usage = resource_usage(kernel)
            if usage["local"]:
                spills.append(("_rows_kernel", rows, classes, warps))
            if register_occupancy(usage["reg"], warps) < 16:
                crowded.append((rows, classes, tol, block_r, warps, usage["reg"]))
            count += 1
    for tol in (0, 1):
        kernel = compile_kernel(K._chunked_kernel, "bf16",
                                dict(loss_constexprs(tol=tol), CHUNK=K.CHUNK_COLUMNS,
                                     TOPK_PAD=K.topk_pad(5 if tol else 2)),
                                arch=90, num_warps=K.CHUNKED_NUM_WARPS)
        registers = resource_usage(kernel)["reg"]
        if register_occupancy(registers, K.CHUNKED_NUM_WARPS) < 16:
            crowded.append(("chunked", tol, registers))
        count += 1
    print("compiled", count, "spilling", spills, "under 16 warps per SM", crowded)
""")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 56 spilling [] under 16 warps per SM []" in result.stdout, result.stdout
