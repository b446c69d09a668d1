"""Benchmarks of teacher snapshots: capture time and teacher forward throughput.

    pytest bench/bench_snapshots.py --benchmark-only

Capture: the parameters of ResNet-50 and ResNet-152 (161 and 467 float32 tensors, 25.6 M and
60.2 M elements, shapes from torchvision) converted into one flat float16 buffer by

- ``fastsd``: ``fastsd.ops.snapshot.pack_tensors`` (one kernel launch on CUDA);
- ``per_tensor_loop``: ``[p.to(torch.float16) for p in params]`` (the baseline);
- ``foreach_copy``: ``torch._foreach_copy_`` into float16 views of the flat buffer;
- ``single_tensor_copy``: one ``copy_`` of a float32 tensor of the same total size into the flat
  buffer: the conversion bandwidth a multi-tensor copy can at best reach;
- ``SnapshotStore.capture``: the whole capture of the real torchvision model (parameters and
  buffers, structure checks included).

``extra_info``: provider, shape, device, bytes (float32 read + float16 written), GBps (one call,
then a sync: what a capture costs) and GBps_streamed (calls queued back to back: the device's
bandwidth, host work hidden; the same as GBps on the CPU, where calls are synchronous).

Teacher forward: images/s of the float32 model vs its SnapshotStore teacher: on CUDA ResNet-50 at
224x224 in float16 (and the float32 model under float16 autocast, the usual alternative); on the
CPU the CIFAR ResNet-20 at 32x32 in float16 and bfloat16 (CPUs without native float16 arithmetic
run float16 convolutions slowly; bfloat16 is the CPU choice). All channels_last, eval mode,
no_grad. ``extra_info``: provider, shape, device, images_per_s. bench/report.py turns a JSON run
into ratios against ``per_tensor_loop`` and ``fp32``.
"""

import functools

import pytest
import torch
import torchvision

from devices import device_label
from timing import seconds_per_call
from fastsd import SnapshotStore
from fastsd.ops.snapshot import pack_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 30 if DEVICE == "cuda" else 10
STREAMED_CALLS = 20 if DEVICE == "cuda" else 3


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=2)
def _parameters(arch):
    """float32 tensors shaped like the parameters of torchvision's ``arch``, on DEVICE."""
    with torch.device("meta"):
        shapes = [p.shape for p in getattr(torchvision.models, arch)().parameters()]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(s, device=DEVICE, generator=g) for s in shapes]


def _capture_fn(provider, params, dst):
    if provider == "fastsd":
        return lambda: pack_tensors(params, dst)
    if provider == "per_tensor_loop":
        return lambda: [p.to(torch.float16) for p in params]
    if provider == "foreach_copy":
        views, start = [], 0
        for p in params:
            views.append(dst[start:start + p.numel()].view(p.shape))
            start += p.numel()
        return lambda: torch._foreach_copy_(views, params)
    if provider == "single_tensor_copy":
        flat = torch.randn(dst.numel(), device=DEVICE)
        return lambda: dst.copy_(flat)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", ["fastsd", "per_tensor_loop", "foreach_copy",
                                      "single_tensor_copy", "SnapshotStore.capture"])
@pytest.mark.parametrize("arch", ["resnet50", "resnet152"])
def test_capture(benchmark, arch, provider):
    buffers = []
    if provider == "SnapshotStore.capture":
        model = getattr(torchvision.models, arch)().to(DEVICE, memory_format=torch.channels_last)
        store = SnapshotStore(model, dtype=torch.float16)
        params = list(model.parameters())
        buffers = list(model.buffers())
        # Read: the model's parameters and buffers. Written: the slot as the store lays it out
        # (float16 weights, float32 BatchNorm weights and statistics, integer buffers as they
        # are), counted by the store itself, not by a second copy of its rule.
        report = store.memory_report()
        moved = (sum(t.nbytes for t in params + buffers) + 2 * report["half_elements"]
                 + 4 * report["float32_elements"] + report["exact_bytes"])
        fn = functools.partial(store.capture, model, 0)
    else:
        params = _parameters(arch)
        dst = torch.empty(sum(p.numel() for p in params), dtype=torch.float16, device=DEVICE)
        moved = dst.numel() * (4 + 2)
        fn = _capture_fn(provider, params, dst)
    numel = sum(p.numel() for p in params)

    def run():
        fn()
        _sync()

    benchmark.group = f"capture {arch}"
    run()  # warm-up: allocator, thread pool
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    tensors = f"{len(params)} tensors" + (f" + {len(buffers)} buffers" if buffers else "")
    benchmark.extra_info.update(
        provider=provider, shape=f"{arch}: {tensors}, {numel / 1e6:.1f} M elements",
        device=device_label(DEVICE), threads=torch.get_num_threads(), bytes=moved,
        GBps=moved / benchmark.stats.stats.min / 1e9,
        GBps_streamed=moved / _streamed_seconds(fn) / 1e9)


def _streamed_seconds(fn, calls=STREAMED_CALLS, repeats=3):
    """Seconds per call of ``calls`` calls queued back to back with one sync at the end (best of
    ``repeats``). On a GPU the host's work for a call (the tensor list's conversion, the table)
    then overlaps the previous call's kernel, so this is the bandwidth of the device work, where
    the benchmark's own timing (one call, then a sync) adds each call's host latency."""
    return min(seconds_per_call(fn, calls, _sync) for _ in range(repeats))


def _teacher_case():
    if DEVICE == "cuda":
        model, batch, size, name = torchvision.models.resnet50(), 128, 224, "resnet50"
    else:
        from fastsd.models import create_model
        model, batch, size, name = create_model("resnet20", num_classes=10), 64, 32, "resnet20"
    model = model.to(DEVICE, memory_format=torch.channels_last).eval()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=DEVICE, generator=g)
    return model, x.contiguous(memory_format=torch.channels_last), f"{name} {batch}x3x{size}x{size}"


TEACHER_PROVIDERS = (["fp32", "fp32_autocast_fp16", "teacher_fp16"] if DEVICE == "cuda" else
                     ["fp32", "teacher_fp16", "teacher_bf16"])


@pytest.mark.parametrize("provider", TEACHER_PROVIDERS)
def test_teacher_forward(benchmark, provider):
    model, x, shape = _teacher_case()
    if provider.startswith("teacher_"):
        store = SnapshotStore(model, dtype=getattr(torch, {"fp16": "float16",
                                                           "bf16": "bfloat16"}[provider[8:]]))
        store.capture(model)
        fn = functools.partial(store.logits, x, 0)
    elif provider == "fp32_autocast_fp16":
        def fn():
            with torch.autocast("cuda", dtype=torch.float16):
                return model(x)
    else:
        fn = functools.partial(model, x)

    def run():
        with torch.no_grad():
            fn()
        _sync()

    benchmark.group = f"teacher forward {shape}"
    run()
    benchmark.pedantic(run, rounds=20 if DEVICE == "cuda" else 3, iterations=1,
                       warmup_rounds=2 if DEVICE == "cuda" else 0)
    benchmark.extra_info.update(provider=provider, shape=shape, device=device_label(DEVICE),
                                threads=torch.get_num_threads(),
                                images_per_s=x.shape[0] / benchmark.stats.stats.min)
