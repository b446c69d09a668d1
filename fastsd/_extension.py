"""Loading of the compiled extension ``fastsd._C``, with an error that says how to fix it."""

import functools

import torch  # noqa: F401  (fastsd._C links against libtorch, which must be loaded first)

REBUILD_HINT = (
    "Rebuild it from the project root with `pip install --no-build-isolation -e .` "
    "(torch must be installed first; FASTSD_BUILD=cpu forces a CPU-only build, CUDA_HOME points "
    "the CUDA build at a toolkit)."
)


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import ``fastsd._C`` (which registers its ops under ``torch.ops.fastsd``) and return it."""
    try:
        from fastsd import _C
    except ImportError as err:
        raise ImportError(f"fastsd's compiled extension fastsd._C could not be imported: {err}. "
                          f"{REBUILD_HINT}") from err
    return _C
