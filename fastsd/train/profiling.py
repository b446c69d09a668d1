"""``--profile N``: N training iterations recorded by ``torch.profiler``, for finding where a
step's time goes.

The record starts after :data:`SKIP` iterations, so the first compilation, cuDNN's algorithm
search and the allocator's growth stay out of it, then warms the profiler up for one iteration.
Rank 0 writes into ``<run>/profile/``:

* ``trace.json``: the Chrome trace of the N iterations (chrome://tracing or ui.perfetto.dev), one
  ``ProfilerStep#i`` span per iteration, CPU operators and, on a GPU, the CUDA kernels;
* ``operators.txt``: the operators by self time (device time on a GPU, CPU time otherwise),
  summed over the N iterations.

A span runs from one iteration's end to the next one's: the span of an iteration that follows an
epoch's end also holds that epoch's evaluation and checkpoint (an ImageNet epoch is thousands of
iterations, so the record rarely meets one). A run that ends first records what it has.
"""

import os
from typing import Optional

import torch

from .checkpoint import atomic_write_text

# Iterations before the record starts (the profiler's "wait"), and its warm-up iterations.
SKIP = 5
WARMUP = 1


class StepProfiler:
    """A trainer hook: ``on_step_end(trainer)`` after every iteration; ``close()`` at the end."""

    def __init__(self, run_dir: str, iterations: int, device: torch.device):
        self.folder = os.path.join(run_dir, "profile")
        self.iterations = iterations
        self.cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof: Optional[torch.profiler.profile] = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=SKIP, warmup=WARMUP, active=iterations,
                                             repeat=1),
            on_trace_ready=self._write, record_shapes=True)
        self._prof.start()
        self.steps = 0  # iterations ended since the start
        self.written = False

    def on_step_end(self, trainer) -> None:
        if self._prof is None:
            return
        self.steps += 1
        if trainer.iteration >= trainer.plan.total_iters:
            # The run's last iteration: the record ends with it, so that its span holds the
            # iteration, not the evaluation and the results written after it.
            self.close()
            return
        self._prof.step()
        if self.written:  # the record is complete: the rest of the run is not slowed down
            self.close()

    @property
    def recorded(self) -> int:
        """Whole iterations in the record so far."""
        return min(self.iterations, max(0, self.steps - SKIP - WARMUP))

    def close(self) -> None:
        """Stop the profiler; a run shorter than the record writes what it has (nothing when it
        ended before the record began; a stop's last span also holds its checkpoint)."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def _write(self, prof: torch.profiler.profile) -> None:
        os.makedirs(self.folder, exist_ok=True)
        trace = os.path.join(self.folder, "trace.json")
        tmp = trace + ".tmp"
        prof.export_chrome_trace(tmp)  # a file name, not a stream: renamed once it is whole
        os.replace(tmp, trace)
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        short = (f" (the run ended before the {self.iterations} asked for)"
                 if self.recorded < self.iterations else "")
        atomic_write_text(os.path.join(self.folder, "operators.txt"),
                          f"{self.recorded} training iterations after {SKIP + WARMUP}{short}, "
                          f"by {sort}\n\n{table}\n")
        self.written = True
