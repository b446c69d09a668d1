"""``python -m fastsd.report RUN_DIR [RUN_DIR ...] --out DIR``: compare training runs side by side.

Writes ``DIR/report.md`` and the PNG files it shows:

- the error table laid out like the SD paper's (one top-1 and one top-5 row per run, titled by
  method and temperature; columns M#L1 … M#Ln / G#0 … G#n, best, ensemble), made by
  :func:`fastsd.train.results.format_table`, the same code as each run's results.md; and where
  several runs repeat one experiment with other seeds, the same table as mean ± standard
  deviation over them;
- ``lr.png``: the learning rate over iterations (the schedule rebuilt from config.yaml by the
  trainer's own :func:`~fastsd.train.schedule.build_plan`, with the logged values as dots), one
  panel per run, stage starts (snapshots taken, teacher switched) marked;
- ``curves.png``: training loss and its terms (CE, KL, tolerance penalty) and test top-1 error over
  epochs, every run on shared axes;
- ``stage_errors.png``: top-1 error per cycle / generation and of the ensemble, bars per run;
- the secondary-information table of the tolerant-teacher paper (mean softmax confidence of the
  top-1 … top-4 classes over the test set, train and test accuracy) per cycle / generation, and
  ``confusion_<run>.png``: ground-truth class vs second-highest class at the run's last stage;
- for runs whose stages are taught by their own snapshots (SD, and BAN/TT generations):
  teacher-student top-1 agreement and teacher entropy (softmax at T) per stage, table and
  ``teacher.png``.

Train accuracy is the running accuracy over the stage's last epoch on augmented batches, as the
trainer logs it (no extra pass over the training set). Plots need matplotlib
(``pip install 'fastsd[report]'``); the tables need nothing beyond fastsd.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

from fastsd.train.config import AUTO_KEY, RESUME_OVERRIDABLE, TrainConfig
from fastsd.train.errors import TrainError, program_name
from fastsd.train.results import (BEST_CAPTION, METHOD_NAMES, counted, format_table, run_title,
                                  stage_labels, table_columns)

__all__ = ["ReportError", "load_run", "build_report", "main"]

REQUIRED_FILES = ("results.json", "metrics.jsonl", "config.yaml")


class ReportError(TrainError):
    """A run directory the report cannot use;
    the message names the directory and what is missing."""


# ----------------------------------------------------------------------------------- reading runs
def load_run(run_dir: str) -> Dict[str, Any]:
    """Read a run directory: ``{"dir", "name", "results", "config", "metrics", "notes"}``.

    Raises ReportError naming every required file that is missing or unreadable."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir!r} is not a directory; pass fastsd run directories (each "
                          f"holds {', '.join(REQUIRED_FILES)})")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        from fastsd.train.checkpoint import how_to_go_on

        hint = ("the run has not finished (results.json is written at its end): "
                + how_to_go_on(run_dir, "python -m fastsd.train")
                if missing == ["results.json"] else "this is not a complete fastsd run directory")
        raise ReportError(f"{run_dir}: missing {', '.join(missing)}: {hint}")
    try:
        with open(os.path.join(run_dir, "results.json")) as fh:
            results = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{run_dir}: cannot read results.json ({e})") from None
    if not isinstance(results, dict):
        raise ReportError(f"{run_dir}: results.json holds no mapping: not written by "
                          f"fastsd.train")
    for key in ("method", "snapshots", "best"):
        if key not in results:
            raise ReportError(f"{run_dir}: results.json has no {key!r}: "
                              f"not written by fastsd.train")
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml")) as fh:
            config = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"{run_dir}: cannot read config.yaml ({e})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{run_dir}: config.yaml holds no mapping of settings: not written "
                          f"by fastsd.train")
    config.pop(AUTO_KEY, None)  # which settings were auto: not a setting
    metrics = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill
    notes = []
    for entry in results["snapshots"]:
        rel = entry.get("diagnostics")
        entry["_second"] = None
        if rel and os.path.isfile(os.path.join(run_dir, rel)):
            from safetensors.torch import load_file

            entry["_second"] = load_file(os.path.join(run_dir, rel))["second_confusion"]
        elif rel:
            notes.append(f"{run_dir}: {rel} is missing (no confusion matrix for {entry['label']})")
    if results["snapshots"] and all(e["_second"] is None for e in results["snapshots"]) \
            and not notes:
        notes.append(f"{run_dir}: no diagnostics/ files (written by fastsd.train since the "
                     f"report was added): no confusion matrix for this run")
    return dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)), results=results,
                config=config, metrics=metrics, notes=notes)


def load_runs(run_dirs: Sequence[str]) -> List[Dict[str, Any]]:
    """Every run once (a directory given twice, as ``sd`` and ``sd/``, counts once), or one
    ReportError listing every directory's problem. Runs of the same directory name (``a/sd``,
    ``b/sd``) are named by as much of their path as tells them apart."""
    runs, problems, seen = [], [], set()
    for d in run_dirs:
        where = os.path.realpath(d)
        if where in seen:
            continue
        seen.add(where)
        try:
            runs.append(load_run(d))
        except ReportError as e:
            problems.append(str(e))
    if problems:
        raise ReportError("\n".join(problems))
    for run, name in zip(runs, distinct_names([r["dir"] for r in runs])):
        run["name"] = name
    return runs


def distinct_names(paths: Sequence[str]) -> List[str]:
    """The last part of each path, with as many parts before it as make it unique."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        clashing = [i for i, n in enumerate(names)
                    if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def rows(run: Dict[str, Any], kind: str) -> List[Dict[str, Any]]:
    return [r for r in run["metrics"] if r.get("kind") == kind]


def lr_curve(run: Dict[str, Any]):
    """``(iterations, lr)`` of every iteration, rebuilt with the trainer's schedule from
    config.yaml; None when that is not possible (then the plot shows the logged values only)."""
    epochs = [r for r in rows(run, "epoch") if r.get("epoch") and r.get("iteration")]
    if not epochs:
        return None
    ipe = epochs[0]["iteration"] // epochs[0]["epoch"]
    try:
        from fastsd.train.config import TrainConfig, normalise_keys
        from fastsd.train.schedule import build_plan

        # Settings that only matter for where the run trained: neutral values so the config
        # validates on this machine (which may lack the run's GPU or data).
        values = normalise_keys(run["config"], "config.yaml")
        values.update(device="cpu", amp="none", compile=False, dali=False, channels_last=False,
                      teacher_dtype="fp32", resume=None, out=None, threads=None, world_size=1,
                      sync_bn=False)
        plan = build_plan(TrainConfig(**values), ipe)
    except Exception:
        return None
    # At most ~20 000 points (ImageNet runs have ~450 000 iterations), plus both sides of every
    # stage boundary so the restarts stay vertical.
    stride = max(1, plan.total_iters // 20000)
    its = set(range(0, plan.total_iters, stride)) | {plan.total_iters - 1}
    for stage in plan.stages:
        start = plan.stage_bounds(stage)[0]
        its |= {i for i in (start - 1, start) if 0 <= i < plan.total_iters}
    its = sorted(its)
    return its, [plan.lr_at(i) for i in its]


def label_of_slot(run: Dict[str, Any], slot) -> str:
    """The label of the stage whose snapshot is slot ``slot``."""
    stages = rows(run, "stage")
    for s in stages:
        if s.get("stage") == slot:
            return s.get("label", str(slot))
    return str(slot)


def train_accuracy_at(run: Dict[str, Any], epoch: int) -> Optional[float]:
    for r in rows(run, "epoch"):
        if r.get("epoch") == epoch and r.get("train_top1_error") is not None:
            return 100.0 - r["train_top1_error"]
    return None


# ------------------------------------------------------------------------------------- the tables
def _f(v, digits=2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def titles(runs: Sequence[Dict[str, Any]]) -> List[str]:
    return [f"{run_title(r['results'])} [{r['name']}]" for r in runs]


def secondary_table(runs: Sequence[Dict[str, Any]]) -> str:
    lines = ["| run | stage | top-1 conf | top-2 conf | top-3 conf | top-4 conf | train acc (%) "
             "| test acc (%) |", "|---|---|---|---|---|---|---|---|"]
    for run, title in zip(runs, titles(runs)):
        for i, e in enumerate(run["results"]["snapshots"]):
            conf = list(e.get("confidence_top4") or [])
            conf = [_f(c, 4) for c in conf] + [""] * (4 - len(conf))
            lines.append(f"| {title if i == 0 else ''} | {e['label']} | " + " | ".join(conf)
                         + f" | {_f(train_accuracy_at(run, e['epoch']))} | "
                         f"{_f(100.0 - e['top1_error'])} |")
    return "\n".join(lines)


# Settings in which repeats of one experiment may differ: the seed, and where a run ran and how
# it was fed and watched (what --resume may change, the device and the speed settings, how
# often it evaluated, whether it fetched its data set).
REPEAT_FREE_SETTINGS = frozenset(RESUME_OVERRIDABLE) | {
    "seed", "device", "threads", "compile", "compile_mode", "deterministic", "dali",
    "channels_last", "eval_every", "download"}


def repeat_groups(runs: Sequence[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """Groups of two or more runs that repeat one experiment (their config.yaml are equal but for
    :data:`REPEAT_FREE_SETTINGS`), in the order the runs were given; a directory given twice
    counts once, and so does a second run of the same seed (a copy, or the same run again:
    no new draw of the randomness a standard deviation is about)."""
    # A setting added after a run was made is missing from its config.yaml: the run had the
    # setting's default (config.yaml otherwise holds every setting, resolved).
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    groups: Dict[str, List[Dict[str, Any]]] = {}
    seen = set()
    for run in runs:
        where = os.path.realpath(run["dir"])
        if where in seen:
            continue
        seen.add(where)
        experiment = {k: v for k, v in {**defaults, **run["config"]}.items()
                      if k not in REPEAT_FREE_SETTINGS}
        if experiment.get("dataset") == "imagefolder":
            # the folder is the data set itself (a CIFAR folder is one copy of the same data)
            experiment["data"] = run["config"].get("data")
        group = groups.setdefault(json.dumps(experiment, sort_keys=True, default=str), [])
        if all(other["config"].get("seed") != run["config"].get("seed") for other in group):
            group.append(run)
    return [g for g in groups.values() if len(g) > 1]


def _mean_std(values: Sequence[Optional[float]]) -> str:
    """"mean ± sample standard deviation", blank unless every run has the value."""
    if any(v is None for v in values):
        return ""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def repeats_table(groups: Sequence[Sequence[Dict[str, Any]]]) -> str:
    """The error table of :func:`format_table` as mean ± standard deviation over each group."""
    labels = stage_labels([r["results"] for g in groups for r in g])
    header = ["experiment", "runs (seed)", "error (%)"] + labels + ["best", "ensemble"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for group in groups:
        members = ", ".join(f"{r['name']} ({r['config'].get('seed', '?')})" for r in group)
        for i, key in enumerate(("top1_error", "top5_error")):
            columns = zip(*(table_columns(r["results"], labels, key) for r in group))
            cells = [run_title(group[0]["results"]), members] if i == 0 else ["", ""]
            cells += ["top-1" if i == 0 else "top-5"] + [_mean_std(c) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_rows(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Stages with a snapshot teacher: label, teacher label, agreement, teacher entropy."""
    out = []
    for e in run["results"]["snapshots"]:
        if e.get("teacher_agreement") is not None:
            out.append(dict(label=e["label"], agreement=e["teacher_agreement"],
                            entropy=e.get("teacher_entropy")))
    teachers = {r.get("label"): r.get("teacher") for r in rows(run, "stage")}
    for o in out:
        t = teachers.get(o["label"])
        o["teacher"] = label_of_slot(run, t) if isinstance(t, int) else ""
    return out


def teacher_table(runs: Sequence[Dict[str, Any]]) -> Optional[str]:
    lines = ["| run | stage | teacher | top-1 agreement (%) | teacher entropy at T (nats) |",
             "|---|---|---|---|---|"]
    any_rows = False
    for run, title in zip(runs, titles(runs)):
        for i, o in enumerate(teacher_rows(run)):
            any_rows = True
            lines.append(f"| {title if i == 0 else ''} | {o['label']} | {o['teacher']} | "
                         f"{_f(o['agreement'])} | {_f(o['entropy'], 4)} |")
    return "\n".join(lines) if any_rows else None


# -------------------------------------------------------------------------------------- the plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the plots need matplotlib: pip install 'fastsd[report]' (or pip "
                          "install matplotlib), or pass --no-plots for the tables only") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def plot_lr(runs, path, plt) -> None:
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.3 * len(runs) + 0.6), squeeze=False,
                             sharex=True)
    for ax, run, title in zip(axes[:, 0], runs, titles(runs)):
        curve = lr_curve(run)
        if curve:
            ax.plot(curve[0], curve[1], lw=1.2, label="schedule")
        steps = rows(run, "step")
        # A step row's lr is that of the window's last iteration (0-based: iteration - 1).
        ax.plot([r["iteration"] - 1 for r in steps], [r["lr"] for r in steps], ".", ms=4,
                label="logged")
        for s in rows(run, "stage"):
            if s.get("iteration", 0) > 0:
                ax.axvline(s["iteration"], color="grey", ls="--", lw=0.8)
            teacher = s.get("teacher")
            text = s.get("label", "")
            if isinstance(teacher, int):
                text += f"\nteacher {label_of_slot(run, teacher)}"
            elif teacher == "external":
                text += "\nKD teacher"
            ax.annotate(text, (s.get("iteration", 0), 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -3), textcoords="offset points", va="top", fontsize=7)
        snaps = run["results"]["snapshots"]
        if snaps and curve:
            # A snapshot is taken after its stage's last iteration (iteration - 1, 0-based).
            at = dict(zip(*curve))
            xs = [e["iteration"] - 1 for e in snaps if e["iteration"] - 1 in at]
            ax.plot(xs, [at[x] for x in xs], "v", color="C3", label="snapshot")
        ax.set_ylabel("lr")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CURVE_KEYS = (("loss", "training loss"), ("ce", "CE"), ("kl", "KL to the teacher"),
              ("tolerance", "tolerance penalty"), ("train_top1_error", "train top-1 error (%)"),
              ("test_top1_error", "test top-1 error (%)"))


def plot_curves(runs, path, plt) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    axes = axes.ravel()
    for i, (run, title) in enumerate(zip(runs, titles(runs))):
        epochs = rows(run, "epoch")
        for ax, (key, name) in zip(axes, CURVE_KEYS):
            pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i % 10}", label=title)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_stage_errors(runs, path, plt) -> None:
    labels = stage_labels([run["results"] for run in runs]) + ["ensemble"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(runs) / 2)), 4))
    for i, (run, title) in enumerate(zip(runs, titles(runs))):
        by = {e["label"]: e["top1_error"] for e in run["results"]["snapshots"]}
        ens = run["results"].get("ensemble")
        if ens:
            by["ensemble"] = ens["top1_error"]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, label in enumerate(labels)
              if label in by]
        ys = [by[label] for label in labels if label in by]
        ax.bar(xs, ys, width, label=title, color=f"C{i % 10}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("test top-1 error (%)")
    ax.set_title("error per cycle / generation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(run, entry, path, plt) -> None:
    m = entry["_second"].double()
    norm = m / m.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(norm.numpy(), cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the class's test images")
    ax.set_xlabel("second-highest class")
    ax.set_ylabel("ground-truth class")
    ax.set_title(f"{run_title(run['results'])} [{run['name']}], {entry['label']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_teacher(runs, path, plt) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (run, title) in enumerate(zip(runs, titles(runs))):
        tr = teacher_rows(run)
        if not tr:
            continue
        xs = [o["label"] for o in tr]
        a1.plot(xs, [o["agreement"] for o in tr], marker="o", color=f"C{i % 10}", label=title)
        a2.plot(xs, [o["entropy"] for o in tr], marker="o", color=f"C{i % 10}", label=title)
    a1.set_title("teacher-student top-1 agreement (%)", fontsize=9)
    a2.set_title("teacher entropy at T (nats)", fontsize=9)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- the report
def build_report(run_dirs: Sequence[str], out: str, *, plots: bool = True) -> Dict[str, Any]:
    """Write ``out/report.md`` (and the PNGs unless ``plots`` is False); return
    ``{"report": path, "images": [paths], "runs": [loaded runs]}``."""
    runs = load_runs(run_dirs)
    if not runs:
        raise ReportError("no run directories given")
    plt = _pyplot() if plots else None
    os.makedirs(out, exist_ok=True)
    images: List[str] = []

    def image(name, draw, *args):
        path = os.path.join(out, name)
        draw(*args, path, plt)
        images.append(path)
        return name

    md = ["# fastsd report", "", "Runs: " + ", ".join(f"`{r['dir']}`" for r in runs), ""]
    results = [r["results"] for r in runs]
    md += ["## Test error", "",
           "Top-1 and top-5 test error (%) after each cycle (M#L) or generation (G#); "
           f"{BEST_CAPTION}; and the ensemble of the snapshots' softmax outputs (SE/SD: every "
           "cycle; BAN/TT: generations 1..N), as in the tables of the SD paper.", "",
           format_table(results, titles=titles(runs)), ""]
    groups = repeat_groups(runs)
    if groups:
        md += ["Repeated runs: mean ± standard deviation (sample, n − 1) over the runs of one "
               "experiment, whose config.yaml are equal but for the seed and where and how fast "
               "they ran.", "", repeats_table(groups), ""]
    settings = ["| run | method | T | λ_S | λ_T | epochs | cycles / generations | arch | data |",
                "|---|---|---|---|---|---|---|---|---|"]
    for run, res in zip(runs, results):
        shape = res.get("cycle_epochs") or res.get("generations") or ""
        taught = res["method"] in ("sd", "kd", "ban", "tt") and not (
            res["method"] in ("ban", "tt") and not res.get("generations"))
        t, ls, lt = ((res.get("temperature", ""), res.get("lambda_s", ""),
                      res.get("lambda_t", "")) if taught else ("", "", ""))
        settings.append(f"| {run['name']} | {METHOD_NAMES.get(res['method'], res['method'])} | "
                        f"{t} | {ls} | {lt} | {res.get('epochs', '')} | {shape} | "
                        f"{res.get('arch', '')} | {res.get('dataset', '')} |")
    md += settings + [""]
    if plots:
        md += ["## Training", "",
               f"![learning rate]({image('lr.png', plot_lr, runs)})", "",
               "Learning rate over iterations; dashed lines: a stage starts (the previous one's "
               "snapshot is taken, the teacher switches); triangles: snapshots.", "",
               f"![loss terms and test error]({image('curves.png', plot_curves, runs)})", "",
               f"![error per stage]({image('stage_errors.png', plot_stage_errors, runs)})", ""]
    md += ["## Secondary information", "",
           "Mean softmax confidence of the top-1 … top-4 classes over the test set (the "
           "tolerant-teacher paper's table), with train accuracy (running, over the stage's last "
           "epoch on augmented batches) and test accuracy.", "", secondary_table(runs), ""]
    if plots:
        used = set()
        for run in runs:
            last = next((e for e in reversed(run["results"]["snapshots"])
                         if e.get("_second") is not None), None)
            if last is None:
                continue
            name = base = f"confusion_{_safe(run['name'])}"
            n = 1
            while name in used:
                n += 1
                name = f"{base}_{n}"
            used.add(name)
            md += [f"Ground-truth class vs second-highest class, {run_title(run['results'])} "
                   f"[{run['name']}] at {last['label']} (rows normalised):", "",
                   f"![second-class confusion]({image(name + '.png', plot_confusion, run, last)})",
                   ""]
    table = teacher_table(runs)
    if table:
        md += ["## Teachers", "",
               "Stages taught by the run's own snapshot: top-1 agreement of the stage's final "
               "student with its teacher over the test set, and the teacher's mean entropy of "
               "softmax(logits / T).", "", table, ""]
        if plots:
            md += [f"![teacher agreement and entropy]({image('teacher.png', plot_teacher, runs)})",
                   ""]
    notes = [n for r in runs for n in r["notes"]]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    from fastsd.train.checkpoint import atomic_write_text

    report = os.path.join(out, "report.md")
    atomic_write_text(report, "\n".join(md))
    return dict(report=report, images=images, runs=runs)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog=program_name("fastsd.report"),
        description="Compare fastsd training runs: report.md with the SD-paper error table, "
                    "learning-rate / loss / error plots, secondary information (top-1..4 "
                    "confidences, second-class confusion) and SD teacher agreement / entropy.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of fastsd.train")
    p.add_argument("--out", required=True, help="folder for report.md and the PNG files")
    p.add_argument("--no-plots", action="store_true",
                   help="tables only (no matplotlib needed)")
    args = p.parse_args(argv)
    try:
        done = build_report(args.runs, args.out, plots=not args.no_plots)
    except TrainError as e:
        print(f"fastsd.report: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # --out cannot be created or written
        print(f"fastsd.report: error: cannot write {e.filename or args.out} "
              f"({e.strerror or e}): choose an --out folder you can write to", file=sys.stderr)
        return 4
    print(f"report: {done['report']} ({counted(len(done['images']), 'image')}, "
          f"{counted(len(done['runs']), 'run')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
