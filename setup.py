"""Build of fastsd and its C++/CUDA extension ``fastsd._C``.

The extension is always built: a CUDA build when a CUDA toolkit and a CUDA-enabled torch are
present, a CPU-only build otherwise. ``FASTSD_BUILD=cuda`` or ``FASTSD_BUILD=cpu`` forces one.

Install torch first, then this project with ``--no-build-isolation`` (an isolated build would
download a second multi-GB torch just to compile against it).
"""

import glob
import os
import shutil
import sys

import setuptools
from setuptools import find_packages, setup

# pyproject.toml's license is an SPDX string (PEP 639), which older setuptools reject with a
# schema error that does not say what to do. (--no-build-isolation builds with whatever
# setuptools is installed: pip checks no build requirement then.)
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"fastsd needs setuptools >= 77 to build, found {setuptools.__version__}: "
             f"pip install -U 'setuptools>=77', then install fastsd again")

HERE = os.path.dirname(os.path.abspath(__file__))
# T4/RTX 20, A100, A10/A40/RTX 30, L4/L40/RTX 40, H100/H200 as machine code; the PTX of the last
# (+PTX below) lets newer chips (Blackwell) compile it at load time
CUDA_ARCHS = ["75", "80", "86", "89", "90"]


def _has_cudart(root):
    for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        if glob.glob(os.path.join(root, lib, "libcudart.so*")):
            return True
    return False


def find_cuda_home():
    """A CUDA toolkit root holding both ``bin/nvcc`` and ``libcudart``, or None.

    torch guesses the toolkit from ``which nvcc``; where ``nvcc`` is a wrapper script in
    /usr/local/bin, that guess is /usr/local, which has no libcudart, and the link fails. So every
    candidate is checked for both the compiler and the runtime library.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script that execs the real compiler: read the path out of it
            with open(nvcc, "rb") as script:
                head = script.read(4096)
            for token in head.decode("utf-8", "ignore").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return os.path.realpath(root)
    return None


def extension_modules():
    wanted = os.environ.get("FASTSD_BUILD", "auto").lower()
    if wanted not in ("auto", "cuda", "cpu"):
        sys.exit(f"FASTSD_BUILD={wanted!r}: use 'cuda', 'cpu' or leave it unset (auto).")
    cuda_home = find_cuda_home() if wanted != "cpu" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    use_cuda = wanted == "cuda" or (wanted == "auto" and cuda_home is not None
                                    and torch.version.cuda is not None)
    if use_cuda and cuda_home is None:
        sys.exit("FASTSD_BUILD=cuda but no CUDA toolkit (bin/nvcc and libcudart) was found: "
                 "set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda.")
    if wanted == "auto" and cuda_home is None and torch.version.cuda is not None:
        # A CUDA torch with a CPU-only extension: SnapshotStore refuses a CUDA device then.
        print(f"fastsd: torch is a CUDA {torch.version.cuda} build but no CUDA toolkit (bin/nvcc "
              f"and libcudart) was found: building the extension for the CPU only. Set "
              f"CUDA_HOME (or FASTSD_BUILD=cuda) to build its CUDA kernels.", file=sys.stderr)
    if use_cuda and torch.version.cuda is None:
        sys.exit("FASTSD_BUILD=cuda but the installed torch is a CPU-only build: install a CUDA "
                 "build of torch, or build with FASTSD_BUILD=cpu.")

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # The C++ standard is the one torch asks for. -fno-trapping-math lets the compiler turn the
    # loss kernel's selects into vector blends (nothing here reads floating-point exception flags;
    # NaN and inf keep their IEEE meaning).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    define_macros = []
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(
            f"{a[0]}.{a[1]}" for a in CUDA_ARCHS) + "+PTX")
        define_macros.append(("FASTSD_WITH_CUDA", None))
        return [cpp_extension.CUDAExtension(
            "fastsd._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"], define_macros=define_macros)]
    return [cpp_extension.CppExtension(
        "fastsd._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"], define_macros=define_macros)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    # ninja is optional; without it the build is serial, and slower, but works.
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=find_packages(include=["fastsd", "fastsd.*"]) + ["fastsd.kernels"],
    package_dir={"fastsd.kernels": "kernels"},
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
)
