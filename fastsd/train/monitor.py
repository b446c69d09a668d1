"""What a run tells the world while it trains: metrics.jsonl, TensorBoard events, progress.

``metrics.jsonl`` holds one JSON object per line, each with a ``kind``:

- ``"step"``: every ``--log-every`` steps: iteration, epoch, stage, lr, loss, ce, kl, tolerance
  (means over the window's finite steps), train_top1_error (percent, on the augmented batches),
  nonfinite (steps with a non-finite loss in the window), skipped (steps whose update was skipped
  for a non-finite gradient; bf16/fp32), clipped (steps whose gradient norm was above
  ``--clip-grad-norm`` and was scaled down; both count updates, each once however many processes
  share it), images_per_s,
  time (seconds since the run started);
- ``"epoch"``: per epoch: lr (its last), the same training means and counts over the epoch,
  test_top1_error / test_top5_error when evaluated, epoch_time, images_per_s, and on a GPU
  max_memory_gib (the peak of the memory the training step allocated);
- ``"stage"``: at every cycle / generation start: stage, kind, iteration, epoch, teacher (the slot
  teaching it, "external" or null), loss keywords;
- ``"snapshot"``: at every cycle / generation end: index, label, epoch, iteration, test errors,
  mean top-1..top-4 confidences, and the path of its diagnostics file (second-class confusion).

On resume, lines past the checkpoint's iteration are dropped (they belong to the lost tail of the
interrupted run).
"""

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

from .checkpoint import json_text


def silence_stream(stream) -> None:
    """Point ``stream`` (sys.stdout, sys.stderr) at /dev/null: its reader has gone (a closed
    pipe), and every later write, Python's own at exit included, would raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


def print_results(text: str) -> None:
    """``text`` on stdout; a reader gone already (``| head``) loses it, and nothing else: the
    files hold it too."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stream(sys.stdout)


class Monitor:
    """Writes metrics.jsonl and TensorBoard events and shows progress (rank 0 only writes)."""

    def __init__(self, run_dir: str, *, progress: str, tensorboard: bool, enabled: bool = True,
                 console: bool = True, resume_iteration: Optional[int] = None):
        self.enabled = enabled
        self.console = console and enabled
        self.run_dir = run_dir
        self.start = time.perf_counter()
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "plain"
        if progress == "bar":
            try:
                import tqdm  # noqa: F401
            except ImportError:
                progress = "plain"
        self.progress = progress if enabled else "none"
        self._bar = None
        self._writer = None
        if not enabled:
            return
        if resume_iteration is not None:
            self._truncate(resume_iteration)
        # A fresh start in a directory that holds rows (an attempt killed before its first
        # checkpoint) starts the file afresh, and purges that attempt's TensorBoard events.
        self._fh = open(self.path, "a" if resume_iteration is not None else "w", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # A resume drops the events the attempt logged after its checkpoint (the
                # checkpoint's own iteration stays: it is not logged again).
                self._writer = SummaryWriter(
                    os.path.join(run_dir, "tensorboard"),
                    purge_step=0 if resume_iteration is None else resume_iteration + 1)
            except ImportError:
                self._writer = None

    def _truncate(self, iteration: int) -> None:
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the kill
                if row.get("iteration", 0) <= iteration and not (
                        row.get("kind") == "stage" and row.get("iteration", 0) == iteration):
                    keep.append(line if line.endswith("\n") else line + "\n")
        from .checkpoint import atomic_write_text

        atomic_write_text(self.path, "".join(keep))

    # ------------------------------------------------------------------------------------ rows
    def log(self, kind: str, row: Dict[str, Any], *, tb_prefix: Optional[str] = None) -> None:
        """A row of ``kind`` into metrics.jsonl; its numbers into TensorBoard as ``tb_prefix/key``
        where given, all at the row's iteration (one axis for every scalar, and the one a
        resume's purge of a killed attempt's events goes by)."""
        if not self.enabled:
            return
        row = {"kind": kind, **row}
        try:
            # strict JSON: a non-finite loss (the step was skipped) is null
            self._fh.write(json_text(row, indent=None) + "\n")
        except OSError as e:
            from .errors import WriteError

            raise WriteError.of(self.path, e, "the last checkpoint") from e
        if self._writer is not None and tb_prefix is not None:
            step = row.get("iteration")
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value) \
                        and key not in ("iteration", "epoch", "stage", "kind"):
                    self._writer.add_scalar(f"{tb_prefix}/{key}", value, step)

    def message(self, text: str) -> None:
        """A line for the person watching (stderr), above the bar if there is one."""
        if not self.console:
            return
        with self._console_lost_quietly():
            if self._bar is not None:
                self._bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _console_lost_quietly(self):
        """A closed console (``... 2>&1 | head``) ends the messages and the bar, not the run:
        training, metrics.jsonl and the checkpoints go on."""
        try:
            yield
        except BrokenPipeError:
            self.console, self.progress, self._bar = False, "none", None
            silence_stream(sys.stderr)

    # -------------------------------------------------------------------------------- progress
    def epoch_start(self, epoch: int, total_epochs: int, iters: int, initial: int = 0) -> None:
        if self.progress == "bar":
            from tqdm import tqdm

            with self._console_lost_quietly():
                self._bar = tqdm(total=iters, initial=initial,
                                 desc=f"epoch {epoch + 1}/{total_epochs}", unit="it",
                                 dynamic_ncols=True, leave=False, file=sys.stderr)

    def advance(self, n: int, postfix: Optional[Dict[str, Any]] = None) -> None:
        if self._bar is not None:
            with self._console_lost_quietly():
                self._bar.update(n)
                if postfix:
                    self._bar.set_postfix(postfix, refresh=False)

    def epoch_end(self) -> None:
        if self._bar is not None:
            with self._console_lost_quietly():
                self._bar.close()
            self._bar = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self.epoch_end()
        if not self.enabled:
            return
        self._fh.close()
        if self._writer is not None:
            self._writer.close()
