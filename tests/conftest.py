import os
import shutil
import subprocess
import tarfile

import pytest
import torch

# Without a GPU the Triton kernels are checked on CPU tensors under Triton's interpreter. Triton
# decides between compiling and interpreting when a kernel is defined, so this must be set before
# anything imports fastsd.kernels. (The benchmarks, in bench/, measure the native CPU path.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    if os.environ.get("TRITON_INTERPRET") == "1":
        _check_the_triton_interpreter_loops_over_arguments()


def _check_the_triton_interpreter_loops_over_arguments():
    """Stop the run with the fix when this Triton's interpreter cannot loop to a bound that is a
    kernel argument, as the chunked loss kernels do (``range(0, n_cols, CHUNK)``).

    Triton 3.6's interpreter (torch 2.11's) holds such an argument as a one-element array, and
    numpy 2.4 and later refuse ``int()`` of it; Triton 3.7 fixed it. Without this check a third of
    the loss tests would fail with a TypeError deep inside the interpreter.
    """
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def count_steps(out_ptr, n, STEP: tl.constexpr):
        steps = 0
        for _ in range(0, n, STEP):
            steps += 1
        tl.store(out_ptr, steps)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_steps[(1,)](out, 10, STEP=4)
    except Exception as error:  # the interpreter wraps the TypeError in its own error type
        pytest.exit(f"Triton {triton.__version__}'s CPU interpreter cannot loop over a kernel "
                    f"argument under numpy {np.__version__} ({error}), and the loss kernels do. "
                    f"Fix: pip install 'numpy<2.4', or a torch whose Triton is 3.7 or newer.",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    assert out.item() == 3, f"the interpreter counted {out.item()} steps of 4 in 10, not 3"


@pytest.fixture(scope="session")
def cifar_jpeg(cifar_jpeg_tar, tmp_path_factory):
    """A subset of the real CIFAR-10 JPEGs: train/<class>/00{00..19}.jpg and
    test/<class>/000{0..9}.jpg (200 training and 100 test images, ImageFolder layout)."""
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    patterns = ["train/*/00[01]?.jpg", "test/*/000?.jpg"]
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(cifar_jpeg_tar), "-C", str(root), "--wildcards",
                        *patterns], check=True)
    else:  # slower: Python walks all 60 000 members
        import fnmatch

        with tarfile.open(cifar_jpeg_tar) as tf:
            members = [m for m in tf
                       if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p in patterns)]
            tf.extractall(root, members=members, filter="data")
    assert len(list(root.glob("train/*/*.jpg"))) == 200
    assert len(list(root.glob("test/*/*.jpg"))) == 100
    return root
