"""Turn pytest-benchmark JSON files into markdown tables with ratios measured in the same run.

    python bench/report.py RESULTS.json [MORE.json ...] > RESULTS.md

One table per benchmark group (one shape and mode), over all the files given; each row is a
provider with its best time, its GB/s or images/s where the benchmark recorded them, and its
speed relative to the group's baseline (the eager reference or the torch DataLoader where there is
one, else the group's slowest entry): the ratio of images/s where both recorded it, else of best
times.
"""

import json
import sys

# (previous_rule: the register path's tile rule before the current one, bench_loss.py)
BASELINES = ("eager_reference", "torch-dataloader", "bl", "per_tensor_loop", "fp32",
             "previous_rule")


def _fmt_time(seconds):
    for unit, scale in (("s", 1), ("ms", 1e3), ("us", 1e6)):
        if seconds * scale >= 1:
            return f"{seconds * scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _provider_rows(benches):
    """``[(label, bench)]``: one row per benchmark, labelled by provider (with the shape where
    two benchmarks of a group share a provider: two files of one session, say)."""
    providers = [b.get("extra_info", {}).get("provider", b["name"]) for b in benches]
    rows = []
    for provider, bench in zip(providers, benches):
        label = provider
        if providers.count(provider) > 1:
            shape = bench.get("extra_info", {}).get("shape")
            label = f"{provider} ({bench['name'] if shape is None else shape})"
        rows.append((label, bench))
    return rows


def _baseline(benches):
    """The group's baseline benchmark and its name: the first of :data:`BASELINES` present,
    else the slowest (named so)."""
    for name in BASELINES:
        for bench in benches:
            if bench.get("extra_info", {}).get("provider") == name:
                return bench, name
    return max(benches, key=lambda b: b["stats"]["min"]), "slowest"


def render(report):
    machine = report.get("machine_info", {})
    lines = [f"# Benchmarks: {report.get('datetime', '')}", "",
             f"machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}",
             ""]
    groups = {}
    for bench in report["benchmarks"]:
        if "provider" not in bench.get("extra_info", {}):
            continue  # cut short (a time box's interrupt): its numbers are not a measurement
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    for group, benches in groups.items():
        devices = [b.get("extra_info", {}).get("device", "?") for b in benches]
        one_device = len(set(devices)) == 1
        lines += [f"## {group}", ""]
        if one_device:
            lines += [f"device: {devices[0]}", ""]
        base, base_name = _baseline(benches)
        base_info = base.get("extra_info", {})
        lines += ["| provider | " + ("" if one_device else "device | ") + "best time | throughput"
                  " | speed vs " + base_name + " |",
                  "|---|---|---|---|" + ("" if one_device else "---|")]
        for (label, bench), device in zip(_provider_rows(benches), devices):
            info = bench.get("extra_info", {})
            throughput = (f"{info['GBps']:.1f} GB/s" if "GBps" in info else
                          f"{info['images_per_s']:.0f} img/s" if "images_per_s" in info else "")
            if "GBps_streamed" in info:
                throughput += f" ({info['GBps_streamed']:.1f} streamed)"
            if info.get("compare") is False:
                ratio = ""  # another kind of thing (the step that consumes the images)
            elif "images_per_s" in info and "images_per_s" in base_info:
                # rounds of different sizes (batch 256 on a GPU, 64 for the DataLoader)
                ratio = f"{info['images_per_s'] / base_info['images_per_s']:.2f}x"
            else:
                ratio = f"{base['stats']['min'] / bench['stats']['min']:.2f}x"
            lines.append(f"| {label} | " + ("" if one_device else f"{device} | ") +
                         f"{_fmt_time(bench['stats']['min'])} | {throughput} | {ratio} |")
        for bench in benches:                 # benchmarks with a ratio of their own
            info = bench.get("extra_info", {})
            if "sd_over_bl" in info:
                lines += ["", f"{info.get('arch')} batch {info.get('batch')}, amp "
                          f"{info.get('amp')}, teacher {info.get('teacher_dtype')}: BL "
                          f"{info['bl_images_per_s']:.0f} img/s, SD {info['sd_images_per_s']:.0f} "
                          f"img/s, SD/BL step time {info['sd_over_bl']:.3f} (target <= "
                          f"{info.get('target_sd_over_bl')})"]
            if "candidate_step_s" in info:  # one step against another (bf16, channels_last)
                settings = ", ".join(f"{k} {info[k]}" for k in ("amp", "teacher_dtype")
                                     if k in info)
                lines += ["", f"{info.get('arch')} batch {info.get('batch')} at "
                          f"{info.get('image')} px, SD step, {settings}: {info['baseline']} "
                          f"{info['baseline_images_per_s']:.1f} img/s, {info['candidate']} "
                          f"{info['candidate_images_per_s']:.1f} img/s: "
                          f"{info['speedup']:.2f}x"]
            if "dali_gpu_over_resnet50" in info:
                lines += ["", f"dali-gpu delivers {info['dali_gpu_over_resnet50']:.2f}x the "
                          f"images/s this ResNet-50 step consumes (above 1: the step, not the "
                          f"input pipeline, sets the pace)"]
            if "scaling_efficiency" in info:  # DDP: per world size
                for world, efficiency in info["scaling_efficiency"].items():
                    lines.append(f"- {world} process(es): "
                                 f"{info['images_per_s_per_gpu'][world]:.1f} img/s per process, "
                                 f"{info['images_per_s_total'][world]:.1f} in all, scaling "
                                 f"efficiency {efficiency:.3f}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/report.py RESULTS.json [MORE.json ...]")
    reports = []
    for path in sys.argv[1:]:
        with open(path) as handle:
            reports.append(json.load(handle))
    # Several files of one session (bench/run_all.sh runs each part on its own) make one report:
    # a group split over files (fastsd and the compiled reference, say) is still one table.
    merged = dict(reports[0], benchmarks=[b for r in reports for b in r["benchmarks"]])
    print(render(merged))
