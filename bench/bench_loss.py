"""Benchmarks of the fused distillation loss: fastsd vs the eager reference vs torch.compile of it.

    pytest bench/bench_loss.py --benchmark-only

Every case runs the SD loss (cross-entropy + KL to a teacher at T = 3, student temperature 1) on
random logits, forward only or forward + backward, on CUDA when present and otherwise on the CPU.
``extra_info`` holds the provider, shape, dtype, device, nominal GB/s (bytes = logits read + teacher
read, + gradient written for forward+backward: what the loss must move at the least, the same
count for every provider) and, on CUDA, the peak memory beyond the inputs. Every provider skips
the labels' range check (a host sync), as a training loop whose data pipeline checked them does.
Compare providers within a group (one shape, one mode): bench/report.py turns a JSON run into
ratios.
Liger-Kernel's cross-entropy and KL divergence join as a reference point where it is installed.
"""

import functools

import pytest
import torch
import triton
from devices import device_label

from fastsd import distill_loss
from fastsd.ops.distill import cpu_backend
from fastsd.reference import distill_loss_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(128, 100), (256, 1000), (1024, 1000), (4096, 32000),
          pytest.param((8192, 131072), marks=pytest.mark.gpu)]
SD = dict(temperature=3.0, ce_weight=1 + 1 / 3, kd_weight=1.0)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _compiled_reference(shape):
    """One compiled function per shape, for that shape (dynamic=False): the reference's best."""
    return torch.compile(functools.partial(distill_loss_ref, check_labels=False, **SD),
                         dynamic=False)


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    ce, kl = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(logits, target, teacher):
        log_q = torch.log_softmax(logits.float(), -1)
        log_p = torch.log_softmax(teacher.float() / SD["temperature"], -1)
        return SD["ce_weight"] * ce(logits, target) + SD["kd_weight"] * kl(log_q, log_p)
    return loss


def _fastsd_loss(z, y, t):
    # On the CPU the C++ kernel, also where TRITON_INTERPRET=1 is set (tests/conftest.py sets it
    # in a `pytest tests bench` session): the interpreter is a test vehicle, 3000x slower.
    with cpu_backend("native" if z.device.type == "cpu" else "auto"):
        return distill_loss(z, y, t, check_labels=False, **SD)


PROVIDERS = {
    "fastsd": _fastsd_loss,
    "eager_reference": lambda z, y, t: distill_loss_ref(z, y, t, check_labels=False, **SD),
    "compiled_reference": lambda z, y, t: _compiled_reference(tuple(z.shape))(z, y, t),
    "liger": _liger_loss(),
}


def _case(shape, dtype):
    rows, classes = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(rows, classes, device=DEVICE, dtype=dtype, generator=g)
    teacher = torch.randn(rows, classes, device=DEVICE, dtype=dtype, generator=g)
    target = torch.randint(0, classes, (rows,), device=DEVICE, generator=g)
    return logits, target, teacher


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_distill_loss(benchmark, provider, shape, mode):
    loss_fn = PROVIDERS[provider]
    if loss_fn is None:
        pytest.skip(f"{provider} is not installed")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    logits, target, teacher = _case(shape, dtype)
    backward = mode == "forward_backward"
    if backward:
        logits.requires_grad_()

    def run():
        if backward:
            logits.grad = None
            loss_fn(logits, target, teacher).backward()
        else:
            with torch.no_grad():
                loss_fn(logits, target, teacher)
        _sync()

    benchmark.group = f"distill_loss {shape[0]}x{shape[1]} {mode}"
    run()  # warm-up: compilation, autotuning, allocator
    if DEVICE == "cuda":
        logits.grad = None  # run() frees it first: not part of the inputs
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    elements = logits.numel()
    big = elements >= 2**26
    if big:
        benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, iterations=1)
    else:
        benchmark(run)
    moved = elements * logits.element_size() * (3 if backward else 2)
    if provider == "fastsd":  # which of its kernels ran
        benchmark.extra_info["kernel"] = "c++" if DEVICE == "cpu" else "triton"
    benchmark.extra_info.update(
        provider=provider, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
        device=device_label(DEVICE),
        threads=torch.get_num_threads(), bytes=moved,
        GBps=moved / benchmark.stats.stats.min / 1e9)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 1000), (8192, 131072)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_copy_bandwidth(benchmark, shape):
    """The yardstick of the GB/s above: a device-to-device copy of the same bytes."""
    src = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        _sync()

    benchmark.group = f"copy bandwidth {shape[0]}x{shape[1]}"
    run()
    benchmark(run)
    moved = 2 * src.numel() * src.element_size()
    benchmark.extra_info.update(provider="torch copy_", shape=list(shape), bytes=moved,
                                device=torch.cuda.get_device_name(),
                                GBps=moved / benchmark.stats.stats.min / 1e9)


# The register path's tile choice (kernels/distill_loss.py: ELEMENTS_PER_THREAD, ROWS_TILE, set
# from ptxas's register counts, bench/kernel_resources.py) timed against its neighbours, on
# inputs of tens of MB so that bandwidth, not launch latency, shows: the launcher's pick, the same
# tile with half and twice its warps, and the rule the launcher had before 2026-12-03 (up to 4096
# elements per program, 16 per thread), kept here as the baseline.
TILE_SHAPES = [(65536, 100), (16384, 1000), (4096, 8192)]
TILE_VARIANTS = ["launcher", "half_warps", "double_warps", "previous_rule"]
CALLS_PER_ROUND = 10


def _previous_rule(n_rows, n_cols, multiprocessors):
    block_c = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, 4096 // block_c))
    enough = max(1, n_rows // (4 * multiprocessors))
    block_r = min(block_r, 1 << (enough.bit_length() - 1), triton.next_power_of_2(n_rows))
    tile = block_r * block_c
    num_warps = min(16, max(1, tile // 512)) if tile > 2048 else max(1, min(4, tile // 256))
    return block_r, block_c, num_warps


@pytest.mark.gpu
@pytest.mark.parametrize("variant", TILE_VARIANTS)
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_register_path_tiles(benchmark, monkeypatch, shape, variant):
    from fastsd.kernels import distill_loss as K

    rows, classes = shape
    sms = K._multiprocessors(torch.device(DEVICE))
    block_r, block_c, warps = K.register_path_config(rows, classes, sms)
    if variant == "half_warps":
        warps //= 2
    elif variant == "double_warps":
        warps *= 2
    elif variant == "previous_rule":
        block_r, block_c, warps = _previous_rule(rows, classes, sms)
    if not 1 <= warps <= K.MAX_NUM_WARPS:
        pytest.skip(f"{warps} warps: outside 1..{K.MAX_NUM_WARPS}")
    monkeypatch.setattr(K, "register_path_config", lambda *_: (block_r, block_c, warps))
    logits, target, teacher = _case(shape, torch.bfloat16)

    def run():
        for _ in range(CALLS_PER_ROUND):
            K.distill_loss_forward(logits, target, teacher, temperature=SD["temperature"],
                                   student_temperature=1.0, ce_weight=SD["ce_weight"],
                                   kd_scale=SD["kd_weight"], tolerance_weight=0.0, topk=2,
                                   ignore_index=-100, write_grad=True)
        _sync()

    benchmark.group = f"register path tiles {rows}x{classes}"
    run()  # compiles this variant
    benchmark(run)
    moved = 3 * logits.numel() * logits.element_size() * CALLS_PER_ROUND  # z, t read; grad written
    benchmark.extra_info.update(
        provider=variant, shape=list(shape), tile=f"{block_r} x {block_c}", num_warps=warps,
        dtype="bfloat16", device=device_label(DEVICE), bytes=moved,
        GBps=moved / benchmark.stats.stats.min / 1e9)
