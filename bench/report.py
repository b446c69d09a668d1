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

BASELINES = ("eager_reference", "torch-dataloader", "bl", "per_tensor_loop", "fp32")


def _fmt_time(seconds):
    for unit, scale in (("s", 1), ("ms", 1e3), ("us", 1e6)):
        if seconds * scale >= 1:
            return f"{seconds * scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def render(report):
    machine = report.get("machine_info", {})
    lines = [f"# Benchmarks: {report.get('datetime', '')}", "",
             f"machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}",
             ""]
    groups = {}
    for bench in report["benchmarks"]:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    for group, benches in groups.items():
        info0 = benches[0].get("extra_info", {})
        lines += [f"## {group}", "", f"device: {info0.get('device', '?')}", ""]
        by_provider = {b.get("extra_info", {}).get("provider", b["name"]): b for b in benches}
        base_name = next((p for p in BASELINES if p in by_provider), None)
        base = by_provider[base_name] if base_name else max(benches,
                                                           key=lambda b: b["stats"]["min"])
        lines += ["| provider | best time | throughput | speed vs " +
                  (base_name or "slowest") + " |", "|---|---|---|---|"]
        for provider, bench in by_provider.items():
            info = bench.get("extra_info", {})
            throughput = (f"{info['GBps']:.1f} GB/s" if "GBps" in info else
                          f"{info['images_per_s']:.0f} img/s" if "images_per_s" in info else "")
            if "GBps_streamed" in info:
                throughput += f" ({info['GBps_streamed']:.1f} streamed)"
            base_info = base.get("extra_info", {})
            if "images_per_s" in info and "images_per_s" in base_info:
                # rounds of different sizes (batch 256 on a GPU, 64 for the DataLoader)
                ratio = info["images_per_s"] / base_info["images_per_s"]
            else:
                ratio = base["stats"]["min"] / bench["stats"]["min"]
            lines.append(f"| {provider} | {_fmt_time(bench['stats']['min'])} | {throughput} | "
                         f"{ratio:.2f}x |")
        for bench in benches:                 # the training-step benchmark: its own ratio
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
