"""Registers, spills and shared memory of the loss kernels as the launcher configures them on a GPU,
read from cubins compiled ahead of time: needs no GPU.

    TRITON_INTERPRET= python bench/kernel_resources.py [--arch 90] [--sms 132] [--out FILE.md]

For each case (rows x classes, terms) it takes the launcher's choice of path, BLOCK_R, BLOCK_C
and warps for a GPU with ``--sms`` multiprocessors (132: H100 SXM), compiles that variant for
``sm_<arch>`` and reports what ptxas allocated. Spills (local memory) on the register path mean
the tile is too large for its warps; the occupancy column is the bound the registers alone set
(warps resident per SM out of 64), which a memory-bound kernel wants at a quarter or more:
tests/test_loss_ops.py holds the launcher's choices to that.
"""

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET unset: the interpreter does not compile kernels")

import triton  # noqa: E402

from fastsd.kernels.aot import (  # noqa: E402
    K, compile_kernel, loss_constexprs, register_occupancy, resource_usage)

CASES = [  # (rows, classes, terms)
    (256, 10, "sd"), (65536, 10, "sd"), (256, 100, "sd"), (16384, 100, "sd"), (16384, 100, "tt"),
    (4096, 300, "sd"), (256, 1000, "sd"), (1024, 1000, "sd"), (4096, 1000, "sd"),
    (1024, 1000, "tt"), (4096, 1000, "tt"), (2048, 8192, "sd"), (8192, 32000, "sd"),
    (8192, 32000, "tt"), (8192, 131072, "sd"),
]
TERMS = {"sd": dict(tol=False), "tt": dict(tol=True, topk=5)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors (default 132: H100)")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)

    lines = [f"# Loss kernels on sm_{args.arch} ({args.sms} SMs), {args.dtype} logits: resources",
             "", f"Compiled ahead of time by Triton {triton.__version__} "
             "(bench/kernel_resources.py, no GPU needed): what ptxas allocates for the "
             "configuration the launcher picks, not a measurement on a GPU.",
             "", "| rows x classes | terms | path | BLOCK_R x BLOCK_C | warps | registers | "
             "spills (bytes) | shared (bytes) | warps/SM by registers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rows, classes, terms in CASES:
        flags = loss_constexprs(**TERMS[terms])
        if classes <= K.MAX_REGISTER_COLUMNS:
            block_r, block_c, warps = K.register_path_config(rows, classes, args.sms)
            fn, extra, path = K._rows_kernel, dict(BLOCK_R=block_r, BLOCK_C=block_c), "rows"
            tile = f"{block_r} x {block_c}"
        else:
            warps, path, tile = K.CHUNKED_NUM_WARPS, "chunked", f"1 x {K.CHUNK_COLUMNS}"
            fn = K._chunked_kernel
            extra = dict(CHUNK=K.CHUNK_COLUMNS, TOPK_PAD=K.topk_pad(flags["TOPK"]))
        usage = resource_usage(compile_kernel(fn, args.dtype, dict(flags, **extra),
                                              arch=args.arch, num_warps=warps))
        lines.append(f"| {rows} x {classes} | {terms} | {path} | {tile} | {warps} | {usage['reg']} "
                     f"| {usage['local']} | {usage['shared']} | "
                     f"{register_occupancy(usage['reg'], warps)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:  # whole or not at all
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
