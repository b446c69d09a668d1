"""Data-parallel scaling of the SD training step: images/s per GPU and scaling efficiency.

    pytest bench/bench_ddp.py --benchmark-only -m gpu      # every visible GPU (needs >= 2)
    python bench/bench_ddp.py [--world-sizes 1,8 --arch resnet50 --batch 256]   # as a script
    python bench/bench_ddp.py --device cpu --arch resnet20 --batch 32 --image 32   # check (gloo)

Each process runs the trainer's own SD step (:class:`fastsd.train.step.TrainStep`: teacher
snapshot forward in fp16, student under bf16 autocast, fused loss, fused SGD) through the same
DistributedDataParallel wrapper the trainer uses (:func:`fastsd.train.distributed.wrap`), on a
fixed synthetic batch per GPU (the input pipeline is measured by bench_data.py). The process
group is joined with NCCL, one process per GPU, as under torchrun. The baseline is the same step
on one GPU measured in the same run (world size 1, no DDP wrapper: what a single-GPU run does);
``scaling_efficiency`` = (images/s per GPU with N GPUs) / (images/s on one GPU). Per-process
batch is fixed (weak scaling), as with ``--batch-size`` per process in the trainer.
"""

import json
import os
import socket
import statistics
import tempfile

import pytest
import torch
from timing import seconds_per_call

GPU_CASE = dict(arch="resnet50", batch=256, image=224, classes=1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, device_type, compile, rounds, steps_per_round, out):
    import torch.distributed as dist

    from fastsd.models import create_model
    from fastsd.train import distributed
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer
    from fastsd.train.teachers import Teachers

    cuda = device_type == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if world > 1:
        distributed.init(device_type, world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = create_model(case["arch"], case["classes"]).to(device, memory_format=fmt)
    train_model = model
    if world > 1:
        model, train_model = distributed.wrap(model, device, sync_bn=False)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          wd_norm_bias=True)
    step = TrainStep(train_model, opt, device=device, amp="bf16" if cuda else "none",
                     num_classes=case["classes"], compile=compile)
    teachers = Teachers(model, 1, "fp16" if cuda else "fp32", device)
    teachers.capture(model, 0)
    step.set_stage(LossSpec(ce_weight=1.5, kd_weight=1.0, temperature=2.0, teacher=0),
                   teachers.forward(0))
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(case["batch"], 3, case["image"], case["image"], generator=g).to(
        device, memory_format=fmt)
    labels = torch.randint(0, case["classes"], (case["batch"],), generator=g).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    for _ in range(max(2, steps_per_round)):  # warm-up: cudnn autotuning, compilation, buckets
        step(images, labels)
    times = []
    for _ in range(rounds):
        times.append(seconds_per_call(lambda: step(images, labels), steps_per_round, sync))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(dict(step_s=statistics.median(times)), fh)
    distributed.shutdown()


def measure(world_sizes, case, *, device_type="cuda", compile=True, rounds=7,
            steps_per_round=10):
    """``{world_size: images/s per process}`` for each world size, and the scaling efficiency
    of each against the first (which should be 1)."""
    import torch.multiprocessing as mp

    per_gpu = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in world_sizes:
            out = os.path.join(tmp, f"{world}.json")
            mp.spawn(_worker, args=(world, _free_port(), case, device_type, compile, rounds,
                                    steps_per_round, out), nprocs=world, join=True)
            with open(out) as fh:
                per_gpu[world] = case["batch"] / json.load(fh)["step_s"]
    base = per_gpu[world_sizes[0]]
    return dict(images_per_s_per_gpu=per_gpu,
                images_per_s_total={w: v * w for w, v in per_gpu.items()},
                scaling_efficiency={w: v / base for w, v in per_gpu.items()})


def _print(case, device, result):
    for w, v in result["images_per_s_per_gpu"].items():
        print(f"{case['arch']} batch {case['batch']}/process on {w} x {device}: {v:.1f} img/s "
              f"per process, {result['images_per_s_total'][w]:.1f} in all, scaling efficiency "
              f"{result['scaling_efficiency'][w]:.3f}")


@pytest.mark.gpu
def test_ddp_scaling_gpu(benchmark):
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"scaling needs at least 2 GPUs ({n} visible)")
    result = benchmark.pedantic(measure, args=([1, n], GPU_CASE), rounds=1, iterations=1)
    benchmark.extra_info.update(dict(
        provider="fastsd.train step (sd) under DDP, NCCL", device=torch.cuda.get_device_name(),
        shape=f"{GPU_CASE['batch']}x3x{GPU_CASE['image']}x{GPU_CASE['image']} per GPU",
        amp="bf16", channels_last=True, compile=True, **GPU_CASE,
        **{k: {str(w): v for w, v in d.items()} for k, d in result.items()}))
    _print(GPU_CASE, torch.cuda.get_device_name(), result)
    assert result["scaling_efficiency"][n] > 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default=None,
                        help="comma-separated, the first is the baseline [default: 1,<GPUs>]")
    parser.add_argument("--arch", default=GPU_CASE["arch"])
    parser.add_argument("--batch", type=int, default=GPU_CASE["batch"])
    parser.add_argument("--image", type=int, default=GPU_CASE["image"])
    parser.add_argument("--classes", type=int, default=GPU_CASE["classes"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=10)
    a = parser.parse_args()
    sizes = ([int(w) for w in a.world_sizes.split(",")] if a.world_sizes else
             [1, max(torch.cuda.device_count(), 1) if a.device == "cuda" else 2])
    case = dict(arch=a.arch, batch=a.batch, image=a.image, classes=a.classes)
    _print(case, a.device, measure(sizes, case, device_type=a.device,
                                   compile=a.device == "cuda" and not a.no_compile,
                                   rounds=a.rounds, steps_per_round=a.steps_per_round))
