"""fastsd: Snapshot Distillation (teacher-student optimization in one generation), fast.

Public names are imported lazily, so that ``import fastsd`` stays cheap and a part that needs
an optional piece (the compiled extension, DALI) only loads it when it is used.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "distill_loss": "fastsd.losses",
    "DistillLoss": "fastsd.losses",
    "DistillLossFunction": "fastsd.losses",
    "LossTerms": "fastsd.losses",
    "SnapshotStore": "fastsd.snapshots",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fastsd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
