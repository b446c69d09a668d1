"""Ahead-of-time compilation of the loss kernels for a GPU architecture, with no GPU present.

Triton compiles down to a cubin for any target on any machine (ptxas ships with it), so a CPU-only
machine can check that every kernel variant compiles for sm_80 / sm_90 (tests/test_loss_ops.py)
and read the registers, spills and shared memory each one needs and the occupancy these allow
(bench/kernel_resources.py).
Run with TRITON_INTERPRET unset: under the interpreter the kernels are not compilable objects.
"""

import os
import re
import subprocess
import tempfile
from typing import Dict

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import distill_loss as K

#: integer scalar arguments of the kernels (the other scalars are float32)
_INT_ARGS = ("z_stride", "t_stride", "grad_stride", "n_rows", "n_cols", "ignore_index")
_TRITON_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def signature(fn, dtype: str, constexprs: Dict[str, int]) -> Dict[str, str]:
    """Triton's signature of a loss kernel: logits and teacher in ``dtype`` ("fp32", "bf16",
    "fp16"), the gradient in ``gradient_dtype`` of it, int64 labels, float32 terms."""
    grad_dtype = K.gradient_dtype(_TRITON_DTYPES[dtype])
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "y_ptr":
            sig[name] = "*i64"
        elif name == "terms_ptr":
            sig[name] = "*fp32"
        elif name == "grad_ptr":
            sig[name] = "*" + next(k for k, v in _TRITON_DTYPES.items() if v == grad_dtype)
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in _INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def loss_constexprs(*, target=True, teacher=True, tol=False, student_t_is_one=True,
                    write_grad=True, smoothing=False, topk=5) -> Dict[str, int]:
    """The specialisation flags the launcher passes for one use of the loss."""
    return dict(HAS_TARGET=int(target), HAS_TEACHER=int(teacher), HAS_TOL=int(tol),
                HAS_SMOOTHING=int(smoothing), STUDENT_T_IS_ONE=int(student_t_is_one),
                TOPK=topk if tol else 2, WRITE_GRAD=int(write_grad))


def compile_kernel(fn, dtype: str, constexprs: Dict[str, int], *, arch: int, num_warps: int):
    """Compile ``fn`` (``K._rows_kernel`` or ``K._chunked_kernel``) for ``sm_<arch>``."""
    return triton.compile(ASTSource(fn=fn, signature=signature(fn, dtype, constexprs),
                                    constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def resource_usage(compiled) -> Dict[str, int]:
    """Registers per thread, local memory (spills) and shared memory of a compiled kernel, as
    cuobjdump reads them from its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in usage.items()}


MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 65536


def register_occupancy(registers: int, num_warps: int) -> int:
    """Warps resident per SM (of 64, sm_80 and sm_90) as the register file alone allows, for a
    kernel of ``registers`` per thread launched with ``num_warps``: registers are allocated per
    warp in units of 256, and a program's warps are resident together or not at all."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(MAX_BLOCKS_PER_SM, REGISTERS_PER_SM // (per_warp * num_warps))
    return min(MAX_WARPS_PER_SM, blocks * num_warps)


__all__ = ["signature", "loss_constexprs", "compile_kernel", "resource_usage",
           "register_occupancy", "K"]
