"""The trainer: builds everything from a :class:`TrainConfig`, trains stage by stage, evaluates,
keeps snapshots, checkpoints, and writes the results.

Order of work, so that every user error surfaces before the first step: configuration (checked on
construction) -> resume checkpoint located -> data loaders (folder layout, class count) -> model
-> KD teacher (file, architecture, classes) -> run directory, config.yaml -> resume state.

Several processes (torchrun, :mod:`.distributed`): each trains its shard of the data through a
DistributedDataParallel wrapper of ``self.model``; ``self.model`` itself (checkpoints, snapshots,
evaluation) stays the plain module. Counts are summed with :meth:`Trainer._all_reduce`, and only
rank 0 writes files.
"""

import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from fastsd.data.catalog import PROCESS_RNG_STREAM, derive_seed

from . import distributed
from .checkpoint import (FORMAT_VERSION, atomic_torch_save, checkpoint_path, find_checkpoint,
                         load_checkpoint, model_weights, rng_state, save_safetensors,
                         set_rng_state)
from .config import (CYCLIC_METHODS, GENERATION_METHODS, TrainConfig, dump_yaml, flag,
                     in_run_ensemble)
from .errors import ConfigError, Interrupted, NonFiniteLossError, SetupError
from .monitor import Monitor, print_results
from .results import counted, format_table, summarise, write_results
from .schedule import Plan, Stage, build_plan
from .step import (SecondaryMeter, TrainStep, autocast_forward, build_optimizer, evaluate,
                   mean_or_nan, topk_correct)


def stage_file_name(stage: Stage) -> str:
    """File stem of a stage's snapshot and diagnostics: cycle<1..M>, gen<0..N>, or final."""
    return _file_stem(stage.kind, stage.index)


def _file_stem(kind: str, index: int) -> str:
    if kind == "cycle":
        return f"cycle{index + 1}"
    if kind == "generation":
        return f"gen{index}"
    return "final"


def snapshot_file_names(method: str, cycles: int, generations: int) -> List[str]:
    """The stems of the snapshot files a run of ``method`` writes: cycle1..M for se/sd,
    gen0..N for ban/tt, none for bl/kd."""
    if method in CYCLIC_METHODS:
        return [_file_stem("cycle", i) for i in range(cycles)]
    if method in GENERATION_METHODS:
        return [_file_stem("generation", g) for g in range(generations + 1)]
    return []


def _empty_epoch_sums() -> Dict[str, float]:
    """An epoch's running totals: loss terms summed over finite steps, top-1 hits and the images
    they count over, step counts, and the images and seconds of its timed windows."""
    return dict(loss=0.0, ce=0.0, kl=0.0, tolerance=0.0, correct=0.0, images=0.0, steps=0,
                finite=0, skipped=0, clipped=0, timed_images=0, seconds=0.0)




def model_seed(seed: int, generation: int) -> int:
    """Seed of the initial weights of a generation (generation 0 for every method but ban/tt)."""
    return seed + 1_000_003 * generation


class Trainer:
    """One training run. ``Trainer(cfg).run()`` returns the results dictionary (results.json).

    ``hooks``: objects with any of ``on_stage_start(trainer, stage)``, ``on_step_end(trainer)``,
    ``on_stage_end(trainer, stage)``, ``on_epoch_end(trainer, epoch)`` (tests and tools use them).

    With ``cfg.world_size`` > 1 the process group must be joined first
    (:func:`fastsd.train.distributed.init`, as ``python -m fastsd.train`` does under torchrun).
    """

    def __init__(self, cfg: TrainConfig, *, hooks: Optional[List[Any]] = None,
                 quiet: bool = False):
        self.cfg = cfg
        self.hooks = list(hooks or [])
        self.rank, self.world_size = distributed.rank_and_size()
        if self.world_size != cfg.world_size:
            raise SetupError(f"{flag('world_size')} is {cfg.world_size} but this process is one "
                             f"of {self.world_size}; launch with torchrun (or join the process "
                             f"group with fastsd.train.distributed.init first)")
        self.is_main = self.rank == 0
        self.quiet = quiet
        self.device = distributed.local_device(cfg.device, self.world_size)
        self.run_dir: Optional[str] = None
        self.epoch = 0              # the next epoch to train (global)
        self.batch_in_epoch = 0     # batches of ``epoch`` already trained (mid-epoch resume)
        # The running totals of ``epoch`` (loss, errors, images, seconds): a mid-epoch checkpoint
        # keeps them, so the epoch row after a resume covers the whole epoch, not its tail.
        self._epoch_sums: Dict[str, float] = _empty_epoch_sums()
        self.iteration = 0          # global iterations done
        self.snapshots: List[Dict[str, Any]] = []
        self.epochs_log: List[Dict[str, Any]] = []
        self.wall_time = 0.0
        self.active_stage: Optional[Stage] = None
        self._stop_signal: Optional[int] = None
        self._setup_done = False

    # ================================================================================== setup
    def setup(self) -> "Trainer":
        cfg = self.cfg
        resume_path = find_checkpoint(cfg.resume) if cfg.resume else None
        run_dir = self._choose_run_dir()
        if self.world_size > 1 and cfg.out is None and not cfg.resume:
            # An automatic name holds the time of day: take rank 0's, so that every process
            # names the same directory to --resume.
            run_dir = distributed.broadcast_object(run_dir)
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            configure_cuda_kernels(cfg.deterministic)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # One process: the seed itself. Several: a stream of its own for each, so that dropout
        # and other randomness inside the model differ between the shards as they would between
        # the samples of one process's batch (initial weights, data order and augmentation have
        # generators of their own, the same everywhere).
        _seed_all(cfg.seed if self.world_size == 1 else
                  derive_seed(cfg.seed, self.rank, PROCESS_RNG_STREAM))

        self.data = self._build_data()
        info = self.data.info
        self.num_classes = cfg.num_classes or info.num_classes
        if info.num_classes != self.num_classes:
            raise SetupError(f"{flag('num_classes')}: the data set has {info.num_classes} classes "
                             f"but --num-classes is {self.num_classes}")
        cfg.num_classes = self.num_classes  # config.yaml states it
        if cfg.method == "tt" and cfg.topk > self.num_classes:
            raise ConfigError(f"--topk: K={cfg.topk} is more than the {self.num_classes} classes "
                              f"of the data set; use --topk {min(5, self.num_classes)}")
        # An iteration is an update: --grad-accum-steps batches; the leftover batches of an
        # epoch (fewer than that) are not trained on, as the last partial batch is not.
        iters = len(self.data.train) // cfg.grad_accum_steps
        if iters < 1:
            shards = f" over {self.world_size} processes" if self.world_size > 1 else ""
            raise SetupError(f"--batch-size {cfg.batch_size} x --grad-accum-steps "
                             f"{cfg.grad_accum_steps} is larger than the training split "
                             f"({info.train_size} images{shards}): an epoch would have no full "
                             f"update")
        self.plan: Plan = build_plan(cfg, iters)

        self.model = train_model = self._new_model(0)
        if self.world_size > 1:
            self.model, train_model = distributed.wrap(self.model, self.device, cfg.sync_bn)
            self._stop_flag = distributed.StopFlag()
        self.kd_teacher = None
        self.kd_teacher_fingerprint = None
        if cfg.method == "kd":
            from .teachers import Teachers, build_kd_teacher

            kd_model, self.kd_teacher_fingerprint = build_kd_teacher(
                cfg.teacher_arch, self.num_classes, cfg.teacher_checkpoint, device=self.device,
                channels_last=cfg.channels_last)
            self.kd_teacher = Teachers(kd_model, 1, cfg.teacher_dtype, self.device)
            self.kd_teacher.capture(kd_model, 0)
            del kd_model
        self.teachers = None
        if self.plan.num_slots:
            from .teachers import Teachers

            self.teachers = Teachers(self.model, self.plan.num_slots, cfg.teacher_dtype,
                                     self.device)
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                         wd_norm_bias=cfg.wd_norm_bias)
        self.step = TrainStep(train_model, self.optimizer, device=self.device, amp=cfg.amp,
                              num_classes=self.num_classes, compile=cfg.compile,
                              compile_mode=cfg.compile_mode,
                              clip_grad_norm=cfg.clip_grad_norm,
                              grad_accum_steps=cfg.grad_accum_steps)

        resume_state = None
        if resume_path:
            # On the CPU first: RNG states must stay there; model, optimiser and snapshots copy
            # themselves to their device on load.
            resume_state = load_checkpoint(resume_path, "cpu")
            self._check_resume_state(resume_state, resume_path)
        if self.is_main:
            try:
                os.makedirs(run_dir, exist_ok=True)
            except OSError as e:
                raise SetupError(f"--out: cannot create the run directory {run_dir!r} "
                                 f"({e.strerror or e}): choose a folder you can write to") from None
        self.run_dir = cfg.out = run_dir
        if self.is_main:
            # The run's settings, not how this process was started: no "resume" in the file, so
            # `--config config.yaml` starts the same run afresh.
            dump_yaml(cfg.replace(resume=None), os.path.join(self.run_dir, "config.yaml"),
                      f"global batch {cfg.global_batch_size} = {cfg.world_size} process(es) x "
                      f"--batch-size {cfg.batch_size} x --grad-accum-steps "
                      f"{cfg.grad_accum_steps}; --lr is used as given")
        if resume_state is not None:
            self._load_state(resume_state)
        self.monitor = Monitor(self.run_dir, progress="none" if self.quiet else cfg.progress,
                               tensorboard=cfg.tensorboard, enabled=self.is_main,
                               console=not self.quiet,
                               resume_iteration=self.iteration if resume_state else None)
        self._setup_done = True
        return self

    def _build_data(self):
        from fastsd.models import get_model_info

        cfg = self.cfg
        # Evaluation images are resized as the model's own recipe does (efficientnet_b7 keeps the
        # whole 600-pixel shorter side, most models 0.875 of it).
        kwargs = dict(batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                      workers=cfg.workers, device=self.device, seed=cfg.seed,
                      channels_last=cfg.channels_last, download=cfg.download,
                      num_classes=cfg.num_classes, image_size=cfg.image_size,
                      synthetic_size=_synthetic_size(cfg.synthetic_size), rank=self.rank,
                      world_size=self.world_size,
                      eval_crop_fraction=get_model_info(cfg.arch).eval_crop_fraction)
        if cfg.dali:
            from fastsd.data.dali import DALI_IMAGE_FORMATS, build_dali_loaders, require_dali

            try:
                # dali.py imports DALI lazily: ask now, before the folder's pre-flight check
                # (minutes on ImageNet) and before anything is read
                require_dali()
            except ImportError as e:
                raise SetupError(str(e)) from None
            build = build_dali_loaders
        else:
            from fastsd.data import build_loaders as build
        try:
            from .preflight import check_image_folder, reads_image_files_while_training

            if cfg.check_images != "none" and reads_image_files_while_training(
                    cfg.dataset, cfg.data, cfg.dali, cfg.download):
                check_image_folder(cfg.data, cfg.num_classes, cfg.check_images,
                                   max(cfg.workers, os.cpu_count() or 1),
                                   formats=DALI_IMAGE_FORMATS if cfg.dali else None,
                                   dataset=cfg.dataset)
            if not (cfg.download and self.world_size > 1):
                return build(cfg.dataset, cfg.data, **kwargs)
            # --download: one process fetches the files, the others read them once whole (all
            # at once would overwrite each other's partial download and extraction).
            if self.is_main:
                data = build(cfg.dataset, cfg.data, **kwargs)
            torch.distributed.barrier()
            if not self.is_main:
                data = build(cfg.dataset, cfg.data, **{**kwargs, "download": False})
            return data
        except (ValueError, OSError) as e:
            # The data layer names the folder or file; say which flag leads there.
            where = f"{flag('dataset')} {cfg.dataset}" + (f", {flag('data')} {cfg.data}"
                                                          if cfg.data else "")
            raise SetupError(f"data ({where}): {e}") from None

    def _new_model(self, generation: int) -> nn.Module:
        from fastsd.models import create_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed(self.cfg.seed, generation))
            model = create_model(self.cfg.arch, self.num_classes)
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _choose_run_dir(self) -> str:
        """The run directory (created later, once nothing can fail for a user's reason)."""
        cfg = self.cfg
        if cfg.resume:
            return cfg.resume
        run_dir = cfg.out
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = base = os.path.join("runs", f"{cfg.method}-{cfg.arch}-{stamp}")
            n = 1
            while os.path.exists(run_dir):
                n += 1
                run_dir = f"{base}-{n}"
        if os.path.isfile(os.path.join(run_dir, "results.json")):
            # a finished run (its checkpoints kept or deleted): nothing to continue, and its
            # snapshot files would mix with the new run's
            raise SetupError(f"--out: {run_dir!r} holds a finished run (results.json); choose "
                             f"another --out, or delete that run first")
        if os.path.isfile(checkpoint_path(run_dir)):
            raise SetupError(f"--out: {run_dir!r} already holds a run with a checkpoint; continue "
                             f"it with --resume {run_dir}, or choose another --out")
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise SetupError(f"--out: {run_dir!r} exists and is not a directory")
        return run_dir

    # ========================================================================== checkpointing
    def state_dict(self, rng_states: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """What a checkpoint holds; ``rng_states``: every process's generators, in rank order
        (default: this process's)."""
        rngs = rng_states or [rng_state(self.device)]
        return {
            "format": FORMAT_VERSION, "arch": self.cfg.arch, "num_classes": self.num_classes,
            "method": self.cfg.method, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "iteration": self.iteration, "iters_per_epoch": self.plan.iters_per_epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step.state_dict(),
            "teachers": self.teachers.state_dict() if self.teachers is not None else None,
            "epoch_sums": dict(self._epoch_sums) if self.batch_in_epoch else None,
            "rng_per_process": rngs, "snapshots": self.snapshots, "epochs": self.epochs_log,
            "wall_time_s": self.wall_time + self.monitor.elapsed(),
            "config": self.cfg.to_dict(), "world_size": self.world_size,
            "kd_teacher_fingerprint": self.kd_teacher_fingerprint,
        }

    def _check_resume_state(self, state, path) -> None:
        if state.get("arch") != self.cfg.arch or state.get("num_classes") != self.num_classes:
            raise SetupError(f"--resume: {path} holds a {state.get('arch')} with "
                             f"{state.get('num_classes')} classes, not the configured "
                             f"{self.cfg.arch} with {self.num_classes}")
        if state.get("iters_per_epoch") != self.plan.iters_per_epoch:
            raise SetupError(f"--resume: {path} was written with {state.get('iters_per_epoch')} "
                             f"iterations per epoch but the data now gives "
                             f"{self.plan.iters_per_epoch}: the data set or batch size changed")
        if state.get("world_size", 1) != self.world_size:
            raise SetupError(f"--resume: {path} was written by {state.get('world_size')} "
                             f"process(es); resume with the same number (now {self.world_size}):"
                             f" torchrun --nproc-per-node/--nnodes")
        saved_teacher = state.get("kd_teacher_fingerprint")  # (none before it was kept)
        if saved_teacher is not None and saved_teacher != self.kd_teacher_fingerprint:
            raise SetupError(f"--resume: the KD teacher {self.cfg.teacher_checkpoint} is not the "
                             f"one the run started with (its weights changed since: retrained, "
                             f"or a run directory that then held a checkpoint and now its final "
                             f"model.safetensors); put the original weights back, or start a "
                             f"new run with this teacher")

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step.load_state_dict(state["step"], window_sums=self.rank == 0)
        if self.teachers is not None and state.get("teachers") is not None:
            self.teachers.load_state_dict(state["teachers"])
        # (a checkpoint of another number of processes is refused before; one from before every
        # process's generators were kept has rank 0's only, as "rng")
        rngs = state.get("rng_per_process") or [state["rng"]] * self.world_size
        set_rng_state(rngs[self.rank], self.device)
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        # (a checkpoint from before a total existed starts it at zero)
        self._epoch_sums = {**_empty_epoch_sums(), **(state.get("epoch_sums") or {})}
        self.iteration = state["iteration"]
        self.snapshots, self.epochs_log = list(state["snapshots"]), list(state["epochs"])
        self.wall_time = float(state.get("wall_time_s", 0.0))

    def save_checkpoint(self) -> None:
        # Every process checks (the answer is agreed), so bad weights stop all of them together.
        if not self._weights_finite():
            raise NonFiniteLossError(
                f"the model's weights (or BatchNorm statistics) are no longer finite at "
                f"iteration {self.iteration}; nothing was saved, so the last good checkpoint "
                f"{checkpoint_path(self.run_dir)} is intact. Start a new run with --config "
                f"{self.run_dir} --out NEW_DIR and a lower --lr, --warmup-epochs, or --amp "
                f"bf16 / none (a resumed run keeps its settings)")
        # each process draws from generators of its own (see setup): all of them are kept
        mine = rng_state(self.device)
        rngs = [mine] if self.world_size == 1 else distributed.gather_objects(mine)
        if self.is_main:
            atomic_torch_save(self.state_dict(rngs), checkpoint_path(self.run_dir))

    def _weights_finite(self) -> bool:
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        if not tensors:
            return True
        bad = (~torch.stack([torch.isfinite(t).all() for t in tensors]).all()).to(torch.int64)
        return not bool(self._all_reduce(bad.reshape(1)))

    # ============================================================================== training
    def run(self) -> Dict[str, Any]:
        """Train (or finish a resumed run), evaluate, write the results; return them."""
        if not self._setup_done:
            self.setup()
        restore = self._install_signal_handlers()
        self._announce()
        profiler = None
        if self.cfg.profile and self.is_main:
            from .profiling import StepProfiler

            profiler = StepProfiler(self.run_dir, self.cfg.profile, self.device)
            self.hooks.append(profiler)
        try:
            self.fit()
            if profiler is not None:
                profiler.close()
                if not profiler.written:
                    from .profiling import SKIP, WARMUP

                    self.monitor.message(
                        f"--profile: nothing recorded: this run trained {profiler.steps} "
                        f"iteration(s) and the record starts after the first {SKIP + WARMUP}")
            results = self.finish()
        finally:
            if profiler is not None:
                profiler.close()
                self.hooks.remove(profiler)
            restore()
            self.monitor.close()
        return results

    def fit(self) -> None:
        plan = self.plan
        for epoch in range(self.epoch, plan.total_epochs):
            stage = plan.stage_of_epoch(epoch)
            if stage is not self.active_stage:
                self._enter_stage(stage, at_start=self.iteration == plan.stage_bounds(stage)[0])
            self._train_epoch(epoch)
            self._end_epoch(epoch, stage)

    def _enter_stage(self, stage: Stage, at_start: bool) -> None:
        if at_start and stage.fresh_model and stage.index > 0:
            # A new generation: fresh weights (their own seed), zero momentum, a new scaler.
            fresh = self._new_model(stage.index)
            with torch.no_grad():
                self.model.load_state_dict(fresh.state_dict())
                for state in self.optimizer.state.values():
                    if "momentum_buffer" in state:
                        state["momentum_buffer"].zero_()
            if self.step.scaler is not None:
                self.step.scaler = torch.amp.GradScaler(self.device.type)
            del fresh
        teacher = None
        if stage.loss.teacher == "external":
            teacher = self.kd_teacher.forward(0)
        elif stage.loss.teacher is not None:
            teacher = self.teachers.forward(stage.loss.teacher)
        self.step.set_stage(stage.loss, teacher)
        self.active_stage = stage
        if at_start:
            self.monitor.log("stage", dict(stage=stage.index, stage_kind=stage.kind,
                                           label=stage.label, iteration=self.iteration,
                                           epoch=stage.start_epoch,
                                           teacher=stage.loss.teacher,
                                           loss=stage.loss.loss_kwargs()))
        self.monitor.message(self._describe_stage(stage))
        self._call_hooks("on_stage_start", stage)

    def _describe_stage(self, stage: Stage) -> str:
        epochs = (f"epoch {stage.start_epoch + 1}" if stage.epochs == 1
                  else f"epochs {stage.start_epoch + 1}-{stage.end_epoch}")
        loss = stage.loss
        if loss.teacher is None:
            who = ("no teacher: tolerant loss, η={:g}, K={}".format(loss.ce_weight, loss.topk)
                   if loss.tolerance_weight > 0 else "no teacher")
        else:
            source = (f"the KD teacher, a {self.cfg.teacher_arch} from "
                      f"{self.cfg.teacher_checkpoint}" if loss.teacher == "external" else
                      f"teacher: the snapshot of {self.plan.stages[loss.teacher].label}")
            who = (f"{source} (T={loss.temperature:g}, student T={loss.student_temperature:g}, "
                   f"λ_S={loss.ce_weight:g}, λ_T={loss.kd_weight:g}"
                   + (", T² scaling)" if loss.t2_scaling else ")"))
        name = {"cycle": f"cycle {stage.label}", "generation": f"generation {stage.label}",
                "run": "training"}[stage.kind]
        return f"{name}: {epochs}, {who}"

    def _announce(self) -> None:
        cfg, info = self.cfg, self.data.info
        n = len(self.plan.stages)
        shape = {"cycle": f" in {counted(n, 'cycle')} {cfg.cycle_epochs}",
                 "generation": f" per generation, {counted(n, 'generation')}"}.get(
                     self.plan.stages[0].kind, "")
        teaches = self.kd_teacher is not None or any(
            stage.loss.teacher is not None for stage in self.plan.stages)
        teacher = (f", teacher {cfg.teacher_dtype}" if teaches else
                   f", snapshots {cfg.teacher_dtype}" if self.teachers is not None else "")
        resumed = ("" if not self.iteration else
                   f"; training is complete ({counted(self.plan.total_epochs, 'epoch')}): "
                   f"evaluating and writing the results again"
                   if self.epoch >= self.plan.total_epochs else
                   f"; resuming at epoch {self.epoch + 1}, iteration {self.iteration}")
        accum = (f" x {cfg.grad_accum_steps} accumulated passes"
                 if cfg.grad_accum_steps > 1 else "")
        procs = (f" x {cfg.world_size} processes" if cfg.world_size > 1 else "")
        total = (f" = {cfg.global_batch_size} per update" if accum or procs else "")
        sync = ", SyncBatchNorm" if cfg.sync_bn else ""
        self.monitor.message(
            f"fastsd.train: {cfg.method} {cfg.arch} on {cfg.dataset} ({info.train_size} training /"
            f" {info.test_size} test images, {self.num_classes} classes, {info.image_size}px), "
            f"{counted(cfg.epochs, 'epoch')}{shape}, batch {cfg.batch_size}"
            f"{accum}{procs}{total}{sync},"
            f" {self.plan.iters_per_epoch} iterations per epoch; {self.device}, amp {cfg.amp}"
            f"{teacher}"
            f"{', compiled' if cfg.compile else ''}; run directory {self.run_dir}{resumed}")

    def _train_epoch(self, epoch: int) -> None:
        cfg, plan = self.cfg, self.plan
        loader = self.data.train
        passes = cfg.grad_accum_steps  # loader batches per iteration (update)
        # A resumed epoch: the same order and augmentation, from the first batch not trained
        # (the loader reads none of the ones before it).
        done = self.batch_in_epoch  # iterations of this epoch trained before a resume
        first = done * passes
        loader.set_epoch(epoch, start=first)
        self.model.train()
        self.monitor.epoch_start(epoch, plan.total_epochs, plan.iters_per_epoch, initial=done)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the epoch row's max_memory_gib
        if not done:
            self._epoch_sums = _empty_epoch_sums()
        s = self._epoch_sums  # a resumed epoch goes on from the checkpoint's totals
        now = time.perf_counter()
        epoch_start = now - s["seconds"]
        # a run stopped between two log lines goes on with that window (its sums are in the step)
        window_images = s.pop("window_images", 0)
        window_start = now - s.pop("window_seconds", 0.0)
        groups = self.optimizer.param_groups
        lr = plan.lr_at(max(self.iteration - 1, 0))  # the last step's, if none is left to train
        trained = plan.iters_per_epoch * passes
        for batch, (images, labels) in enumerate(loader, start=first):
            if batch >= trained:
                break  # the epoch's last batches, too few for an update
            if batch % passes == 0:
                lr = plan.lr_at(self.iteration)
                for group in groups:
                    group["lr"] = lr
            self.step(images, labels)  # the last pass of an iteration updates
            window_images += images.shape[0] * self.world_size  # equal shards: global images
            if (batch + 1) % passes:
                continue
            b = batch // passes  # the iteration's index in the epoch
            self.iteration += 1
            self.batch_in_epoch = b + 1
            if self.hooks:
                self._call_hooks("on_step_end")
            if self.monitor.progress == "bar":
                self.monitor.advance(1)
            if self.iteration % cfg.log_every == 0:
                now = time.perf_counter()
                self._log_window(epoch, lr, window_images, now - window_start)
                window_start, window_images = now, 0
            if self._stop_requested():
                # The log window in progress is kept as it is (the step's accumulators, its images
                # and seconds here) and goes on after the resume, so the rows logged are those of
                # an uninterrupted run; the epoch's clock stops here too.
                now = time.perf_counter()
                s.update(seconds=now - epoch_start, window_images=window_images,
                         window_seconds=now - window_start)
                if self.world_size > 1:
                    self.step.gather_window(self._all_reduce, keep_sums=self.is_main)
                self._interrupt()
            elif self._periodic_checkpoint_due(b):
                s["seconds"] = time.perf_counter() - epoch_start  # the resumed epoch's clock
                self.save_checkpoint()
        if window_images:
            self._log_window(epoch, lr, window_images, time.perf_counter() - window_start,
                             to_log=False)
        self.monitor.epoch_end()
        seconds = time.perf_counter() - epoch_start
        finite = s["finite"]
        self._epoch_row = dict(
            epoch=epoch + 1, iteration=self.iteration, stage=self.active_stage.index, lr=lr,
            **{key: mean_or_nan(s[key], finite) for key in ("loss", "ce", "kl",
                                                             "tolerance")},
            train_top1_error=100.0 * (1 - s["correct"] / max(s["images"], 1)),
            nonfinite=s["steps"] - s["finite"], skipped=s["skipped"], clipped=s["clipped"],
            epoch_time=seconds,
            images_per_s=s["timed_images"] / seconds if seconds > 0 else None)
        if self.device.type == "cuda":
            # the caching allocator's own count (no device sync): what --batch-size and
            # --grad-accum-steps leave free
            self._epoch_row["max_memory_gib"] = (torch.cuda.max_memory_allocated(self.device)
                                                 / 2 ** 30)

    def _log_window(self, epoch, lr, images, seconds, to_log=True) -> None:
        """Read the steps since the last window (``images`` global images in ``seconds``), add
        them to the epoch's totals, and log them as a step row unless ``to_log`` is False."""
        m = self.step.read_metrics(self._all_reduce if self.world_size > 1 else None)
        finite = m["steps"] - m["nonfinite"]
        finite_images = images * finite / max(m["steps"], 1)
        s = self._epoch_sums
        if finite:  # (a window of non-finite steps has NaN means and adds nothing)
            for key in ("loss", "ce", "kl", "tolerance"):
                s[key] += m[key] * finite
        s["correct"] += m["correct"]
        s["images"] += finite_images
        s["steps"] += m["steps"]
        s["finite"] += finite
        s["skipped"] += m["skipped"]
        s["clipped"] += m["clipped"]
        s["timed_images"] += images
        if m["max_nonfinite_run"] >= self.cfg.max_nonfinite:
            self._raise_nonfinite(m["max_nonfinite_run"])
        if not to_log:
            return
        row = dict(iteration=self.iteration, epoch=epoch + 1, stage=self.active_stage.index,
                   lr=lr, loss=m["loss"], ce=m["ce"], kl=m["kl"], tolerance=m["tolerance"],
                   train_top1_error=100.0 * (1 - m["correct"] / max(finite_images, 1)),
                   nonfinite=m["nonfinite"], skipped=m["skipped"], clipped=m["clipped"],
                   images_per_s=images / seconds if seconds else None,
                   time=self.monitor.elapsed())
        self.monitor.log("step", row, tb_prefix="train")
        postfix = dict(lr=f"{lr:.4g}", loss=f"{m['loss']:.4f}",
                       img_s=f"{row['images_per_s'] or 0:.0f}")
        if self.monitor.progress == "bar":
            self.monitor.advance(0, postfix)
        elif self.monitor.progress == "plain":
            terms = f"ce {m['ce']:.4f}" + (f" kl {m['kl']:.4f}" if m["kl"] else "") + (
                f" tol {m['tolerance']:.4f}" if m["tolerance"] else "") + (
                f", {m['skipped']} updates skipped" if m["skipped"] else "") + (
                f", {m['clipped']} clipped" if m["clipped"] else "")
            self.monitor.message(
                f"epoch {epoch + 1}/{self.plan.total_epochs} it {self.iteration}/"
                f"{self.plan.total_iters} lr {lr:.4g} loss {m['loss']:.4f} ({terms}) "
                f"train-err {row['train_top1_error']:.2f}% {postfix['img_s']} img/s")

    def _raise_nonfinite(self, run: int) -> None:
        ckpt = checkpoint_path(self.run_dir)
        where = (f"the last good checkpoint {ckpt} is intact, but a resumed run keeps its "
                 f"settings: start a new run with --config {self.run_dir} --out NEW_DIR and "
                 f"the changed settings" if os.path.isfile(ckpt)
                 else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"for {run} steps in a row the loss or a gradient was not finite and the update was "
            f"skipped (limit {flag('max_nonfinite')} "
            f"{self.cfg.max_nonfinite}), up to iteration {self.iteration}; {where}. Lower --lr, "
            f"add --warmup-epochs, or use --amp bf16 / none")

    def _end_epoch(self, epoch: int, stage: Stage) -> None:
        cfg = self.cfg
        if self.world_size > 1:
            # Snapshots and evaluations see rank 0's BatchNorm statistics everywhere, as the next
            # step would (DDP broadcasts them before each forward): identical snapshots, and a
            # trajectory that does not depend on where a run was checkpointed.
            with torch.no_grad():
                distributed.broadcast_buffers(self.model)
        row = self._epoch_row
        stage_end = epoch + 1 == stage.end_epoch
        if stage_end:
            self._end_stage(stage, epoch, row)
        elif (epoch + 1) % cfg.eval_every == 0:
            row.update(self._evaluate_student())
        if "top1_error" in row:
            row["test_top1_error"] = row.pop("top1_error")
            row["test_top5_error"] = row.pop("top5_error")
            row.pop("samples", None)
        self.epochs_log.append(row)
        self.monitor.log("epoch", row, tb_prefix="epoch")
        test = (f", test error {row['test_top1_error']:.2f}% (top-5 {row['test_top5_error']:.2f}%)"
                if "test_top1_error" in row else "")
        memory = (f", {row['max_memory_gib']:.1f} GiB at most" if "max_memory_gib" in row
                  else "")
        self.monitor.message(f"epoch {epoch + 1}/{self.plan.total_epochs}: loss {row['loss']:.4f}"
                             f", train error {row['train_top1_error']:.2f}%{test}, "
                             f"{row['epoch_time']:.1f} s{memory}")
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        self.save_checkpoint()
        self._call_hooks("on_epoch_end", epoch)

    def _end_stage(self, stage: Stage, epoch: int, row: Dict[str, Any]) -> None:
        """The last iteration of a cycle / generation has run: snapshot it, evaluate it."""
        if stage.capture_slot is not None:
            self.teachers.capture(self.model, stage.capture_slot)
            if self.is_main:
                save_safetensors(model_weights(self.model),
                                 os.path.join(self.run_dir, "snapshots",
                                              f"{stage_file_name(stage)}.safetensors"),
                                 self._weights_metadata(label=stage.label))
        conf = SecondaryMeter(self.device, self.num_classes)
        result = self._evaluate_student(collect=conf)
        row.update(result)
        index = stage.index + 1 if stage.kind in ("cycle", "run") else stage.index
        entry = dict(index=index, label=stage.label, epoch=epoch + 1, iteration=self.iteration,
                     top1_error=result["top1_error"], top5_error=result["top5_error"],
                     confidence_top4=conf.mean(self._all_reduce))
        second = conf.second_confusion()
        if second is not None:
            # Once per stage: the ground-truth vs second-highest-class counts for the report.
            second = self._all_reduce(second)
            if self.is_main:
                rel = os.path.join("diagnostics", f"{stage_file_name(stage)}.safetensors")
                save_safetensors({"second_confusion": second.to(torch.int32)},
                                 os.path.join(self.run_dir, rel),
                                 self._weights_metadata(label=stage.label))
                entry["diagnostics"] = rel
        self.snapshots.append(entry)
        self.monitor.log("snapshot", entry, tb_prefix="snapshot")
        self._call_hooks("on_stage_end", stage)

    def _evaluate_student(self, collect=None) -> Dict[str, float]:
        model, device = self.model, self.device
        model.eval()
        try:
            return evaluate(autocast_forward(model, device, self.cfg.amp), self.data.test,
                            collect=collect, device=device, reduce=self._all_reduce)
        finally:
            model.train()

    def _stop_requested(self) -> bool:
        """Whether to stop after this step; every process gives the same answer at the same
        iteration (a signal may reach them at different steps, or only some of them)."""
        if self.world_size == 1:
            return self._stop_signal is not None
        # (also at the last iteration: a signal in the run's last steps stops it, as it stops
        # one process, instead of letting it finish and exit 0)
        if self.iteration % distributed.STOP_CHECK_EVERY and self.iteration < self.plan.total_iters:
            return False
        agreed = self._stop_flag.agree(self._stop_signal)
        if agreed is not None and self._stop_signal is None:
            self._stop_signal = agreed
        return agreed is not None

    def _periodic_checkpoint_due(self, index_in_epoch: int) -> bool:
        """--checkpoint-every: due at its multiples of the global iteration, the same on every
        process; not at an epoch's last iteration, whose end writes one anyway."""
        every = self.cfg.checkpoint_every
        return (every is not None and self.iteration % every == 0
                and index_in_epoch + 1 < self.plan.iters_per_epoch)

    def _interrupt(self) -> None:
        signum = self._stop_signal
        self.save_checkpoint()
        if self.world_size > 1:
            # No process exits (and makes the launcher kill the rest) before the file is whole.
            torch.distributed.barrier()
        error = Interrupted(f"stopped by {signal.Signals(signum).name} at iteration "
                            f"{self.iteration} (epoch {self.epoch + 1}, batch "
                            f"{self.batch_in_epoch}); a checkpoint was written: continue with "
                            f"--resume {self.run_dir}")
        error.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        raise error

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _call_hooks(self, name: str, *args) -> None:
        for hook in self.hooks:
            fn = getattr(hook, name, None)
            if fn is not None:
                fn(self, *args)

    # ================================================================================ results
    def _weights_metadata(self, **extra) -> Dict[str, str]:
        return dict(format="fastsd", arch=self.cfg.arch, num_classes=self.num_classes,
                    method=self.cfg.method, **extra)

    def snapshot_members(self) -> List[int]:
        """The slots whose softmax outputs are averaged into the run's ensemble."""
        if self.teachers is None:
            return []
        return [slot for slot in range(self.plan.num_slots)
                if in_run_ensemble(self.cfg.method, self._slot_index(slot))]

    @torch.no_grad()
    def evaluate_snapshots(self) -> Dict[str, Any]:
        """One pass per stored snapshot over the test split: each snapshot's error as stored (in
        the teacher precision), teacher-student agreement and teacher entropy, and the ensembles
        of the first 1..g members (mean of softmax outputs)."""
        members = self.snapshot_members()
        T = self.cfg.temperature
        labels: List[torch.Tensor] = []
        sums: List[torch.Tensor] = []
        prev_top: List[torch.Tensor] = []
        per_slot, ensembles = [], []
        stage_of_slot = {s.capture_slot: s for s in self.plan.stages}
        for slot in range(self.plan.num_slots):
            forward = self.teachers.forward(slot)
            first = slot == 0
            zero = torch.zeros((), device=self.device)
            c1 = c5 = agree = entropy = zero
            count = 0
            top_now = []
            for b, (images, y) in enumerate(self.data.test):
                logits = forward(images).float()
                if first:
                    labels.append(y)
                k1, k5 = topk_correct(logits, y)
                c1, c5 = c1 + k1, c5 + k5
                count += y.shape[0]
                top = logits.argmax(-1)
                top_now.append(top)
                if not first:
                    agree = agree + (top == prev_top[b]).sum()
                log_p = torch.log_softmax(logits / T, dim=-1)
                entropy = entropy - (log_p.exp() * log_p).sum()
                if slot in members:
                    probs = torch.softmax(logits, dim=-1)
                    if len(sums) <= b:
                        sums.append(probs)
                    else:
                        sums[b] = sums[b] + probs
            c1, c5, agree, entropy = (self._all_reduce(torch.stack([c1, c5, agree, entropy]))
                                      .tolist())
            count = int(self._all_reduce(torch.tensor(float(count), device=self.device)))
            info = dict(slot=slot, snapshot_top1_error=100 * (1 - c1 / count),
                        snapshot_top5_error=100 * (1 - c5 / count), entropy_T=entropy / count)
            stage = stage_of_slot.get(slot)
            if stage is not None and isinstance(stage.loss.teacher, int) and not first:
                info["teacher_agreement"] = 100.0 * agree / count
                info["teacher_entropy"] = per_slot[-1]["entropy_T"]
            per_slot.append(info)
            prev_top = top_now
            if slot in members:
                e1 = e5 = zero
                for probs, y in zip(sums, labels):
                    k1, k5 = topk_correct(probs, y)
                    e1, e5 = e1 + k1, e5 + k5
                e1, e5 = self._all_reduce(torch.stack([e1, e5])).tolist()
                ensembles.append(dict(members=[self._slot_index(s) for s in members
                                               if s <= slot],
                                      top1_error=100 * (1 - e1 / count),
                                      top5_error=100 * (1 - e5 / count)))
        return dict(per_slot=per_slot, ensembles=ensembles)

    def _slot_index(self, slot: int) -> int:
        """The results index of a slot: cycle number (1-based) or generation number."""
        return slot if self.cfg.method in GENERATION_METHODS else slot + 1

    def _all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over processes, in place (identity in one process)."""
        if self.world_size == 1:
            return tensor
        return distributed.all_reduce(tensor, op)

    def finish(self) -> Dict[str, Any]:
        cfg = self.cfg
        ensemble = None
        ensembles: List[Dict[str, Any]] = []
        if self.teachers is not None:
            extra = self.evaluate_snapshots()
            for info in extra["per_slot"]:
                entry = next(e for e in self.snapshots
                             if e["index"] == self._slot_index(info["slot"]))
                entry.update({k: v for k, v in info.items() if k not in ("slot", "entropy_T")})
            ensembles = extra["ensembles"]
            if ensembles:
                ensemble = dict(ensembles[-1])
        final, best = summarise(self.snapshots)
        wall = self.wall_time + self.monitor.elapsed()
        results = dict(
            method=cfg.method, arch=cfg.arch, dataset=cfg.dataset, num_classes=self.num_classes,
            snapshots=self.snapshots, final=final, best=best, ensemble=ensemble,
            ensembles=ensembles, temperature=cfg.temperature,
            student_temperature=cfg.student_temperature, lambda_s=cfg.lambda_s,
            lambda_t=cfg.lambda_t, t2_scaling=cfg.t2_scaling,
            teacher_dtype=cfg.teacher_dtype if self.teachers or self.kd_teacher else None,
            teacher_arch=cfg.teacher_arch, teacher_checkpoint=cfg.teacher_checkpoint,
            eta=cfg.eta if cfg.method == "tt"
            else None, topk=cfg.topk if cfg.method == "tt" else None, epochs=cfg.epochs,
            cycle_epochs=cfg.cycle_epochs if cfg.method in CYCLIC_METHODS else None,
            generations=cfg.generations if cfg.method in GENERATION_METHODS else None,
            world_size=self.world_size, batch_size=cfg.batch_size,
            grad_accum_steps=cfg.grad_accum_steps,
            global_batch_size=cfg.global_batch_size, sync_bn=cfg.sync_bn, amp=cfg.amp,
            seed=cfg.seed,
            wall_time_s=round(wall, 2),
            run_dir=self.run_dir)
        if self.is_main:
            save_safetensors(model_weights(self.model),
                             os.path.join(self.run_dir, "model.safetensors"),
                             self._weights_metadata())
            write_results(results, self.run_dir)
            if not self.quiet:
                print_results(f"{format_table([results])}\n\nresults: "
                              f"{os.path.join(self.run_dir, 'results.md')} (and results.json, "
                              f"metrics.jsonl, model.safetensors); {wall:.1f} s")
        return results


def configure_cuda_kernels(deterministic: bool) -> None:
    """The process-wide choice of CUDA kernels for a run (``--deterministic``).

    Deterministic: cuDNN's deterministic algorithms without autotuning, float32 matmuls in
    float32, cuBLAS with a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, unless the user set one;
    read when cuBLAS starts, so before the first matmul), and
    ``torch.use_deterministic_algorithms``, under which an op that has only a nondeterministic
    CUDA kernel raises torch's error naming it instead of quietly breaking the bit-exact resume.
    Otherwise: cuDNN autotuning, and float32 matmuls (the classifier, everything with ``--amp
    none``) as TF32 on tensor cores, as cuDNN already does for convolutions."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.set_float32_matmul_precision("highest" if deterministic else "high")


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _synthetic_size(value):
    if value is None:
        return None
    return value[0] if len(value) == 1 else tuple(value)
