"""Several processes, one run: PyTorch's own engine (torchrun + DistributedDataParallel).

``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m fastsd.train ...`` sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init` joins
the process group from them (NCCL on CUDA, gloo on the CPU). A single process never touches
``torch.distributed``.

What the trainer relies on (DESIGN.md, issue 6):

- every process starts from the same weights (seeded), sees the same all-reduced gradient and so
  holds the same weights after each step: teacher snapshots are captured from identical weights
  at the same iteration, with no broadcast;
- BatchNorm running statistics are the exception (each process normalises its own shard); DDP
  broadcasts rank 0's at the start of every forward, and :func:`broadcast_buffers` does the same
  before a snapshot or an evaluation, so those see rank 0's statistics, exactly as the next step
  would: the trajectory, and a resume from any checkpoint, are unchanged by it;
- only rank 0 writes files; collective decisions (stop, non-finite loss, bad weights) are taken
  on all-reduced values, so no process leaves the others waiting in a collective.
"""

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import SetupError

# A stop request (SIGTERM/SIGINT) is agreed on every this many steps: one tiny all-reduce on the
# CPU (gloo), which does not wait for the GPU; the latency it adds (a few steps) is far below the
# grace period schedulers give before SIGKILL (30 s for Slurm and Kubernetes).
STOP_CHECK_EVERY = 10


def launched_world_size() -> int:
    """Processes of this launch: torchrun's ``WORLD_SIZE``, 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str, world_size: int) -> None:
    """Join the process group of a torchrun launch (no-op for one process or when already in one).

    ``device``: the configured device (``cuda`` or ``cpu``); on CUDA each process takes the GPU
    of its ``LOCAL_RANK``.
    """
    if world_size == 1 or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SetupError(f"--world-size {world_size}: {', '.join(missing)} not set; launch with "
                         f"torchrun --standalone --nproc-per-node N -m fastsd.train ...")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise SetupError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                             f"are visible: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")


def shutdown(synchronize: bool = True) -> None:
    """Leave the process group. ``synchronize``: wait for every process first (an end the
    processes agreed on), so that none tears its connections down while another still uses them
    (gloo then aborts the late process); after an error that may be one process's own, a barrier
    could wait for a peer that never comes, so do not."""
    if not dist.is_initialized():
        return
    if synchronize:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer is gone: leave anyway
            pass
    dist.destroy_process_group()


def rank_and_size() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: str, world_size: int) -> torch.device:
    """This process's device: ``cuda`` means the GPU of ``LOCAL_RANK`` when there are several,
    else the current GPU. Always with its index: tensors carry one (``cuda:0``), and
    ``torch.device("cuda") != torch.device("cuda", 0)``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else \
            torch.cuda.current_device()
        return torch.device("cuda", index)
    return dev


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> Tuple[nn.Module, nn.Module]:
    """``model`` (converted to SyncBatchNorm in place of its BatchNorms when asked) and the
    DistributedDataParallel wrapper that trains it. The plain module stays the trainer's model
    (checkpoints, snapshots, evaluation); only the training step calls the wrapper, so evaluation
    on shards of unequal length issues no collective."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over every process; ``op``: sum or max."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every process: one broadcast per dtype."""
    by_dtype = {}
    for b in model.buffers():
        if b.numel():
            by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(group)
        dist.broadcast(flat, 0)
        for b, v in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
            b.copy_(v)


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


class StopFlag:
    """Agreement on a stop request without a GPU sync: a CPU all-reduce (MAX of the signal
    number) on a gloo group, every :data:`STOP_CHECK_EVERY` steps, the same steps everywhere."""

    def __init__(self):
        # NCCL runs collectives on GPU tensors (reading the result would wait for the GPU's
        # queue); a gloo group over the same rendezvous reduces a CPU tensor on the host.
        self.group = (dist.new_group(backend="gloo") if dist.get_backend() != "gloo"
                      else dist.group.WORLD)

    def agree(self, signum: Optional[int]) -> Optional[int]:
        flag = torch.tensor([signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag) or None
