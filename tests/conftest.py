import os

import torch

# Without a GPU the Triton kernels are checked on CPU tensors under Triton's interpreter. Triton
# decides between compiling and interpreting when a kernel is defined, so this must be set before
# anything imports fastsd.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
