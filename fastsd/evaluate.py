"""``python -m fastsd.evaluate``: evaluate a saved model, a snapshot, or an ensemble of snapshots.

Examples::

    python -m fastsd.evaluate --checkpoint runs/sd-resnet20                # the final model
    python -m fastsd.evaluate --checkpoint runs/sd-resnet20 --snapshots all  # every snapshot
    python -m fastsd.evaluate --checkpoint runs/sd-resnet20 --snapshots 2 3  # M#L2, M#L3, ensemble
    python -m fastsd.evaluate --checkpoint model.safetensors --arch resnet56 \\
        --dataset cifar100 --data ~/data

It prints the numbers a run reports (:mod:`fastsd.train.results`): top-1 / top-5 error of every
model and of the ensemble (the mean of their softmax outputs), and the secondary information of
:mod:`fastsd.report`: the mean confidence of the top-1 … top-4 classes, the top-1 agreement of each
model with the one before it and the entropy of its softmax at temperature T (what it would give
as a teacher). The data set, folder and image size default to the run's config.yaml.

Snapshots are evaluated from ``snapshots/*.safetensors`` the way the trainer evaluates its
student: in the run's mixed precision (``--amp``) and memory format (``--channels-last``), so on
the same device their errors equal the ``top1_error`` / ``top5_error`` columns of results.json.
The trainer's ensembles use the snapshots as stored (half precision), so their last digits may
differ. Weights outside a run directory are evaluated in float32 unless ``--amp`` says otherwise.
"""

import argparse
import glob
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastsd.train.config import (auto_image_size, auto_workers, check_device, in_run_ensemble,
                                 parse_list)
from fastsd.train.errors import SetupError, TrainError, program_name

__all__ = ["evaluate_models", "resolve_models", "main"]

EVAL_AMP_MODES = ("bf16", "fp16", "none")


# ------------------------------------------------------------------------------------ the numbers
@torch.no_grad()
def evaluate_models(forwards: Sequence[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]],
                    loader, *, num_classes: int, temperature: float = 1.0,
                    device="cpu", ensemble_of: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Evaluate each ``(label, forward)`` over ``loader`` (one pass each) and their ensemble.

    ``forward(images) -> logits [B, C]``. Returns ``{"models": [...], "ensemble": {...} or None}``;
    each model entry: label, top1_error, top5_error (percent), confidence_top4, entropy_T (mean
    entropy in nats of softmax(logits / T)), agreement_prev (percent of test images whose top-1
    class equals the previous model's; absent for the first), second_confusion ([C, C] tensor).
    The ensemble (of two or more models) averages the softmax outputs of the models at the
    indices ``ensemble_of`` (default: all; BAN/TT runs leave generation 0 out, as the trainer does).
    """
    from fastsd.train.step import SecondaryMeter, evaluate, topk_correct

    members = list(range(len(forwards))) if ensemble_of is None else sorted(ensemble_of)
    results, prev_top = [], None
    sums: List[torch.Tensor] = []
    labels_all: List[torch.Tensor] = []
    for m, (label, forward) in enumerate(forwards):
        meter = SecondaryMeter(device, num_classes)
        state = dict(b=0, agree=0, entropy=0.0)
        top_now: List[torch.Tensor] = []

        def collect(logits, labels, m=m, state=state, top_now=top_now):
            logits = logits.float()
            meter(logits, labels)
            top = logits.argmax(-1)
            top_now.append(top)
            b = state["b"]
            # summed on the device (0 becomes a tensor): read once, after the pass
            if prev_top is not None:
                state["agree"] = state["agree"] + (top == prev_top[b]).sum()
            log_p = torch.log_softmax(logits / temperature, dim=-1)
            state["entropy"] = state["entropy"] - (log_p.exp() * log_p).sum(dtype=torch.float64)
            probs = torch.softmax(logits, dim=-1)
            if m == 0:
                labels_all.append(labels)
            if members and m == members[0]:
                sums.append(probs)
            elif m in members:
                sums[b] = sums[b] + probs
            state["b"] = b + 1

        out = evaluate(forward, loader, collect=collect)
        n = out["samples"]
        entry = dict(label=label, top1_error=out["top1_error"], top5_error=out["top5_error"],
                     confidence_top4=meter.mean(), entropy_T=float(state["entropy"]) / n,
                     second_confusion=meter.second_confusion(), samples=n)
        if prev_top is not None:
            entry["agreement_prev"] = 100.0 * float(state["agree"]) / n
        results.append(entry)
        prev_top = top_now
    ensemble = None
    if len(forwards) > 1 and members:
        c1 = c5 = 0
        n = 0
        for probs, y in zip(sums, labels_all):
            k1, k5 = topk_correct(probs, y)
            c1, c5, n = c1 + int(k1), c5 + int(k5), n + y.shape[0]
        ensemble = dict(members=[forwards[i][0] for i in members],
                        top1_error=100.0 * (1 - c1 / n), top5_error=100.0 * (1 - c5 / n))
    return dict(models=results, ensemble=ensemble)


# ----------------------------------------------------------------------------- finding the files
def _run_dir_of(path: str) -> Optional[str]:
    """The run directory a path belongs to (the folder holding config.yaml), if any."""
    path = os.path.abspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for _ in range(3):
        if os.path.isfile(os.path.join(folder, "config.yaml")):
            return folder
        folder = os.path.dirname(folder)
    return None


def _snapshot_files(run_dir: str) -> List[str]:
    """The run's snapshot files, in order: those its config.yaml's method and cycles or
    generations make (a file of an earlier run in the same folder is no member)."""
    from fastsd.train.loop import snapshot_file_names

    cfg = _run_config(run_dir)
    if cfg.get("method"):
        stems = snapshot_file_names(cfg["method"], int(cfg.get("cycles") or 1),
                                    int(cfg.get("generations") or 0))
        paths = [os.path.join(run_dir, "snapshots", f"{stem}.safetensors") for stem in stems]
        return [p for p in paths if os.path.isfile(p)]

    def key(p):
        m = re.search(r"(\d+)", os.path.basename(p))
        return int(m.group(1)) if m else -1

    return sorted(glob.glob(os.path.join(run_dir, "snapshots", "*.safetensors")), key=key)


def resolve_models(checkpoint: str, snapshots: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """``[(label, file)]`` to evaluate. ``snapshots``: None (the checkpoint's model), ``all``, or
    items each a path, a file stem (``cycle2``, ``gen1``), a label (``M#L2``, ``G#1``) or a number
    (the cycle for se/sd runs, the generation for ban/tt)."""
    from fastsd.train.checkpoint import find_model_file

    if not os.path.exists(checkpoint):
        raise SetupError(f"--checkpoint: {checkpoint!r} does not exist; give a run directory, "
                         f"its model.safetensors, a snapshot file or checkpoints/last.pt")
    run_dir = _run_dir_of(checkpoint)
    if not snapshots:
        file = (find_model_file(checkpoint, "--checkpoint") if os.path.isdir(checkpoint)
                else checkpoint)
        return [(_label_of(file), file)]
    if run_dir is None and any(not os.path.isfile(s) for s in snapshots):
        raise SetupError(f"--snapshots: {checkpoint!r} is not inside a run directory (no "
                         f"config.yaml next to it), so give the snapshot files as paths")
    available = _snapshot_files(run_dir) if run_dir else []
    if list(snapshots) == ["all"]:
        if not available:
            raise SetupError(f"--snapshots all: {run_dir}/snapshots holds no .safetensors files "
                             f"(bl and kd runs keep no snapshots; evaluate model.safetensors)")
        return [(_label_of(f), f) for f in available]
    out = []
    for item in snapshots:
        if os.path.isfile(item):
            out.append((_label_of(item), item))
            continue
        match = [f for f in available
                 if item in (os.path.splitext(os.path.basename(f))[0], _label_of(f))
                 or (item.isdigit() and _snapshot_number(f) == item)]
        if not match:
            names = ", ".join(f"{os.path.splitext(os.path.basename(f))[0]} ({_label_of(f)})"
                              for f in available) or "none"
            raise SetupError(f"--snapshots: no snapshot {item!r} in {run_dir}/snapshots; "
                             f"there are: {names}")
        out.append((_label_of(match[0]), match[0]))
    files = [os.path.realpath(f) for _, f in out]
    twice = next((item for i, (item, f) in enumerate(zip(snapshots, files))
                  if f in files[:i]), None)
    if twice is not None:
        raise SetupError(f"--snapshots: {twice!r} names a model given already: each model once "
                         f"(an ensemble would count it twice)")
    # a file of another run keeps its label but says where it is from: two columns "M#L1"
    # would be two different models under one name
    own = os.path.realpath(run_dir) if run_dir else None

    def of_another_run(path):
        folder = _run_dir_of(path)
        return own is not None and folder is not None and os.path.realpath(folder) != own

    return [(f"{label} ({f})" if of_another_run(f) else label, f) for label, f in out]


def _snapshot_number(path: str) -> Optional[str]:
    """The digits a snapshot file's name ends in (its cycle or generation: cycle2, gen0), or
    None."""
    match = re.search(r"(\d+)$", os.path.splitext(os.path.basename(path))[0])
    return match.group(1) if match else None


def _label_of(path: str) -> str:
    """The results-table label of a weights file: from its metadata, else its file name."""
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as fh:
                label = (fh.metadata() or {}).get("label")
            if label:
                return label
        except Exception:
            pass
    return os.path.splitext(os.path.basename(path))[0]


def load_model(path: str, arch: Optional[str], num_classes: Optional[int], device, *,
               fallback_arch: Optional[str] = None, fallback_classes: Optional[int] = None):
    """``(model in eval mode, arch, num_classes)`` from a weights file: ``arch`` /
    ``num_classes`` where given, else what the file records, else the fallbacks."""
    from fastsd.models import create_model
    from fastsd.train.checkpoint import load_into, read_model_file

    state, meta = read_model_file(path, "--checkpoint")
    arch = arch or meta.get("arch") or fallback_arch
    num_classes = (num_classes or (int(meta["num_classes"]) if meta.get("num_classes") else None)
                   or fallback_classes)
    if arch is None or num_classes is None:
        raise SetupError(f"{path} does not record its architecture / number of classes; pass "
                         f"--arch and --num-classes")
    model = create_model(arch, num_classes)
    try:
        load_into(model, state)
    except ValueError as e:
        raise SetupError(f"{path} does not fit a {arch} with {num_classes} classes ({e}); check "
                         f"--arch and --num-classes") from None
    return model.to(device).eval(), arch, num_classes


# --------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("fastsd.evaluate"),
        description="Evaluate a saved fastsd model, a snapshot, or an ensemble of snapshots on a "
                    "test split; print top-1/top-5 error, the ensemble's, and the secondary "
                    "information (top-1..4 confidences, agreement, entropy).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::")[1].split("It prints")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its model.safetensors), a .safetensors file, a fastsd "
                        "checkpoint (checkpoints/last.pt) or a state_dict file")
    p.add_argument("--snapshots", nargs="+", metavar="SNAPSHOT",
                   help="evaluate these snapshots of the run and their ensemble: 'all', numbers "
                        "(cycle / generation), names (cycle2, gen1), labels (M#L2) or files")
    p.add_argument("--data", help="data folder [default: the run's config.yaml]")
    p.add_argument("--dataset", help="synthetic, cifar10, cifar100 or imagefolder [default: the "
                                     "run's]")
    p.add_argument("--synthetic-size", metavar="N[,M]",
                   help="synthetic data: training[,test] images, as fastsd.train's flag (the "
                        "test split depends on both) [default: the run's]")
    p.add_argument("--arch", help="architecture [default: recorded in the weights file]")
    p.add_argument("--num-classes", type=int, help="[default: recorded in the weights file]")
    p.add_argument("--image-size", type=int, help="[default: the run's; without a run, as "
                   "fastsd.train chooses: on image folders the model's input size]")
    p.add_argument("--batch-size", type=int, help="evaluation batch size [default: the run's]")
    p.add_argument("--workers", type=int, help="data loading worker processes [default: as "
                   "fastsd.train's, min(8, CPUs - 1) on CUDA, 0 on CPU]")
    p.add_argument("--temperature", type=float,
                   help="T of the entropy column [default: the run's, else 1]")
    p.add_argument("--device", help="cpu, cuda, cuda:N [default: cuda when present]")
    p.add_argument("--amp", choices=EVAL_AMP_MODES,
                   help="autocast of the forward pass [default: the run's --amp, as the trainer "
                        "evaluated; none (float32) for weights outside a run]")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory format [default: the run's, else off]")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    return p


def _eval_amp(requested: Optional[str], run_amp: Optional[str], device: torch.device) -> str:
    """The autocast mode of the evaluation: ``--amp``, else the run's (config.yaml holds it
    resolved), else none. A run trained in fp16 on a GPU is evaluated in float32 on a CPU, where
    the trainer refuses fp16 autocast too."""
    if requested == "fp16" and device.type != "cuda":
        raise SetupError(f"--amp fp16 needs a CUDA device (this is {device}); use --amp bf16 or "
                         f"--amp none")
    amp = requested or run_amp or "none"
    if amp not in EVAL_AMP_MODES:
        raise SetupError(f"the run's config.yaml says amp {amp!r}; pass --amp bf16, fp16 or none")
    if amp == "fp16" and device.type != "cuda":
        print(f"fastsd.evaluate: the run trained with fp16 autocast on a GPU; evaluating in "
              f"float32 on {device} (pass --amp bf16 for bf16)", file=sys.stderr)
        amp = "none"
    return amp


def _first(*values):
    """The first value that is not None (a given 0 is not replaced by a default: it is refused)."""
    return next((v for v in values if v is not None), None)


def _run_config(run_dir: Optional[str]) -> Dict[str, Any]:
    if run_dir is None:
        return {}
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        raise SetupError(f"{path} is not valid YAML ({e}); pass the settings as flags "
                         f"(--dataset, --data, --arch, --num-classes)") from None
    if not isinstance(values, dict):
        raise SetupError(f"{path} holds no settings (a mapping); pass them as flags")
    return values


def _fmt(v) -> str:
    return "" if v is None else f"{v:.2f}"


def format_evaluation(out: Dict[str, Any]) -> str:
    """The printed tables: errors (M#L…, best, ensemble) and secondary information."""
    models = out["models"]
    best = min(models, key=lambda e: (e["top1_error"], e["top5_error"]))
    header = ["error (%)"] + [m["label"] for m in models] + ["best"]
    if out["ensemble"]:
        members = out["ensemble"]["members"]
        # named where it is not every model listed (a BAN/TT run's G#0 is left out)
        header.append("ensemble" if len(members) == len(models)
                      else f"ensemble of {', '.join(members)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for key, name in (("top1_error", "top-1"), ("top5_error", "top-5")):
        cells = [name] + [_fmt(m[key]) for m in models] + [_fmt(best[key])]
        if out["ensemble"]:
            cells.append(_fmt(out["ensemble"][key]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | conf top-1 | top-2 | top-3 | top-4 | test acc (%) | agreement with "
              "previous (%) | entropy at T |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        conf = [f"{c:.4f}" for c in m["confidence_top4"]] + [""] * (4 - len(m["confidence_top4"]))
        lines.append(f"| {m['label']} | " + " | ".join(conf) + f" | {100 - m['top1_error']:.2f} | "
                     f"{_fmt(m.get('agreement_prev'))} | {m['entropy_T']:.4f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = _main(args)
    except (TrainError, ValueError, OSError) as e:
        print(f"fastsd.evaluate: error: {e}", file=sys.stderr)
        return 2
    from fastsd.train.monitor import print_results

    print_results(format_evaluation(out))  # (`| head`: a reader gone already ends it quietly)
    return 0


def _main(args) -> Dict[str, Any]:
    from fastsd.data import build_loaders
    from fastsd.models import get_model_info

    files = resolve_models(args.checkpoint, args.snapshots)
    run_dir = _run_dir_of(args.checkpoint)
    cfg = _run_config(run_dir)
    try:
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        raise SetupError(f"--device: {e}") from None
    for name in ("batch_size", "image_size", "temperature"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SetupError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.workers is not None and args.workers < 0:
        raise SetupError(f"--workers must be >= 0, got {args.workers}")
    if device.type == "cuda":
        from fastsd.train.loop import configure_cuda_kernels

        # the trainer's kernels (TF32 matmuls unless --deterministic): its evaluation's numbers
        configure_cuda_kernels(bool(cfg.get("deterministic", False)))
    amp = _eval_amp(args.amp, cfg.get("amp"), device)
    channels_last = (args.channels_last if args.channels_last is not None
                     else bool(cfg.get("channels_last", False)))
    models, archs = [], []
    arch = num_classes = None
    for label, file in files:
        # --arch / --num-classes where given, else each file's own record (a KD student beside
        # its teacher, a cross-architecture ensemble), else the run's config.yaml.
        model, file_arch, file_classes = load_model(
            file, args.arch, args.num_classes, device,
            fallback_arch=cfg.get("arch"), fallback_classes=cfg.get("num_classes"))
        if num_classes is not None and file_classes != num_classes:
            raise SetupError(f"{file} scores {file_classes} classes but {files[0][1]} scores "
                             f"{num_classes}: models evaluated together must score the same "
                             f"classes")
        arch = arch or file_arch  # the first model's: default image size, evaluation resize
        archs.append(file_arch)
        num_classes = file_classes
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models.append((label, model))
    dataset = args.dataset or cfg.get("dataset") or "synthetic"
    data = args.data if args.data is not None else (cfg.get("data") if not args.dataset else None)
    synthetic = None
    if dataset == "synthetic":
        synthetic = cfg.get("synthetic_size")
        if args.synthetic_size is not None:
            try:
                synthetic = parse_list(args.synthetic_size, int)  # as fastsd.train reads it
            except (TypeError, ValueError):
                raise SetupError(f"--synthetic-size: give N or N,M (training and test images), "
                                 f"got {args.synthetic_size!r}") from None
    batch = _first(args.batch_size, cfg.get("eval_batch_size"), 256)
    image_size = _first(args.image_size, cfg.get("image_size")) or auto_image_size(dataset, arch)
    from fastsd.models import check_input_size

    for name in dict.fromkeys(archs):  # now, not as a traceback of the first forward
        try:
            check_input_size(name, image_size or 32)  # None: CIFAR's native 32
        except ValueError as e:
            raise SetupError(f"--image-size: {e}") from None
    try:
        # Only the test split is read: an image folder needs no train/ beside its val/.
        loaders = build_loaders(dataset, data, batch_size=batch, eval_only=True,
                                workers=_first(args.workers, auto_workers(device.type == "cuda")),
                                device=device, num_classes=num_classes,
                                image_size=image_size, channels_last=channels_last,
                                synthetic_size=tuple(synthetic) if synthetic else None,
                                eval_crop_fraction=get_model_info(arch).eval_crop_fraction)
    except (ValueError, OSError) as e:
        raise SetupError(f"data (--dataset {dataset}" + (f", --data {data}" if data else "")
                         + f"): {e}") from None
    temperature = _first(args.temperature, cfg.get("temperature"), 1.0)
    from fastsd.train.step import autocast_forward

    forwards = [(label, autocast_forward(model, device, amp)) for label, model in models]
    ensemble_of = None
    if cfg.get("method"):  # a run's snapshots: its own ensemble rule (BAN/TT leave out G#0)
        numbers = [_snapshot_number(file) for _, file in files]
        ensemble_of = [i for i, number in enumerate(numbers)
                       if number is None or in_run_ensemble(cfg["method"], int(number))]
    out = evaluate_models(forwards, loaders.test, num_classes=num_classes,
                          temperature=temperature, device=device, ensemble_of=ensemble_of)
    out.update(checkpoint=args.checkpoint, dataset=dataset, temperature=temperature,
               amp=amp, channels_last=channels_last, files=[f for _, f in files])
    if args.json:
        from fastsd.train.checkpoint import atomic_write_text, json_text

        clean = {**out, "models": [{k: v for k, v in m.items() if k != "second_confusion"}
                                   for m in out["models"]]}
        atomic_write_text(args.json, json_text(clean) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
