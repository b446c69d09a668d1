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
