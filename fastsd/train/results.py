"""results.json and the error table laid out like the SD paper's (M#L1 … M#Ln, best, ensemble).

``results.json``::

    {"method", "arch", "dataset", "num_classes", "temperature", "lambda_s", "lambda_t",
     "snapshots": [{"index", "label", "epoch", "top1_error", "top5_error", ...}, ...],
     "final": {...}, "best": {...}, "ensemble": {"top1_error", "top5_error", "members"} or null,
     "ensembles": [...], "world_size", "batch_size" (per process and pass), "grad_accum_steps",
     "global_batch_size" (of an update), "sync_bn", "amp" (the autocast the student trained
     and was evaluated under), "wall_time_s"}

Errors are in percent. ``snapshots`` has one entry per cycle (se/sd: index 1..M, label M#L<i>),
per generation (ban/tt: index 0..N, label G#<i>), or one for bl/kd (index 1, label "final").
``epoch`` counts the epochs trained when the entry was taken (global across generations).
``final`` is the last entry, ``best`` the one with the lowest top-1 test error (so chosen on the
test split; ``final`` is the single model chosen without looking at it). ``ensemble`` averages the
softmax outputs of the stored snapshots: every cycle for se/sd, generations 1..N for ban/tt (the
"+Ensemble" rows of the tolerant-teacher paper; ``ensembles`` holds the ones of 1..g for every g
and, for se/sd, of cycles 1..c); null for bl and kd.
"""

from typing import Any, Dict, List, Optional, Sequence

from .config import CYCLIC_METHODS, GENERATION_METHODS

METHOD_NAMES = {"bl": "BL", "se": "SE", "sd": "SD", "kd": "KD", "ban": "BAN", "tt": "TT"}


def counted(n: int, noun: str) -> str:
    """``"1 run"``, ``"3 runs"``: a count with its noun, singular for one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summarise(entries: List[Dict[str, Any]]):
    """``(final, best)`` of a list of snapshot entries."""
    final = dict(entries[-1])
    best = dict(min(entries, key=lambda e: (e["top1_error"], e["top5_error"])))
    return final, best


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def run_title(results: Dict[str, Any]) -> str:
    name = METHOD_NAMES.get(results["method"], results["method"])
    if results["method"] in ("sd", "kd") or (results["method"] in ("ban", "tt")
                                              and len(results["snapshots"]) > 1):
        name += f" (T={results['temperature']:g})"
    return f"{name}, {results['arch']}"


def stage_labels(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The snapshot / generation labels of the runs' results: the columns of a table that shows
    them side by side. Kinds (M#L, G#) in order of first appearance, each in numeric order, so
    that a 2-cycle run listed before a 3-cycle one gives M#L1 M#L2 M#L3, not M#L1 M#L2 G#0 ...
    M#L3."""
    labels: List[str] = []
    for run in runs:
        for entry in run["snapshots"]:
            if entry["label"] not in labels:
                labels.append(entry["label"])
    kinds: Dict[str, int] = {}
    for label in labels:
        kinds.setdefault(label.rstrip("0123456789"), len(kinds))

    def order(label):
        kind = label.rstrip("0123456789")
        number = label[len(kind):]
        return kinds[kind], int(number) if number else -1

    return sorted(labels, key=order)


def table_columns(run: Dict[str, Any], labels: Sequence[str], key: str) -> List[Optional[float]]:
    """``key`` ("top1_error" or "top5_error") of a run under each label, then best and ensemble;
    None where the run has no such column."""
    by_label = {e["label"]: e for e in run["snapshots"]}
    ens = run.get("ensemble")
    return ([by_label[label][key] if label in by_label else None for label in labels]
            + [run["best"][key], ens[key] if ens else None])


def format_table(runs: Sequence[Dict[str, Any]], titles: Optional[Sequence[str]] = None) -> str:
    """A markdown table of one or more runs: a top-1 and a top-5 row per run, one column per
    snapshot / generation label, then best and ensemble (blank where a run has none).
    ``titles``: the first cell of each run's rows [default: :func:`run_title`]."""
    labels = stage_labels(runs)
    header = ["run", "error (%)"] + labels + ["best", "ensemble"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for n, run in enumerate(runs):
        title = titles[n] if titles is not None else run_title(run)
        for i, key in enumerate(("top1_error", "top5_error")):
            cells = [title if i == 0 else "", "top-1" if i == 0 else "top-5"]
            cells += [_fmt(v) for v in table_columns(run, labels, key)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: What the "best" column is, in the captions of every table that shows it.
BEST_CAPTION = ("best: the snapshot with the lowest top-1 error, in both rows (its top-5 error "
                "is not always the lowest), chosen on the test split")


def format_markdown(results: Dict[str, Any]) -> str:
    """results.md: the table, then the settings that produced it."""
    method = results["method"]
    kind = ("generation" if method in GENERATION_METHODS else
            "cycle (mini-generation)" if method in CYCLIC_METHODS else None)
    members = "generations 1..N" if method in GENERATION_METHODS else "every cycle"
    caption = ("Top-1 and top-5 test error in percent of the trained model." if kind is None else
               f"Top-1 and top-5 test error in percent, after each {kind}; {BEST_CAPTION}; and "
               f"the ensemble of the snapshots' softmax outputs ({members}).")
    lines = [f"# {run_title(results)} on {results['dataset']}", "", caption, "",
             format_table([results]), ""]
    ens = results.get("ensembles") or []
    if ens:
        lines += [f"Ensembles average the snapshots as stored ({results.get('teacher_dtype')}); "
                  f"the columns evaluate the student (float32 weights, under the run's "
                  f"autocast: {results.get('amp') or 'not recorded'}) when each was taken.", ""]
    if len(ens) > 1:
        lines += ["Ensembles of the first members:", "",
                  "| members | top-1 | top-5 |", "|---|---|---|"]
        lines += [f"| {', '.join(map(str, e['members']))} | {_fmt(e['top1_error'])} | "
                  f"{_fmt(e['top5_error'])} |" for e in ens]
        lines.append("")
    lines += ["| setting | value |", "|---|---|"]
    for key in ("method", "arch", "dataset", "num_classes", "epochs", "cycle_epochs",
                "generations", "temperature", "student_temperature", "lambda_s", "lambda_t",
                "t2_scaling", "teacher_arch", "teacher_checkpoint", "teacher_dtype", "eta",
                "topk", "world_size", "batch_size",
                "grad_accum_steps", "global_batch_size", "amp", "wall_time_s"):
        if results.get(key) is not None:
            lines.append(f"| {key} | {results[key]} |")
    return "\n".join(lines) + "\n"


def write_results(results: Dict[str, Any], run_dir: str) -> None:
    import os

    from .checkpoint import atomic_write_text, json_text

    atomic_write_text(os.path.join(run_dir, "results.json"), json_text(results) + "\n")
    atomic_write_text(os.path.join(run_dir, "results.md"), format_markdown(results))
