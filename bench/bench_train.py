"""Training-step throughput of SD against BL on the same model and batch: what a teacher costs.

    pytest bench/bench_train.py --benchmark-only           # CPU: resnet20, batch 128 (and
                                                           # bf16 autocast against float32,
                                                           # channels_last against NCHW)
    pytest bench/bench_train.py --benchmark-only -m gpu    # GPU: resnet50 / resnet152,
                                                           # bf16 AMP, channels_last, compiled
    python bench/bench_train.py [--arch resnet20 --batch 128 --rounds 7]   # the same, as a script

Both providers run the trainer's own step (:class:`fastsd.train.step.TrainStep`: fused loss,
fused SGD with the device-side non-finite skip, metric accumulation); SD adds its teacher, a
snapshot of the student in the :class:`~fastsd.SnapshotStore` run in the teacher precision the
trainer picks for the device (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), on the
same batch, under no grad. BL and SD steps are timed in alternating rounds (the CPU here is
shared: interleaving keeps a load change from landing on one side only) and the ratio of the
median step times is reported as ``sd_over_bl``, with images/s of both, in ``extra_info``.
GPU cases use batch 256 for ResNet-50 and 128 for ResNet-152.

Targets (issue 4): SD/BL step time <= 1.20 on a GPU, <= 1.28 on the 2-core CPU of the project.
"""

import statistics

import pytest
import torch
from devices import device_label
from timing import seconds_per_call

CPU_CASE = dict(arch="resnet20", batch=128, image=32, classes=100)
GPU_CASES = [dict(arch="resnet50", batch=256, image=224, classes=1000),
             dict(arch="resnet152", batch=128, image=224, classes=1000)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_steps(arch, batch, image, classes, device, *, amp="none", channels_last=False,
                compile=False, teacher_dtype=None):
    """Two trainer steps on identical copies of one model: (bl_step, sd_step, images, labels)."""
    from fastsd.models import create_model
    from fastsd.train.config import _cpu_has_bf16
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer
    from fastsd.train.teachers import Teachers

    device = torch.device(device)
    if teacher_dtype is None:
        teacher_dtype = "fp16" if device.type == "cuda" else ("bf16" if _cpu_has_bf16() else "fp32")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=g).to(device, memory_format=fmt)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    steps = {}
    for method in ("bl", "sd"):
        torch.manual_seed(0)
        model = create_model(arch, classes).to(device, memory_format=fmt)
        opt = build_optimizer(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                              wd_norm_bias=True)
        step = TrainStep(model, opt, device=device, amp=amp, num_classes=classes,
                         compile=compile)
        if method == "bl":
            step.set_stage(LossSpec(ce_weight=1.0), None)
        else:
            teachers = Teachers(model, 1, teacher_dtype, device)
            teachers.capture(model, 0)
            step._bench_teachers = teachers  # keep the store alive
            step.set_stage(LossSpec(ce_weight=1.5, kd_weight=1.0, temperature=2.0, teacher=0),
                           teachers.forward(0))
        steps[method] = step
    return steps["bl"], steps["sd"], images, labels, teacher_dtype


def alternate(steps, images, labels, *, rounds=7, steps_per_round=3, warmup=2):
    """Median seconds per step of each of ``steps`` (name -> step), timed in alternating rounds
    (the order reversed every round)."""
    device = images.device
    for _ in range(warmup):
        for step in steps.values():
            step(images, labels)
    _sync(device)
    times = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps.items()) if r % 2 == 0 else list(steps.items())[::-1]
        for name, step in order:
            times[name].append(seconds_per_call(lambda: step(images, labels), steps_per_round,
                                                lambda: _sync(device)))
    return {name: statistics.median(t) for name, t in times.items()}


def measure(bl, sd, images, labels, **kwargs):
    """BL against SD: step times, images/s and their ratio."""
    t = alternate({"bl": bl, "sd": sd}, images, labels, **kwargs)
    batch = images.shape[0]
    return dict(bl_step_s=t["bl"], sd_step_s=t["sd"], bl_images_per_s=batch / t["bl"],
                sd_images_per_s=batch / t["sd"], sd_over_bl=t["sd"] / t["bl"])


def _report(benchmark, case, device, settings, result, target):
    benchmark.extra_info.update(dict(provider="fastsd.train step (bl vs sd)",
                                     device=device_label(device),
                                     shape=f"{case['batch']}x3x{case['image']}x{case['image']}",
                                     **case, **settings, **result, target_sd_over_bl=target))
    print(f"\n{case['arch']} batch {case['batch']} on {device} {settings}: "
          f"BL {result['bl_images_per_s']:.1f} img/s, SD {result['sd_images_per_s']:.1f} img/s, "
          f"SD/BL step time {result['sd_over_bl']:.3f} (target <= {target})")


def _needs_native_bf16(amp):
    from fastsd.train.config import _cpu_has_bf16

    if amp == "bf16" and not _cpu_has_bf16():
        pytest.skip("this CPU emulates bf16: the trainer's default there is float32")


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_sd_over_bl_cpu(benchmark, amp):
    _needs_native_bf16(amp)
    device = torch.device("cpu")
    bl, sd, images, labels, tdtype = build_steps(**CPU_CASE, device=device, amp=amp,
                                                 channels_last=True)
    result = benchmark.pedantic(measure, args=(bl, sd, images, labels), rounds=1,
                                iterations=1)
    _report(benchmark, CPU_CASE, device, dict(amp=amp, channels_last=True, teacher_dtype=tdtype,
                                              threads=torch.get_num_threads()), result, 1.28)


CPU_AMP_CASES = [CPU_CASE, dict(arch="resnet50", batch=32, image=96, classes=100)]


def _candidate_over_baseline(benchmark, case, what, baseline, candidate, **info):
    """Two SD steps of ``case`` on the CPU, timed in alternating rounds; ``baseline`` and
    ``candidate`` are (label, step, images, labels), each step fed its own batch. Reports the
    images/s of both and the candidate's speedup."""
    (base_label, base_step, base_x, base_y), (label, step, x, y) = baseline, candidate
    steps = {base_label: lambda *_: base_step(base_x, base_y), label: lambda *_: step(x, y)}
    t = benchmark.pedantic(alternate, args=(steps, x, y), kwargs=dict(rounds=5), rounds=1,
                           iterations=1)
    batch = case["batch"]
    result = dict(baseline=base_label, candidate=label, baseline_step_s=t[base_label],
                  candidate_step_s=t[label], baseline_images_per_s=batch / t[base_label],
                  candidate_images_per_s=batch / t[label], speedup=t[base_label] / t[label])
    benchmark.extra_info.update(dict(provider=f"fastsd.train sd step, {what}", device="cpu",
                                     shape=f"{batch}x3x{case['image']}x{case['image']}",
                                     threads=torch.get_num_threads(), **case, **info, **result))
    print(f"\n{case['arch']} batch {batch} at {case['image']} px on the CPU {info}: {base_label} "
          f"{result['baseline_images_per_s']:.1f} img/s, {label} "
          f"{result['candidate_images_per_s']:.1f} img/s, {result['speedup']:.2f}x")


@pytest.mark.parametrize("case", CPU_AMP_CASES, ids=[c["arch"] for c in CPU_AMP_CASES])
def test_bf16_autocast_over_float32_cpu(benchmark, case):
    """The SD step under bf16 autocast (--amp auto on a CPU that runs bf16 natively) against the
    float32 step (--amp none), the same bf16 teacher in both, channels_last."""
    _needs_native_bf16("bf16")
    _, fp32, x, y, tdtype = build_steps(**case, device="cpu", amp="none", channels_last=True)
    _, bf16, _, _, _ = build_steps(**case, device="cpu", amp="bf16", channels_last=True)
    _candidate_over_baseline(benchmark, case, "--amp bf16 vs none", ("float32", fp32, x, y),
                             ("bf16 autocast", bf16, x, y), teacher_dtype=tdtype)


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("case", CPU_AMP_CASES, ids=[c["arch"] for c in CPU_AMP_CASES])
def test_channels_last_over_nchw_cpu(benchmark, case, amp):
    """The SD step in channels_last (the trainer's default) against the same step in NCHW."""
    _needs_native_bf16(amp)
    _, nchw, x, y, tdtype = build_steps(**case, device="cpu", amp=amp)
    _, nhwc, x_cl, y_cl, _ = build_steps(**case, device="cpu", amp=amp, channels_last=True)
    _candidate_over_baseline(benchmark, case, "channels_last vs NCHW", ("NCHW", nchw, x, y),
                             ("channels_last", nhwc, x_cl, y_cl), amp=amp, teacher_dtype=tdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c["arch"] for c in GPU_CASES])
def test_sd_over_bl_gpu(benchmark, case):
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    bl, sd, images, labels, tdtype = build_steps(**case, device=device, amp="bf16",
                                                 channels_last=True, compile=True)
    result = benchmark.pedantic(measure, args=(bl, sd, images, labels),
                                kwargs=dict(rounds=9, steps_per_round=10, warmup=5),
                                rounds=1, iterations=1)
    _report(benchmark, case, device, dict(amp="bf16", channels_last=True, compile=True,
                                          teacher_dtype=tdtype), result, 1.20)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=CPU_CASE["arch"])
    parser.add_argument("--batch", type=int, default=CPU_CASE["batch"])
    parser.add_argument("--image", type=int, default=CPU_CASE["image"])
    parser.add_argument("--classes", type=int, default=CPU_CASE["classes"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--teacher-dtype", default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=3)
    a = parser.parse_args()
    bl, sd, images, labels, tdtype = build_steps(
        a.arch, a.batch, a.image, a.classes, a.device, amp=a.amp, channels_last=a.channels_last,
        compile=a.compile, teacher_dtype=a.teacher_dtype)
    r = measure(bl, sd, images, labels, rounds=a.rounds, steps_per_round=a.steps_per_round)
    print(f"{a.arch} batch {a.batch} on {a.device} (teacher {tdtype}): BL "
          f"{r['bl_images_per_s']:.1f} img/s, SD {r['sd_images_per_s']:.1f} img/s, SD/BL step "
          f"time {r['sd_over_bl']:.3f}")
