"""fastsd's trainer: ``python -m fastsd.train`` for BL, SE, SD, KD and generations (BAN / TT).

Quick start: ``python -m fastsd.train`` runs a short SD demonstration on synthetic data and
prints the results table; ``python -m fastsd.train --help`` lists every setting. Programmatic use::

    from fastsd.train import TrainConfig, Trainer
    results = Trainer(TrainConfig(method="sd", epochs=8, cycles=4)).run()   # results.json's dict

Every method's loss is :func:`fastsd.distill_loss` (DESIGN.md sections 1 and 2), with these
keywords (T = ``--temperature``, λ_S = ``--lambda-s``, λ_T = ``--lambda-t``):

=====================  ==========================================================================
bl, se, sd cycle 1,    ``ce_weight=1`` (no teacher)
ban generation 0
sd cycle c >= 2        ``ce_weight=λ_S, kd_weight=λ_T, temperature=T, student_temperature=1,
                       t2_scaling=False``; teacher: the snapshot of cycle c-1's last iteration
kd                     ``ce_weight=λ_S, kd_weight=λ_T, temperature=T, student_temperature=T,
                       t2_scaling=True``; teacher: the trained ``--teacher-checkpoint``
tt generation 0        ``ce_weight=η, tolerance_weight=1-η, topk=K`` (no teacher)
ban/tt generation g>=1 as sd cycle >= 2, teacher: generation g-1's final weights
=====================  ==========================================================================

Defaults: λ_S = 1 + 1/T for sd and 1 for kd/ban/tt, λ_T = 1; ban/tt warm up for one epoch per
generation (all written to config.yaml).
``--label-smoothing ε`` passes ``label_smoothing=ε`` to every stage (it smooths the CE target only).

A run directory holds config.yaml, metrics.jsonl, TensorBoard events, checkpoints/last.pt,
snapshots/<cycleN|genN>.safetensors, diagnostics/<cycleN|genN|final>.safetensors
(second-class confusion), model.safetensors, results.json and results.md (see
:mod:`.results` and :mod:`.monitor` for their contents), and with ``--profile`` profile/.

Modules: :mod:`.config` (the typed configuration), :mod:`.schedule` (stages and learning rate),
:mod:`.step` (the training step, evaluation), :mod:`.teachers` (snapshots as teachers),
:mod:`.loop` (the trainer), :mod:`.checkpoint`, :mod:`.monitor`, :mod:`.results`,
:mod:`.preflight` (image checks), :mod:`.distributed` (torchrun, DDP), :mod:`.profiling`
(``--profile``), :mod:`.errors`, :mod:`.cli`.
Several GPUs or nodes: ``torchrun --standalone --nproc-per-node N -m fastsd.train ...`` (README).
"""

from .config import TrainConfig
from .errors import (ConfigError, Interrupted, NonFiniteLossError, SetupError, TrainError,
                     WriteError)


def __getattr__(name):
    # The loop pulls in the loss, the snapshot store and the data layer: load it on first use.
    if name in ("Trainer", "model_seed"):
        from . import loop

        return getattr(loop, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module 'fastsd.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "Trainer", "main", "ConfigError", "SetupError", "TrainError",
           "NonFiniteLossError", "Interrupted", "WriteError"]
