"""pytest configuration shared by tests/ and bench/: tests marked ``gpu`` are skipped without CUDA,
and the real data set (CIFAR-10 as JPEG files) is found in one place."""

import os
from pathlib import Path

import pytest
import torch

#: the CIFAR-10 JPEG archive beside the checkout (../shared/datasets); FASTSD_CIFAR_JPEG_TAR points
#: elsewhere, e.g. on a GPU machine where ../shared is not present
CIFAR_JPEG_TAR = Path(os.environ.get("FASTSD_CIFAR_JPEG_TAR") or
                      Path(__file__).resolve().parent.parent / "shared" / "datasets" /
                      "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="session")
def cifar_jpeg_tar() -> Path:
    """The CIFAR-10 JPEG archive (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg); skips without
    it."""
    if not CIFAR_JPEG_TAR.is_file():
        pytest.skip(f"{CIFAR_JPEG_TAR} not found: set FASTSD_CIFAR_JPEG_TAR to the CIFAR-10 JPEG "
                    f"archive (shared/datasets/cifar10-jpeg.tar.gz)")
    return CIFAR_JPEG_TAR


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
