"""The shape of a run: its stages (cycles or generations), what each one's loss is, and the
learning rate of every iteration.

Everything here is a pure function of the configuration and the number of iterations per epoch,
so a resumed run rebuilds exactly the same plan, and the tests check it without training.

A *stage* is a cycle of SE/SD (the learning rate restarts, the model carries on), a generation of
BAN/TT (a fresh model, a fresh optimiser), or the whole run of BL/KD. Stage ``s`` covers the global
epochs ``[start_epoch, end_epoch)``; BAN/TT number epochs across generations, so the data order of
every epoch is distinct.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .config import CYCLIC_METHODS, GENERATION_METHODS, TrainConfig


@dataclass(frozen=True)
class LossSpec:
    """The keywords of :func:`fastsd.distill_loss` for one stage, and where its teacher comes from.

    ``teacher`` is None (no teacher), ``"external"`` (KD's trained network) or the snapshot slot
    whose weights teach this stage. ``label_smoothing`` smooths the CE target (the teacher term is
    unchanged).
    """

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 1.0
    student_temperature: float = 1.0
    t2_scaling: bool = False
    tolerance_weight: float = 0.0
    topk: int = 5
    teacher: Optional[object] = None
    label_smoothing: float = 0.0

    def loss_kwargs(self) -> Dict[str, object]:
        """Keywords for distill_loss (teacher-related ones only when there is a teacher)."""
        kw = dict(ce_weight=self.ce_weight)
        if self.label_smoothing > 0:
            kw["label_smoothing"] = self.label_smoothing
        if self.teacher is not None:
            kw.update(kd_weight=self.kd_weight, temperature=self.temperature,
                      student_temperature=self.student_temperature, t2_scaling=self.t2_scaling)
        if self.tolerance_weight > 0:
            kw.update(tolerance_weight=self.tolerance_weight, topk=self.topk)
        return kw


@dataclass(frozen=True)
class Stage:
    """One cycle (se/sd), generation (ban/tt) or the whole run (bl/kd)."""

    index: int                 #: 0-based position in the run
    kind: str                  #: "cycle", "generation" or "run"
    start_epoch: int           #: first global epoch of the stage
    end_epoch: int             #: one past its last global epoch
    fresh_model: bool          #: a newly initialised model and optimiser start this stage
    loss: LossSpec
    capture_slot: Optional[int]  #: the snapshot slot its final weights go to (None: not kept)

    @property
    def epochs(self) -> int:
        return self.end_epoch - self.start_epoch

    @property
    def label(self) -> str:
        """The column name in the results table: M#L1.. for cycles, G#0.. for generations."""
        return {"cycle": f"M#L{self.index + 1}", "generation": f"G#{self.index}"}.get(
            self.kind, "final")


@dataclass
class Plan:
    """Stages and the learning rate of every global iteration."""

    cfg: TrainConfig
    iters_per_epoch: int
    stages: List[Stage] = field(default_factory=list)

    @property
    def total_epochs(self) -> int:
        return self.stages[-1].end_epoch

    @property
    def total_iters(self) -> int:
        return self.total_epochs * self.iters_per_epoch

    @property
    def num_slots(self) -> int:
        """Snapshot slots the run keeps (0: none)."""
        slots = [s.capture_slot for s in self.stages if s.capture_slot is not None]
        return max(slots) + 1 if slots else 0

    def stage_of_epoch(self, epoch: int) -> Stage:
        for stage in self.stages:
            if stage.start_epoch <= epoch < stage.end_epoch:
                return stage
        raise IndexError(f"epoch {epoch} is outside the run's {self.total_epochs} epochs")

    def stage_bounds(self, stage: Stage) -> Tuple[int, int]:
        """First and one-past-last global iteration of a stage."""
        return stage.start_epoch * self.iters_per_epoch, stage.end_epoch * self.iters_per_epoch

    def lr_at(self, iteration: int) -> float:
        """The learning rate of global iteration ``iteration`` (0-based)."""
        cfg = self.cfg
        stage = self.stage_of_epoch(iteration // self.iters_per_epoch)
        start, end = self.stage_bounds(stage)
        local, length = iteration - start, end - start
        if cfg.schedule == "step" and cfg.method not in CYCLIC_METHODS:
            passed = sum(1 for m in cfg.milestones
                         if local >= round(m * self.iters_per_epoch))
            lr = cfg.lr * cfg.gamma ** passed
        else:
            # Cyclic cosine (SE, Huang et al.): lr_max at a stage's first iteration, decaying to
            # near lr_min at its last; restarts at every cycle start.
            lr = cosine_lr(local, length, cfg.lr, cfg.lr_min)
        # A fresh model (training's or a generation's start) warms up by --warmup-epochs; a
        # cycle that carries the model on (an SE/SD restart) by --restart-warmup-epochs.
        warmup_epochs = cfg.warmup_epochs if stage.fresh_model else cfg.restart_warmup_epochs
        warmup = round(warmup_epochs * self.iters_per_epoch)
        if local < warmup:
            lr *= (local + 1) / warmup
        return lr


def cosine_lr(local: int, length: int, lr_max: float, lr_min: float) -> float:
    """``lr_min + (lr_max - lr_min)/2 · (1 + cos(π · local / length))`` for local in [0, length)."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * local / length))


def build_plan(cfg: TrainConfig, iters_per_epoch: int) -> Plan:
    """The stages of ``cfg``'s method (DESIGN.md section 1)."""
    if iters_per_epoch < 1:
        raise ValueError("an epoch needs at least one iteration")
    plan = Plan(cfg, iters_per_epoch)
    smoothing = cfg.label_smoothing
    plain = LossSpec(ce_weight=1.0, label_smoothing=smoothing)

    def taught(teacher):
        return LossSpec(ce_weight=cfg.lambda_s, kd_weight=cfg.lambda_t,
                        temperature=cfg.temperature, student_temperature=cfg.student_temperature,
                        t2_scaling=cfg.t2_scaling, teacher=teacher, label_smoothing=smoothing)

    if cfg.method in CYCLIC_METHODS:
        start = 0
        for c, length in enumerate(cfg.cycle_epochs):
            # SD: the teacher of cycle c is the snapshot of cycle c-1's last iteration (slot c-1);
            # SE never has one, so its cycle 1 is the same computation as SD's.
            loss = taught(c - 1) if cfg.method == "sd" and c > 0 else plain
            plan.stages.append(Stage(c, "cycle", start, start + length, c == 0, loss, c))
            start += length
    elif cfg.method in GENERATION_METHODS:
        for g in range(cfg.generations + 1):
            if g == 0:
                loss = (LossSpec(ce_weight=cfg.eta, tolerance_weight=1.0 - cfg.eta,
                                 topk=cfg.topk, label_smoothing=smoothing)
                        if cfg.method == "tt" else plain)
            else:
                loss = taught(g - 1)
            plan.stages.append(Stage(g, "generation", g * cfg.epochs, (g + 1) * cfg.epochs,
                                     True, loss, g))
    else:
        loss = taught("external") if cfg.method == "kd" else plain
        plan.stages.append(Stage(0, "run", 0, cfg.epochs, True, loss, None))
    return plan
