"""The training step and the evaluation pass.

One step: the teacher's forward (no grad, its own precision, the same augmented batch), the
student's forward under autocast, the fused loss with its separate terms, backward, and a fused SGD
update that skips itself on device when a gradient is not finite (with ``--grad-accum-steps N``,
after N such forward and backward passes). Nothing in it reads a value on
the host: the metrics (loss terms, accuracy, non-finite counts) accumulate in one small device
tensor that :meth:`TrainStep.read_metrics` reads every ``--log-every`` steps.
"""

import contextlib
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .schedule import LossSpec

# Slots of the device-side metrics accumulator: sums over the window up to _RUN, then the
# current run of bad steps and the window's longest one.
(_LOSS, _CE, _KL, _TOL, _CORRECT, _STEPS, _NONFINITE, _SKIPPED, _CLIPPED, _RUN,
 _MAX_RUN) = range(11)
_NUM_SLOTS = _MAX_RUN + 1

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _loss_fn():
    from fastsd import distill_loss

    return distill_loss


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_forward(model: nn.Module, device: torch.device,
                     amp: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> logits`` of ``model`` under the autocast of ``amp``: how the trainer (and
    ``python -m fastsd.evaluate``, to give the same numbers) evaluates a student."""
    def forward(images):
        with autocast(device, amp):
            return model(images)

    return forward


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float, wd_norm_bias: bool) -> torch.optim.SGD:
    """SGD (fused: one kernel for all parameters, and it honours ``found_inf`` without a host
    sync) with momentum buffers allocated up front, so the state a checkpoint holds is complete
    from step 0 and a skipped first step cannot leave an uninitialised buffer behind."""
    params = [p for p in model.parameters() if p.requires_grad]
    if wd_norm_bias or weight_decay == 0:
        groups = [dict(params=params, weight_decay=weight_decay)]
    else:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [dict(params=decay, weight_decay=weight_decay),
                  dict(params=no_decay, weight_decay=0.0)]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=True)
    if momentum > 0:
        for p in params:
            # A zero buffer gives the same first update as PyTorch's "buf = grad" initialisation.
            opt.state[p]["momentum_buffer"] = torch.zeros_like(
                p, memory_format=torch.preserve_format)
    return opt


class BatchNormGuard:
    """Keeps a non-finite forward pass from poisoning BatchNorm's running statistics.

    The device-side skip of a bad update protects weights and momentum, but the forward pass that
    went bad has already folded its batch statistics (inf / NaN) into every BatchNorm's running
    mean and variance, and evaluation, snapshots and teachers would be NaN from then on.
    ``save()`` before an update's passes copies the statistics; ``restore_if_bad(ok)`` after the
    update puts the copy back unless ``ok`` (every pass's loss finite and the update not skipped)
    or where a statistic is no longer finite: a skipped update leaves the running statistics (and
    ``num_batches_tracked``) as they were.

    On the device, without a host sync, and in a handful of kernels whatever the depth: the
    statistics are gathered with one ``cat`` per dtype (a ResNet-152 has 155 BatchNorm layers).
    """

    def __init__(self, model: nn.Module):
        stats = [b for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                 for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        # dtype -> 1-D views of the buffers of that dtype (num_batches_tracked is 0-d), made once:
        # the buffers are updated in place, never replaced, while the model trains
        self.groups: Dict[torch.dtype, List[torch.Tensor]] = {}
        for b in stats:
            self.groups.setdefault(b.dtype, []).append(b.view(-1))
        self.saved = {dtype: torch.cat(views) for dtype, views in self.groups.items()}
        self.sizes = {dtype: [v.numel() for v in views] for dtype, views in self.groups.items()}

    def __bool__(self) -> bool:
        return bool(self.groups)

    @torch.no_grad()
    def save(self) -> None:
        for dtype, views in self.groups.items():
            torch.cat(views, out=self.saved[dtype])

    @torch.no_grad()
    def restore_if_bad(self, ok: torch.Tensor) -> None:
        """``ok``: a 0-d bool tensor, whether every pass since ``save()`` had a finite loss and the
        update was made."""
        now = {dtype: torch.cat(views) for dtype, views in self.groups.items()}
        for dtype, flat in now.items():
            if dtype.is_floating_point:
                ok = ok & torch.isfinite(flat).all()
        for dtype, views in self.groups.items():
            kept = torch.where(ok, now[dtype], self.saved[dtype])
            torch._foreach_copy_(views, list(kept.split(self.sizes[dtype])))


class TrainStep:
    """The student's training step; ``set_stage`` chooses the loss and the teacher of a stage.

    ``__call__(images [B,3,H,W], labels [B])`` runs one forward and backward pass, and every
    ``grad_accum_steps``-th call the update, on the gradients those passes added up (each pass's
    loss divided by their number: the update of the mean loss over all their images). Under DDP
    only the last pass of an update all-reduces. ``clip_grad_norm``: the global L2 norm each
    update's gradient is scaled down to (None: none).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device, amp: str,
                 num_classes: int, compile: bool = False, compile_mode: str = "default",
                 clip_grad_norm: Optional[float] = None, grad_accum_steps: int = 1):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.amp = amp
        self.num_classes = num_classes
        self.compile = compile
        self.compile_mode = compile_mode
        self.clip_grad_norm = clip_grad_norm
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.grad_accum_steps = grad_accum_steps
        self._passes = 0  # passes since the last update
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.metrics = torch.zeros(_NUM_SLOTS, dtype=torch.float32, device=self.device)
        if compile:
            # The compiled forward adds into this tensor in place. CUDA graphs (reduce-overhead,
            # max-autotune) skip a function that mutates an input unless its address is static.
            torch._dynamo.mark_static_address(self.metrics)
        self._found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._bn_guard = BatchNormGuard(model)
        self._losses_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._one = torch.ones(1, dtype=torch.float32, device=self.device)
        self._forwards: Dict[LossSpec, Callable] = {}
        self._teacher_forwards: Dict[int, Callable] = {}
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.spec: Optional[LossSpec] = None
        self.teacher: Optional[Callable] = None
        self._forward = None

    # ------------------------------------------------------------------------------ stage setup
    def set_stage(self, spec: LossSpec, teacher: Optional[Callable]) -> None:
        """Use ``spec``'s loss from now on, taught by ``teacher(images) -> logits`` (or none)."""
        if (spec.teacher is None) != (teacher is None):
            raise ValueError("a stage's loss and its teacher must agree on whether there is one")
        self.spec = spec
        if spec not in self._forwards:
            fn = self._make_forward(spec)
            self._forwards[spec] = (torch.compile(fn, mode=self.compile_mode, dynamic=False)
                                    if self.compile else fn)
        self._forward = self._forwards[spec]
        if teacher is not None and self.compile:
            key = id(teacher)
            if key not in self._teacher_forwards:
                self._teacher_forwards[key] = torch.compile(teacher, mode=self.compile_mode,
                                                            dynamic=False)
            teacher = self._teacher_forwards[key]
        self.teacher = teacher

    def _make_forward(self, spec: LossSpec):
        """Student forward + fused loss + metric accumulation, one function (compiled as one)."""
        model, device, amp = self.model, self.device, self.amp
        distill_loss = _loss_fn()
        kwargs = spec.loss_kwargs()
        # fp16: the run of bad steps counts non-finite losses (the GradScaler's own skips of
        # overflowing steps are routine). Otherwise __call__ counts skipped updates after backward.
        loss_run = self.scaler is not None

        def forward(images, labels, teacher_logits, metrics):
            with autocast(device, amp):
                logits = model(images)
            loss, terms = distill_loss(logits, labels, teacher_logits, return_terms=True,
                                       check_labels=False, **kwargs)
            correct = (logits.detach().argmax(-1) == labels).sum().to(torch.float32)
            _accumulate(metrics, loss.detach(), terms, correct, loss_run)
            return loss

        return forward

    # ------------------------------------------------------------------------------------ step
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._passes += 1
        updates = self._passes == self.grad_accum_steps
        if self._bn_guard and self._passes == 1:
            self._bn_guard.save()
            self._losses_finite.fill_(True)
        # The passes before an update's last run under DDP's no_sync (forward and backward):
        # their gradients add up locally, and the last pass all-reduces the sum.
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None and not updates else contextlib.nullcontext():
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
            loss = self._forward(images, labels, teacher_logits, self.metrics)
            if self._bn_guard:
                self._losses_finite &= torch.isfinite(loss.detach())
            if self.grad_accum_steps > 1:
                loss = loss / self.grad_accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if not updates:
            return
        self._passes = 0
        opt = self.optimizer
        if self.scaler is not None:
            # GradScaler hands scale and found_inf to the fused SGD kernel: no host sync.
            if self.clip_grad_norm is not None:
                self.scaler.unscale_(opt)  # the bound is on the true gradient, not the scaled one
                self._clip()
            self.scaler.step(opt)
            update_ok = self._scaler_found_inf() == 0  # before update() forgets it
            self.scaler.update()
        else:
            if self.clip_grad_norm is not None:
                self._clip()
            # The same device-side skip as the scaler's, with a scale of one: a step whose
            # gradient holds inf/NaN leaves weights and momentum untouched.
            self._found_inf.zero_()
            grads = [p.grad for p in self._params if p.grad is not None]
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, self._one)
            opt.grad_scale, opt.found_inf = None, self._found_inf
            opt.step()
            # A skipped update is counted, and extends the run of bad steps that --max-nonfinite
            # bounds: a non-finite loss always skips, and so does a finite loss whose gradient is
            # not (which would otherwise stop the training silently).
            with torch.no_grad():
                self.metrics[_SKIPPED] += self._found_inf[0]
            _extend_run(self.metrics, self._found_inf[0])
            update_ok = self._found_inf[0] == 0
        opt.zero_grad(set_to_none=True)
        if self._bn_guard:
            # A skipped update leaves the statistics too: also one skipped for a gradient that
            # is not finite after a finite loss, or under DDP for another process's bad batch.
            self._bn_guard.restore_if_bad(self._losses_finite & update_ok)

    def _scaler_found_inf(self) -> torch.Tensor:
        """The GradScaler's verdict on the update it just stepped (> 0: skipped), on the device.
        torch keeps it in a private field until update(); read there, it costs no host sync."""
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        return sum(found.to(self.device) for found in state["found_inf_per_device"].values())

    def _clip(self) -> None:
        """Scale the gradients down to a global L2 norm of ``clip_grad_norm`` where it is larger.

        On the device, with no host sync. A gradient with inf or NaN has a non-finite norm, and
        the scaling leaves NaN in it (inf x 0 or x NaN); the step is then skipped as every step
        with a non-finite gradient is. Under DDP the gradients are already all-reduced, so every
        process clips by the same factor.
        """
        norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        with torch.no_grad():
            # a non-finite norm is a skipped step, not a clipped one
            self.metrics[_CLIPPED] += torch.isfinite(norm) & (norm > self.clip_grad_norm)

    # --------------------------------------------------------------------------------- metrics
    def read_metrics(self, all_reduce: Optional[Callable[..., torch.Tensor]] = None
                     ) -> Dict[str, float]:
        """Means over the steps since the last read (one host sync), then start a new window.

        ``all_reduce(tensor, op)`` (op "sum" or "max") combines the windows of every process, so
        all of them read the same numbers and take the same decisions (a non-finite streak on one
        shard stops every process); steps and correct are then totals over the processes.

        Returns loss, ce, kl, tolerance (means over the finite steps), correct (top-1 hits on the
        training batches of the finite steps), steps, nonfinite (steps in the window with a
        non-finite loss), skipped (steps whose update was skipped on device for a non-finite
        gradient; bf16 and fp32 only, fp16's GradScaler skips on its own), clipped (steps whose
        gradient norm was above ``clip_grad_norm``, and was scaled down), max_nonfinite_run
        (longest run of consecutive bad steps, including one still going on across windows:
        non-finite losses under fp16, skipped updates otherwise). With gradient accumulation a
        "step" of loss, ce, kl, tolerance, correct, steps and nonfinite (and of the fp16 run) is a
        forward pass; skipped and clipped count updates.
        """
        values = (self.metrics if all_reduce is None else self._reduced(all_reduce)).tolist()
        steps = values[_STEPS]
        finite = steps - values[_NONFINITE]
        # A window without a finite step has no mean loss: NaN, not a perfect-looking 0.
        out = dict(**{key: mean_or_nan(values[slot], finite) for key, slot in (
                       ("loss", _LOSS), ("ce", _CE), ("kl", _KL), ("tolerance", _TOL))},
                   steps=int(steps),
                   correct=values[_CORRECT], nonfinite=int(values[_NONFINITE]),
                   skipped=int(values[_SKIPPED]), clipped=int(values[_CLIPPED]),
                   max_nonfinite_run=int(values[_MAX_RUN]))
        with torch.no_grad():
            self.metrics[:_RUN].zero_()
            self.metrics[_MAX_RUN] = self.metrics[_RUN]
        return out

    def state_dict(self) -> Dict[str, object]:
        if self._passes:
            # the gradients of those passes are not part of the state
            raise RuntimeError(f"TrainStep.state_dict() between the {self._passes} accumulated "
                               f"passes of an update and the update: save after the update")
        # "window": the accumulators of the log window in progress (empty at a log line), so
        # that a run stopped between two log lines logs the same rows after its resume; they
        # hold the run of bad steps still going on too
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "window": self.metrics.cpu().clone()}

    def load_state_dict(self, state: Dict[str, object], window_sums: bool = True) -> None:
        """``window_sums``: take the saved log window's sums (a run stopped between two log
        lines); under DDP only one process does, as they are totals over every process (see
        :meth:`gather_window`)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        window = state.get("window")
        if window is None:  # a checkpoint from before windows were kept: the bad-step run only
            self.metrics[_RUN] = state.get("nonfinite_run", 0.0)
            return
        with torch.no_grad():
            self.metrics.copy_(window)
            if not window_sums:
                self.metrics[:_RUN].zero_()

    def _reduced(self, all_reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The window over every process: its sums summed (updates counted once), its longest
        run of bad steps the largest, the run still going on this process's own."""
        m = self.metrics
        # Skipped and clipped count updates, which are decided on the all-reduced gradient: the
        # same on every process, so one process's count (the max: after a window is gathered
        # the others hold 0), not the sum, which would count each update once per process.
        return torch.cat([all_reduce(m[:_SKIPPED].clone(), "sum"),
                          all_reduce(m[_SKIPPED:_RUN].clone(), "max"), m[_RUN:_MAX_RUN],
                          all_reduce(m[_MAX_RUN:].clone(), "max")])

    def gather_window(self, all_reduce: Callable[..., torch.Tensor], keep_sums: bool) -> None:
        """Before a checkpoint written by one process in the middle of a log window: the window
        over every process (:meth:`_reduced`) into this one's accumulator, its sums only where
        ``keep_sums`` (zero elsewhere, so that they count once after the resume)."""
        with torch.no_grad():
            self.metrics.copy_(self._reduced(all_reduce))
            if not keep_sums:
                self.metrics[:_RUN].zero_()


def mean_or_nan(total: float, count: float) -> float:
    """``total / count``; NaN when nothing was counted."""
    return total / count if count else math.nan


@torch.no_grad()
def _accumulate(metrics: torch.Tensor, loss: torch.Tensor, terms, correct: torch.Tensor,
                loss_run: bool) -> None:
    """Add one step to the accumulator, keeping non-finite steps out of the sums; ``loss_run``:
    a non-finite loss extends the run of bad steps (fp16).

    Under no_grad: the accumulator must stay out of autograd. (torch 2.11's compile traces the
    loss terms as requiring grad, and the in-place updates below then broke the step's backward.)
    """
    nonfinite = ~torch.isfinite(loss)
    values = torch.stack([loss, terms.ce.float(), terms.kl.float(), terms.tolerance.float(),
                          correct])
    values = torch.where(nonfinite, torch.zeros_like(values), values)
    metrics[:_STEPS] += values
    metrics[_STEPS] += 1
    nf = nonfinite.to(torch.float32)
    metrics[_NONFINITE] += nf
    if loss_run:
        _extend_run(metrics, nf)


@torch.no_grad()
def _extend_run(metrics: torch.Tensor, bad: torch.Tensor) -> None:
    """One more step in the run of bad steps (``bad`` 1.0), or its end (0.0)."""
    run = (metrics[_RUN] + 1) * bad
    metrics[_RUN] = run
    metrics[_MAX_RUN] = torch.maximum(metrics[_MAX_RUN], run)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader, *, device=None,
             collect: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
             ) -> Dict[str, float]:
    """Top-1 / top-5 error (percent) of ``forward(images) -> logits`` over every batch of
    ``loader``; ``collect(logits, labels)`` sees each batch. ``reduce`` sums the counts
    [3] int64 over processes (each evaluates its shard), so the errors are those of the whole
    split (``device``: where the counts live [default: the logits'; give it when a shard may be
    empty]). One host sync, at the end."""
    # top-1 hits, top-5 hits, images
    counts = None if device is None else torch.zeros(3, dtype=torch.int64, device=device)
    for images, labels in loader:
        logits = forward(images)
        if counts is None:
            counts = torch.zeros(3, dtype=torch.int64, device=logits.device)
        c1, c5 = topk_correct(logits, labels)
        counts[0] += c1
        counts[1] += c5
        counts[2] += labels.shape[0]
        if collect is not None:
            collect(logits, labels)
    if counts is None:
        counts = torch.zeros(3, dtype=torch.int64)
    if reduce is not None:
        counts = reduce(counts)
    c1, c5, count = counts.tolist()
    if count == 0:
        raise ValueError("the evaluation split is empty")
    return {"top1_error": 100.0 * (1 - c1 / count), "top5_error": 100.0 * (1 - c5 / count),
            "samples": count}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 5):
    """Number of rows whose label is the top-1 / among the top-k scores (k clipped to C)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == labels[:, None]
    return hit[:, 0].sum(), hit.any(-1).sum()


class SecondaryMeter:
    """The "secondary information" of the tolerant-teacher paper over an evaluation pass, kept on
    the device (no host sync until read): the summed softmax confidence of the top-1 … top-4
    classes, and the confusion matrix ``second[y, c]`` = number of images of class ``y`` whose
    second-highest score is class ``c`` ([C, C], int64). Call it as ``collect(logits, labels)``."""

    def __init__(self, device, num_classes: Optional[int] = None):
        self.device = torch.device(device)
        # float64: a float32 running sum over 50 000 images moves in the 7th-8th digit with the
        # evaluation batch size (the order of the additions), which --eval-batch-size must not do
        self.total = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.count = 0
        self.ranks = 4  # top-1 .. top-k: fewer where there are fewer than 4 classes
        self.num_classes = num_classes
        self.second: Optional[torch.Tensor] = None
        if num_classes is not None and num_classes >= 2:
            self.second = torch.zeros(num_classes * num_classes, dtype=torch.int64,
                                      device=self.device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=-1)
        k = min(4, probs.shape[-1])
        self.ranks = k
        top = probs.topk(k, dim=-1)
        self.total[:k] += top.values.double().sum(0)
        self.count += labels.shape[0]
        if self.second is not None and k >= 2:
            C = self.num_classes
            keep = (labels >= 0) & (labels < C)
            flat = (labels.long() * C + top.indices[:, 1]).clamp_(0, C * C - 1)
            # index_add_ of 0/1 rather than bincount of flat[keep]: a mask index and a CUDA
            # bincount each wait for the host
            self.second.index_add_(0, flat, keep.long())

    def mean(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
             ) -> "list[float]":
        """Mean confidence of the top-1 … top-4 classes (one host sync), as many as there are
        classes where that is fewer than 4; ``reduce`` sums the totals over processes."""
        total = torch.cat([self.total, torch.tensor([float(self.count)], dtype=torch.float64,
                                                     device=self.device)])
        if reduce is not None:
            total = reduce(total)
        *sums, count = total.tolist()
        return [v / max(count, 1) for v in sums[:self.ranks]]

    def second_confusion(self) -> Optional[torch.Tensor]:
        """``[C, C]`` counts (rows: ground truth, columns: second-highest class), or None."""
        if self.second is None:
            return None
        return self.second.view(self.num_classes, self.num_classes)
