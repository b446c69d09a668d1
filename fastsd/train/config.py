"""The trainer's one typed configuration.

:class:`TrainConfig` is the single source of truth: every field has a default, a help text (used
verbatim by the command line) and a check. Defaults marked "auto" (``None``) are resolved on
construction from the method, the data set and the device, so the object a run holds, and the
``config.yaml`` it writes, state every value that was actually used (λ_S and λ_T included).
The command line and ``--config FILE.yaml`` only override fields; constructing the dataclass
validates them all and raises :class:`~fastsd.train.errors.ConfigError` naming the flag and the fix.
"""

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from fastsd.data.catalog import DATASETS

from .errors import ConfigError

METHODS = ("bl", "se", "sd", "kd", "ban", "tt")
AMP_MODES = ("auto", "bf16", "fp16", "none")
TEACHER_DTYPES = ("auto", "fp16", "bf16", "fp32")
SCHEDULES = ("cosine", "step")
PROGRESS_MODES = ("auto", "bar", "plain", "none")
CYCLIC_METHODS = ("se", "sd")
GENERATION_METHODS = ("ban", "tt")

# Recommended settings per data set, used where a field is left at "auto". The CIFAR numbers are
# the published SD setting (300 epochs, 4 mini-generations); ImageNet-style folders get the
# 90-epoch / 2 mini-generation setting. The synthetic set is the quick-start demonstration: a few
# short cycles on 16x16 images: 10-20 s on an idle 2-core CPU, well under 3 minutes on a busy one.
_DATASET_DEFAULTS = {
    "synthetic": dict(epochs=6, cycles=3, batch_size=64, weight_decay=5e-4, image_size=16),
    "cifar10": dict(epochs=300, cycles=4, batch_size=128, weight_decay=5e-4),
    "cifar100": dict(epochs=300, cycles=4, batch_size=128, weight_decay=5e-4),
    "imagefolder": dict(epochs=90, cycles=2, batch_size=256, weight_decay=1e-4),
}

# The quick-start demonstration's data: small enough for 12 s on 2 CPU cores, big enough to learn.
_SYNTHETIC_SIZE = (2048, 500)

# Settings that only some methods read (cycles, the KD teacher and the restart warm-up have checks
# of their own in TrainConfig): given on the command line to another method, they are refused.
_TEACHER_METHODS = ("sd", "kd", "ban", "tt")
METHOD_SETTINGS = {"generations": GENERATION_METHODS, "eta": ("tt",), "topk": ("tt",),
                   "temperature": _TEACHER_METHODS, "student_temperature": _TEACHER_METHODS,
                   "lambda_s": _TEACHER_METHODS, "lambda_t": _TEACHER_METHODS,
                   "t2_scaling": _TEACHER_METHODS}


def refuse_other_methods_settings(given, method: str, source: Optional[str] = None) -> None:
    """ConfigError for the first of the ``given`` setting names that ``method`` does not read
    (a --generations on an sd run would otherwise be dropped without a word). ``source``: the
    file they come from, for a message that names the file's key instead of a flag."""
    for name in given:
        methods = METHOD_SETTINGS.get(name)
        if methods is not None and method not in methods:
            what = f"{name} in {source}" if source else flag(name)
            raise ConfigError(f"{what}: applies to --method {', '.join(methods)}, not "
                              f"{method}, which does not read it; drop {what}")


# Fields --resume may change: they affect how a run is watched or fed, never what it trains.
# (Another --eval-batch-size can still move evaluated logits in their last bits where the
# convolution kernels are chosen per batch shape, as cuDNN's are; the meters sum in float64.)
RESUME_OVERRIDABLE = ("resume", "out", "data", "workers", "log_every", "progress", "tensorboard",
                      "max_nonfinite", "eval_batch_size", "check_images", "checkpoint_every",
                      "profile")


def _f(default, help, group, **meta):
    """A dataclass field carrying its command-line help, group and extra argparse settings."""
    return field(default=default, metadata=dict(help=help, group=group, **meta))


def _flist(help, group, **meta):
    return field(default=None, metadata=dict(help=help, group=group, list=True, **meta))


def flag(name: str) -> str:
    """The command-line spelling of a field name."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` means "auto" and is resolved on construction."""

    # ----------------------------------------------------------------------------------- method
    method: str = _f("sd", "training method: bl (plain), se (snapshot ensembles), sd (snapshot "
                     "distillation), kd (distillation from a trained teacher), ban (born-again "
                     "generations), tt (generations with a tolerant first teacher)", "method",
                     choices=METHODS)
    cycles: Optional[int] = _f(None, "se/sd: number of cycles (mini-generations) of equal length, "
                               "leftover epochs to the last [auto: 4 on CIFAR, 2 on ImageNet "
                               "folders, 3 on synthetic]", "method")
    cycle_epochs: Optional[List[int]] = _flist(
        "se/sd: epochs of each cycle, e.g. 150,50,50,50 (leftover epochs go to the last cycle; "
        "sets --cycles)", "method", type=int)
    generations: int = _f(2, "ban/tt: number of taught generations after generation 0 (each "
                          "trains --epochs epochs)", "method")
    temperature: float = _f(2.0, "T: the teacher's logits are divided by T (sd, kd, ban, tt)",
                            "method")
    student_temperature: Optional[float] = _f(
        None, "the student's logits are divided by this inside the KL term [auto: T for kd (both "
        "softened), 1 otherwise (the asymmetric SD form)]", "method")
    lambda_s: Optional[float] = _f(None, "λ_S, weight of the cross-entropy when a teacher is "
                                   "present [auto: 1 + 1/T for sd, 1 for kd, ban and tt]", "method")
    lambda_t: float = _f(1.0, "λ_T, weight of the KL term to the teacher", "method")
    t2_scaling: Optional[bool] = _f(None, "multiply the KL term by T² [auto: on for kd, off "
                                    "otherwise]", "method")
    eta: float = _f(0.6, "tt: η, weight of the cross-entropy of generation 0; the tolerance "
                    "penalty gets 1 - η", "method")
    topk: int = _f(5, "tt: K, the penalty compares the top-1 score with the mean of the scores "
                   "ranked 2..K", "method")
    teacher_arch: Optional[str] = _f(None, "kd: architecture of the trained teacher [auto: "
                                     "--arch]", "method", metavar="NAME")
    teacher_checkpoint: Optional[str] = _f(
        None, "kd: the trained teacher (a fastsd run directory, checkpoint, model.safetensors, or "
        "a plain state_dict file)", "method", metavar="PATH")
    teacher_dtype: str = _f("auto", "precision of teacher snapshots and their forward pass (an "
                            "fp32 teacher is kept as fp16 and widened: its weights are rounded to "
                            "fp16) [auto: fp16 on CUDA, bf16 on CPUs with native bf16, else "
                            "fp32]", "method", choices=TEACHER_DTYPES)

    # ------------------------------------------------------------------------------ model, data
    arch: str = _f("resnet20", "model: resnet20/32/44/56/110, densenet_bc_100, densenet_bc_190 "
                   "(CIFAR) or any torchvision classifier (resnet18 ... resnet152, ...)", "model",
                   metavar="NAME")
    dataset: str = _f("synthetic", "data set: synthetic (built in, no download), cifar10, "
                      "cifar100, imagefolder (--data holds train/ and val/ or test/)", "data",
                      choices=DATASETS)
    data: Optional[str] = _f(None, "data folder (cifar10/cifar100: torchvision's layout; "
                             "imagefolder: train/ and val/ with one folder per class)", "data",
                             metavar="DIR")
    download: bool = _f(False, "cifar10/cifar100: download into --data when missing", "data")
    num_classes: Optional[int] = _f(None, "number of classes [auto: from the data set]", "data")
    image_size: Optional[int] = _f(None, "side of the training crop [auto: on synthetic 16 for "
                                   "the CIFAR models (the quick demo), 32 for ImageNet ones (224 "
                                   "for the ViTs, which take one size; 63, 75 for alexnet, "
                                   "inception_v3); 32 on "
                                   "CIFAR; on image folders the model's input size: 224 for most "
                                   "(299 for inception_v3, 240-600 for efficientnet_b1-b7), 32 "
                                   "for the CIFAR models]", "data")
    synthetic_size: Optional[List[int]] = _flist(
        "synthetic: training images, or training,test images [auto: 2048,500]", "data",
        type=int)
    batch_size: Optional[int] = _f(None, "training batch size per process and forward pass "
                                   "(an update's global batch is --batch-size x "
                                   "--grad-accum-steps x --world-size) [auto: 128 on CIFAR, 256 "
                                   "on ImageNet folders, 64 on synthetic]", "data")
    grad_accum_steps: int = _f(
        1, "forward and backward passes of --batch-size images whose gradients add up to one "
        "update: the batch of an update without its memory (BatchNorm still normalises each "
        "pass by itself)", "data")
    eval_batch_size: Optional[int] = _f(None, "evaluation batch size per process [auto: 2 x "
                                        "batch size]", "data")
    workers: Optional[int] = _f(None, "data loading worker processes [auto: min(8, CPUs - 1) on "
                                "CUDA, 0 on CPU]", "data")
    check_images: str = _f("auto", "image folders (imagefolder; CIFAR's under --dali): open "
                           "every image before training so a broken file is named up front: "
                           "full (decode), header, none [auto: full for the evaluation split, "
                           "and for a training split of up to 50,000 images; header beyond]",
                           "data",
                           choices=("auto", "full", "header", "none"))
    dali: bool = _f(False, "use the NVIDIA DALI input pipeline instead of torch's DataLoader",
                    "data")

    # ---------------------------------------------------------------------------- optimisation
    epochs: Optional[int] = _f(None, "training epochs (per generation for ban/tt) [auto: 300 on "
                               "CIFAR, 90 on ImageNet folders, 6 on synthetic; the sum of "
                               "--cycle-epochs when given]", "optim")
    lr: Optional[float] = _f(
        None, "peak learning rate (lr_max of every cycle) for the global batch; a given value is "
        "used as is, never rescaled with --world-size [auto: 0.1 for the CIFAR models; for "
        "torchvision (ImageNet) models the linear scaling rule, 0.1 x global batch / 256]",
        "optim")
    lr_min: float = _f(0.0, "learning rate the cosine decays towards", "optim")
    schedule: str = _f("cosine", "bl/kd/ban/tt: cosine or step (multi-step); se/sd always use "
                       "the cyclic cosine", "optim", choices=SCHEDULES)
    milestones: Optional[List[float]] = _flist(
        "step schedule: epochs at which the learning rate is multiplied by --gamma [auto: 50%% "
        "and 75%% of the epochs]", "optim", type=float)
    gamma: float = _f(0.1, "step schedule: factor at each milestone", "optim")
    warmup_epochs: Optional[float] = _f(
        None, "linear warm-up over this many epochs at the start of training (and of every "
        "generation): the schedule's learning rate times a ramp from near 0 to 1 [auto: 1 (at "
        "most half a generation) for ban/tt, whose generations start from fresh weights under a "
        "teacher, which diverges at full --lr; 0 otherwise]", "optim")
    restart_warmup_epochs: float = _f(
        0.0, "se/sd: linear warm-up over this many epochs after every learning-rate restart "
        "(the start of cycles 2 ... M): the cycle's cosine times a ramp from near 0 to 1, as "
        "with --warmup-epochs; 0 is the sharp restart of SE and SD. A deep net's loss can jump "
        "at a sharp restart", "optim")
    momentum: float = _f(0.9, "SGD momentum", "optim")
    nesterov: bool = _f(True, "Nesterov momentum", "optim")
    weight_decay: Optional[float] = _f(None, "L2 weight decay [auto: 5e-4 on CIFAR/synthetic, "
                                       "1e-4 on ImageNet folders]", "optim")
    wd_norm_bias: bool = _f(True, "apply weight decay to normalisation weights and biases too "
                            "(--no-wd-norm-bias exempts every parameter with fewer than 2 "
                            "dimensions)", "optim")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy (in [0, 1))", "optim")
    clip_grad_norm: Optional[float] = _f(
        None, "before each update, scale the gradient down to this global L2 norm (over all "
        "parameters; the all-reduced gradient in distributed runs, the unscaled one under fp16) "
        "when it is larger [default: no clipping]", "optim")

    # ----------------------------------------------------------------------------- performance
    device: Optional[str] = _f(None, "cuda, cuda:N or cpu [auto: cuda when present]", "perf",
                               metavar="DEVICE")
    amp: str = _f("auto", "mixed precision of the student: bf16, fp16 (with a gradient scaler) "
                  "or none [auto: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs that run "
                  "bf16 natively (AMX, AVX-512 BF16: 1.7x the float32 step of a ResNet-20 on 2 "
                  "Xeon cores), none on other CPUs]", "perf", choices=AMP_MODES)
    channels_last: bool = _f(True, "channels_last (NHWC) memory format, the layout of cuDNN's "
                             "and oneDNN's fast convolutions (on 2 Xeon cores the SD step of a "
                             "ResNet-20 or -50 runs 1.17x to 1.36x faster in it)", "perf")
    compile: bool = _f(False, "torch.compile the student step and the teacher forward", "perf")
    compile_mode: str = _f("default", "torch.compile mode (default, reduce-overhead, "
                           "max-autotune)", "perf", metavar="MODE")
    threads: Optional[int] = _f(None, "CPU threads for intra-op parallelism [auto: torch's "
                                "default, one per core]", "perf")
    world_size: Optional[int] = _f(None, "processes training together, each with its own "
                                   "shard and --batch-size [auto: torchrun's WORLD_SIZE, 1 "
                                   "without torchrun]; launch several with torchrun "
                                   "--standalone --nproc-per-node N -m fastsd.train", "perf")
    sync_bn: bool = _f(False, "several processes: SyncBatchNorm, BatchNorm statistics over the "
                       "global batch (CUDA only); without it each process normalises with its "
                       "own batch's statistics", "perf")
    deterministic: bool = _f(False, "deterministic CUDA kernels (cuDNN without autotuning, "
                             "torch.use_deterministic_algorithms, no TF32 matmuls): bit-exact "
                             "resume on CUDA, a little slower", "perf")

    # ------------------------------------------------------------------------------------- run
    out: Optional[str] = _f(None, "run directory [auto: runs/<method>-<arch>-<date-time>]",
                            "run", metavar="DIR")
    resume: Optional[str] = _f(None, "continue the run in this directory from its last "
                               "checkpoint", "run", metavar="DIR")
    seed: int = _f(0, "random seed (model initialisation, data order and augmentation)", "run")
    log_every: int = _f(50, "read the step metrics (a host sync) and log them every N steps",
                        "run")
    checkpoint_every: Optional[int] = _f(
        None, "also write the checkpoint every N steps inside an epoch (a multiple of "
        "--log-every), so a run killed without warning (SIGKILL, a lost node) loses at most N "
        "steps; SIGTERM and Ctrl-C always write one [default: at every epoch end only]", "run")
    profile: Optional[int] = _f(
        None, "record N training iterations with torch.profiler, after the first 6 (compilation "
        "and warm-up left out), into <run>/profile/: trace.json (chrome://tracing, Perfetto) and "
        "operators.txt (operators by self time) [default: off]", "run")
    eval_every: int = _f(1, "evaluate on the test split every N epochs (and at every cycle or "
                         "generation end)", "run")
    max_nonfinite: int = _f(20, "stop after this many consecutive steps whose update was skipped "
                            "for a non-finite loss or gradient (under fp16 AMP: consecutive "
                            "forward passes with a non-finite loss; its loss scaler skips "
                            "overflows by itself)",
                            "run")
    progress: str = _f("auto", "progress display: bar (tqdm), plain lines, none [auto: bar on a "
                       "terminal, plain otherwise]", "run", choices=PROGRESS_MODES)
    tensorboard: bool = _f(True, "write TensorBoard event files (when tensorboard is installed)",
                           "run")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self):
        # Which fields the config fills in itself (None or "auto" when given, plus generations,
        # set to 0 for methods without them): config.yaml lists them, so a run started from it
        # with --config resolves them again from the new settings (a changed --temperature
        # moves λ_S, --method bl drops the cycles) instead of keeping values derived from the
        # old ones. Not a dataclass field: no flag, not compared.
        self._coerce_types()
        given = self.to_dict()
        self._resolve_and_check()
        self.auto_fields = frozenset(
            name for name, value in given.items()
            if value is None or value == "auto" or (name == "generations"
                                                     and value != self.generations))

    # Values from YAML or a caller may come as strings or lists; accept the obvious spellings.
    def _coerce_types(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            name = flag(f.name)
            if f.metadata.get("list"):
                elem = f.metadata["type"]
                try:
                    value = parse_list(value, elem)
                except (TypeError, ValueError):
                    raise ConfigError(f"{name}: expected a comma-separated list of "
                                      f"{elem.__name__} values, got {getattr(self, f.name)!r}")
                setattr(self, f.name, value)
                continue
            kind = _base_type(f.type)
            try:
                setattr(self, f.name, _convert(kind, value))
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected {_type_words(kind)}, got {value!r}")

    def _resolve_and_check(self):  # noqa: C901 -- one linear list of checks reads best
        def bad(name, msg):
            raise ConfigError(f"{flag(name)}: {msg}")

        for name, choices in (("method", METHODS), ("dataset", DATASETS), ("amp", AMP_MODES),
                              ("teacher_dtype", TEACHER_DTYPES), ("schedule", SCHEDULES),
                              ("progress", PROGRESS_MODES),
                              ("check_images", ("auto", "full", "header", "none"))):
            value = getattr(self, name)
            if value not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                bad(name, f"unknown value {value!r}{hint}; choose one of {', '.join(choices)}")
        self._check_arch("arch", self.arch)
        defaults = _DATASET_DEFAULTS[self.dataset]
        cyclic = self.method in CYCLIC_METHODS

        # --- data
        if self.dataset != "synthetic" and not self.data:
            hint = (" (or add --download to fetch it)" if self.dataset.startswith("cifar")
                    else ", with train/ and val/ (or test/) holding one folder per class")
            bad("data", f"--dataset {self.dataset} needs --data DIR: the folder holding the data "
                f"set{hint}")
        if self.data is not None:
            # absolute: evaluate and a resume may start from another directory, and the report
            # tells image-folder data sets apart by it
            self.data = os.path.abspath(os.path.expanduser(self.data))
        if self.synthetic_size is not None:
            if self.dataset != "synthetic":
                bad("synthetic_size", f"applies to --dataset synthetic only, not {self.dataset}")
            if not 1 <= len(self.synthetic_size) <= 2 or min(self.synthetic_size) < 1:
                bad("synthetic_size", f"give N or N,M (training and test images, each >= 1), "
                    f"got {self.synthetic_size}")
        elif self.dataset == "synthetic":
            self.synthetic_size = list(_SYNTHETIC_SIZE)
        for name in ("num_classes", "image_size", "batch_size", "eval_batch_size",
                     "grad_accum_steps"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "num_classes" else 1):
                bad(name, f"must be >= {2 if name == 'num_classes' else 1}, got {value}")
        if self.batch_size is None:
            self.batch_size = defaults["batch_size"]
        if self.image_size is None:
            self.image_size = auto_image_size(self.dataset, self.arch)
        from fastsd.models import check_input_size

        try:  # now, not as a traceback of the first step
            check_input_size(self.arch, self.image_size or 32)  # None: CIFAR's native 32
        except ValueError as e:
            bad("image_size", str(e))
        if self.eval_batch_size is None:
            self.eval_batch_size = 2 * self.batch_size

        # --- device and precision
        import torch

        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = check_device(self.device)
        except ValueError as e:
            bad("device", str(e))
        on_cuda = dev.type == "cuda"
        from .distributed import launched_world_size

        launched = launched_world_size()
        if self.world_size is None:
            self.world_size = launched
        if self.world_size != launched:
            bad("world_size", f"the run has {self.world_size} process(es) (a resumed run keeps "
                f"the number it started with) but this launch has {launched} (torchrun's "
                f"WORLD_SIZE); launch {self.world_size} with torchrun --nnodes/--nproc-per-node, "
                f"or start a new run")
        if self.world_size > 1 and dev.index is not None:
            bad("device", f"{self.device} with {self.world_size} processes: each process uses the"
                f" GPU of its LOCAL_RANK; pass --device cuda")
        if self.sync_bn and not on_cuda:
            bad("sync_bn", "PyTorch's SyncBatchNorm runs on GPUs only; drop --sync-bn on the CPU")
        if self.amp == "auto":
            if on_cuda:
                self.amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                self.amp = "bf16" if _cpu_has_bf16() else "none"
        if self.amp == "fp16" and not on_cuda:
            bad("amp", "fp16 autocast with a gradient scaler needs CUDA; on the CPU use "
                "--amp bf16 or --amp none")
        if self.teacher_dtype == "auto":
            self.teacher_dtype = "fp16" if on_cuda else ("bf16" if _cpu_has_bf16() else "fp32")
        if self.teacher_dtype == "fp16" and not on_cuda:
            bad("teacher_dtype", "fp16 convolutions are very slow (or missing) on the CPU; use "
                "--teacher-dtype bf16 or fp32")
        if self.workers is None:
            self.workers = auto_workers(on_cuda)
        if self.threads is not None and self.threads < 1:
            bad("threads", f"must be >= 1, got {self.threads}")
        if self.workers < 0:
            bad("workers", f"must be >= 0, got {self.workers}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune",
                                     "max-autotune-no-cudagraphs"):
            bad("compile_mode", f"unknown torch.compile mode {self.compile_mode!r}; use default, "
                f"reduce-overhead or max-autotune")

        # --- epochs and cycles
        if self.epochs is not None and self.epochs < 1:
            bad("epochs", f"must be >= 1, got {self.epochs}")
        if not cyclic:
            if self.cycle_epochs is not None or (self.cycles is not None and self.cycles != 1):
                which = "cycle_epochs" if self.cycle_epochs is not None else "cycles"
                bad(which, f"cycles apply to --method se and sd; --method {self.method} trains "
                    f"with one {self.schedule} schedule (drop {flag(which)})")
            self.cycles = 1
            if self.epochs is None:
                self.epochs = defaults["epochs"]
        elif self.cycle_epochs is not None:
            if not self.cycle_epochs:
                bad("cycle_epochs", "give the epochs of each cycle, e.g. --cycle-epochs "
                    "150,50,50,50 (or --cycles N for N cycles of equal length)")
            if any(e < 1 for e in self.cycle_epochs):
                bad("cycle_epochs", f"every cycle needs at least 1 epoch, got "
                    f"{','.join(map(str, self.cycle_epochs))}")
            if self.cycles is not None and self.cycles != len(self.cycle_epochs):
                bad("cycles", f"--cycles {self.cycles} contradicts --cycle-epochs "
                    f"{','.join(map(str, self.cycle_epochs))} ({len(self.cycle_epochs)} cycles); "
                    f"give only one of them")
            total = sum(self.cycle_epochs)
            if self.epochs is None:
                self.epochs = total
            if total > self.epochs:
                bad("cycle_epochs", f"the cycles add up to {total} epochs but --epochs is "
                    f"{self.epochs}; shorten the cycles or raise --epochs")
            # Leftover epochs go to the last cycle: store the lengths actually trained.
            self.cycle_epochs = self.cycle_epochs[:-1] + [self.cycle_epochs[-1]
                                                          + self.epochs - total]
            self.cycles = len(self.cycle_epochs)
        else:
            explicit = self.cycles is not None
            if self.epochs is None:
                self.epochs = defaults["epochs"]
            if not explicit:
                self.cycles = min(defaults["cycles"], self.epochs)
            if self.cycles < 1:
                bad("cycles", f"must be >= 1, got {self.cycles}")
            if self.cycles > self.epochs:
                bad("cycles", f"{self.cycles} cycles do not fit in {self.epochs} epochs (each "
                    f"cycle needs at least one); lower --cycles or raise --epochs")
            base = self.epochs // self.cycles
            self.cycle_epochs = [base] * (self.cycles - 1) + [self.epochs
                                                              - base * (self.cycles - 1)]

        # --- distillation
        for name in ("temperature", "student_temperature"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                bad(name, f"must be a finite number > 0, got {value}")
        if self.student_temperature is None:
            self.student_temperature = self.temperature if self.method == "kd" else 1.0
        if self.t2_scaling is None:
            self.t2_scaling = self.method == "kd"
        if self.lambda_s is None:
            # 1 + 1/T is SD's (a public reimplementation's) weight for a student that is already
            # trained when its teacher arrives. A fresh ban/tt generation at full --lr diverges
            # with that extra weight on CE (seen on the synthetic data), so it gets plain CE + KL.
            self.lambda_s = 1.0 + 1.0 / self.temperature if self.method == "sd" else 1.0
        for name in ("lambda_s", "lambda_t"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                bad(name, f"must be a finite number >= 0, got {value}")
        if not (0.0 <= self.eta <= 1.0) or not math.isfinite(self.eta):
            bad("eta", f"η must be in [0, 1], got {self.eta}")
        if not 2 <= self.topk <= 16:
            bad("topk", f"K must be an integer in [2, 16], got {self.topk}")
        if self.generations < 0:
            bad("generations", f"must be >= 0, got {self.generations}")
        if self.method not in GENERATION_METHODS:
            self.generations = 0
        if self.method == "kd":
            if not self.teacher_checkpoint:
                bad("teacher_checkpoint", "--method kd distils a separately trained teacher: give "
                    "--teacher-checkpoint (a fastsd run directory or weights file) and "
                    "--teacher-arch if it differs from --arch")
            # absolute: a resume (config.yaml, --auto-resume) may start from another directory
            self.teacher_checkpoint = os.path.abspath(os.path.expanduser(self.teacher_checkpoint))
            if self.teacher_arch is None:
                self.teacher_arch = self.arch
            self._check_arch("teacher_arch", self.teacher_arch)
            from fastsd.models import check_input_size

            try:  # the teacher sees the student's images
                check_input_size(self.teacher_arch, self.image_size or 32)
            except ValueError as e:
                bad("teacher_arch", f"the teacher cannot run on the training images: {e}")
        elif self.teacher_checkpoint or self.teacher_arch:
            bad("teacher_checkpoint" if self.teacher_checkpoint else "teacher_arch",
                f"a separate teacher is used by --method kd only, not {self.method}")

        # --- optimisation
        if self.lr is None:
            from fastsd.models import get_model_info

            # The ImageNet recipes' 0.1 is for 256 images (Goyal et al.'s linear rule); at 0.1 a
            # ResNet-18 on the batch-64 synthetic demo diverges, at 0.025 it learns.
            imagenet = get_model_info(self.arch).family == "imagenet"
            self.lr = 0.1 * self.global_batch_size / 256 if imagenet else 0.1
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", f"must be a finite number > 0, got {self.lr}")
        if not (0 <= self.lr_min < self.lr):
            bad("lr_min", f"must be in [0, --lr) = [0, {self.lr}), got {self.lr_min}")
        if cyclic and self.schedule != "cosine":
            bad("schedule", f"--method {self.method} uses the cyclic cosine schedule; "
                f"--schedule step applies to bl, kd, ban and tt")
        if self.schedule == "step":
            if self.milestones is None:
                self.milestones = [0.5 * self.epochs, 0.75 * self.epochs]
            if any(not (0 < m < self.epochs) for m in self.milestones) or \
                    list(self.milestones) != sorted(self.milestones):
                bad("milestones", f"must be increasing epochs inside (0, {self.epochs}), got "
                    f"{self.milestones}")
            if not 0 < self.gamma < 1:
                bad("gamma", f"must be in (0, 1), got {self.gamma}")
        elif self.milestones is not None:
            bad("milestones", "milestones apply to --schedule step only")
        for name in unread_settings(lambda n: getattr(self, n)):
            bad(name, UNREAD_SETTINGS[name][1])
        if self.warmup_epochs is None:
            self.warmup_epochs = (min(1.0, self.epochs / 2) if self.method in GENERATION_METHODS
                                  else 0.0)
        if not (0 <= self.warmup_epochs < self.cycle_epochs[0] if cyclic
                else 0 <= self.warmup_epochs < self.epochs):
            bad("warmup_epochs", f"must be >= 0 and shorter than the first cycle / the training,"
                f" got {self.warmup_epochs}")
        if cyclic:
            shortest_restart = min(self.cycle_epochs[1:], default=math.inf)
            if not (0 <= self.restart_warmup_epochs < shortest_restart):
                bad("restart_warmup_epochs", f"must be >= 0 and shorter than every cycle after "
                    f"the first ({shortest_restart} epochs), got {self.restart_warmup_epochs}")
        elif self.restart_warmup_epochs != 0:
            bad("restart_warmup_epochs", f"the learning rate restarts in se and sd only; "
                f"--method {self.method} warms up with --warmup-epochs")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            bad("nesterov", "Nesterov needs --momentum > 0 (or pass --no-nesterov)")
        if self.weight_decay is None:
            self.weight_decay = defaults["weight_decay"]
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm)
                                                    and self.clip_grad_norm > 0):
            bad("clip_grad_norm", f"must be a finite number > 0 (or left out: no clipping), got "
                f"{self.clip_grad_norm}")

        # --- run
        if not 0 <= self.seed < 2 ** 63:  # what torch.manual_seed takes
            bad("seed", f"must be in [0, 2**63), got {self.seed}")
        for name in ("log_every", "eval_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.profile is not None and self.profile < 1:
            bad("profile", f"must be >= 1 iterations (or left out: no profile), got "
                f"{self.profile}")
        if self.checkpoint_every is not None and (self.checkpoint_every < 1 or
                                                  self.checkpoint_every % self.log_every):
            # a multiple: the checkpoint then follows a log line, and the step rows of a run do
            # not depend on where it was checkpointed
            bad("checkpoint_every", f"must be a positive multiple of --log-every "
                f"({self.log_every}), got {self.checkpoint_every}")

    def _check_arch(self, name, value):
        from fastsd.models import get_model_info

        try:
            get_model_info(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{flag(name)}: {e}") from None

    # ------------------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        """Images per optimisation step (update) over all processes and accumulated passes."""
        return self.batch_size * self.grad_accum_steps * self.world_size

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: ``epochs`` times the number of generations for ban/tt."""
        return self.epochs * (self.generations + 1 if self.method in GENERATION_METHODS else 1)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "TrainConfig":
        """A new, re-validated config with some fields changed; the others that were auto stay
        marked so."""
        new = TrainConfig(**{**self.to_dict(), **changes})
        new.auto_fields |= self.auto_fields - changes.keys()
        return new

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping whose keys are field names (``-`` may stand for ``_``)."""
        return cls(**normalise_keys(values, source))


def in_run_ensemble(method: str, index: int) -> bool:
    """Whether the snapshot with results index ``index`` (the cycle, 1-based, or the
    generation, from 0) is averaged into the run's ensemble: every cycle of SE/SD; for BAN/TT
    generations 1..g, not the generation 0 that taught them."""
    return method not in GENERATION_METHODS or index >= 1


# Settings that the others can leave unread: set away from their default there, each is refused
# rather than ignored without a word. name -> (unread, given a reader of the settings; the fix).
UNREAD_SETTINGS = {
    "gamma": (lambda get: get("schedule") != "step",
              "the factor at each milestone applies to --schedule step only; drop --gamma (or "
              "add --schedule step)"),
    "lr_min": (lambda get: get("schedule") == "step",
               "the step schedule multiplies --lr by --gamma and has no floor; drop --lr-min "
               "(or use --schedule cosine)"),
    "compile_mode": (lambda get: not get("compile"),
                     "applies with --compile only; add --compile or drop --compile-mode"),
}


def unread_settings(get: Callable[[str], Any]) -> List[str]:
    """The UNREAD_SETTINGS set away from their defaults where the others leave them unread;
    ``get(name)``: the setting's value."""
    return [name for name, (unread, _) in UNREAD_SETTINGS.items()
            if unread(get) and get(name) != field_default(name)]


def field_default(name: str) -> Any:
    """What a run gets for setting ``name`` when it is not given (TrainConfig's default)."""
    return TrainConfig.__dataclass_fields__[name].default


def check_device(name: str):
    """``name`` ("cpu", "cuda", "cuda:N") as a torch.device that exists here, else a ValueError
    that says what to pass instead."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"cannot parse {name!r}; use cuda, cuda:N or cpu") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"{name!r} is not supported; use cuda, cuda:N or cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} was asked for but CUDA is not available here; use "
                             f"--device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return dev


def auto_workers(on_cuda: bool) -> int:
    """Data loading worker processes when none are asked for: on CUDA all CPUs but the one that
    drives the GPU (at most 8); on the CPU none, as the network's own threads use every core."""
    return min(8, max(0, (os.cpu_count() or 1) - 1)) if on_cuda else 0


def auto_image_size(dataset: str, arch: str) -> Optional[int]:
    """The training crop a run gets when ``--image-size`` is left out: CIFAR's 32 px on CIFAR
    (None: the data layer's native size), on image folders the input size the model was designed
    for, and on synthetic data the quick demo's 16 px for the CIFAR models, 32 for ImageNet ones.
    A CIFAR ResNet fed 224-pixel crops of a folder would run ~50x the arithmetic of its 32-pixel
    design for no gain, and inception_v3 is meant for 299. An ImageNet stem divides the side by 4
    before the first block: 16 px leave 4x4 maps and 1x1 from the third stage on, and a ResNet-18
    or -152 stayed at chance on the demo (a ResNet-18 at 32 px: 11 % error in 4 epochs)."""
    if dataset == "synthetic":
        from fastsd.models import get_model_info

        demo = _DATASET_DEFAULTS["synthetic"]["image_size"]
        info = get_model_info(arch)
        if info.family == "cifar":
            return demo
        # (a ViT runs on its one size only; AlexNet and Inception-v3 need more than 32 px)
        return info.input_size if info.fixed_input_size else max(2 * demo, info.min_input_size)
    if dataset == "imagefolder":
        from fastsd.models import model_input_size

        return model_input_size(arch)
    return None


def normalise_keys(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Map ``"cycle-epochs"`` to ``"cycle_epochs"`` and reject unknown keys with a suggestion."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}; "
                              f"`python -m fastsd.train --help` lists them all")
        out[name] = value
    return out


# The key of config.yaml that lists the fields the run's config resolved itself ("auto").
AUTO_KEY = "auto_resolved"


def load_yaml(path: str) -> Tuple[Dict[str, Any], FrozenSet[str]]:
    """Read a YAML mapping of settings (as written to a run's config.yaml): the settings, and the
    names its ``auto_resolved`` list gives (none in a file written by hand)."""
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}, frozenset()
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings (key: value), got "
                          f"a {type(data).__name__}")
    auto = data.pop(AUTO_KEY, None) or []
    if not isinstance(auto, list):
        raise ConfigError(f"--config: {path}: {AUTO_KEY} must be a list of setting names, got "
                          f"{auto!r}")
    return normalise_keys(data, path), frozenset(normalise_keys(dict.fromkeys(auto), path))


def dump_yaml(cfg: TrainConfig, path: str, extra_comment: str = "") -> None:
    """Write the resolved configuration, one commented key per field, atomically."""
    from .checkpoint import atomic_write_text

    lines = ["# fastsd.train: the resolved configuration of this run (every 'auto' filled in).",
             "# Run it again with: python -m fastsd.train --config config.yaml [--out NEW_DIR]"
             " [flags to change]",
             "# (or continue it with --resume on its directory)"]
    if extra_comment:
        lines.append(f"# {extra_comment}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        lines.append(f"# {f.metadata['help'].replace('%%', '%')}")
        lines.append(_yaml_line(f.name, value))
    auto = [f.name for f in dataclasses.fields(cfg)
            if f.name in cfg.auto_fields and getattr(cfg, f.name) not in (None, "auto")]
    lines += ["# The settings above that were auto and resolved from the others and the machine. "
              "--config resolves",
              "# them again (a changed flag then carries its consequences: --temperature moves "
              "lambda_s);",
              "# --resume keeps them. Delete a name here to keep its value as written above.",
              _yaml_line(AUTO_KEY, auto)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _yaml_line(key: str, value) -> str:
    """``key: value`` on one line (lists in flow style)."""
    import yaml

    return yaml.safe_dump({key: value}, default_flow_style=True, width=1 << 20,
                          sort_keys=False).strip().strip("{}")


def parse_list(value, elem) -> list:
    """A list setting as a flag ("150,50"), YAML ([150, 50]) or a caller (150) gives it, as a list
    of ``elem``; TypeError or ValueError for an element that is not one."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [_convert(elem, v) for v in value]


def _base_type(tp):
    """``Optional[int]`` -> int."""
    args = getattr(tp, "__args__", None)
    if args:
        return next(a for a in args if a is not type(None))
    return tp


def _convert(kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _type_words(kind) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(kind, kind.__name__)


def _cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX-512 BF16 / AMX): then a bf16 teacher
    forward is about twice as fast as fp32 and a bf16-autocast SD step about 1.7 times
    (bench/bench_train.py on 2 Xeon cores: ResNet-20 at 32 px, ResNet-50 at 96 px); without it
    bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
