import os

import torch

# Without a GPU the Triton kernels are checked on CPU tensors under Triton's interpreter. Triton
# decides between compiling and interpreting when a kernel is defined, so this must be set before
# anything imports fastsd.kernels. (The benchmarks, in bench/, measure the native CPU path.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
