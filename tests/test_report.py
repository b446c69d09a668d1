"""python -m fastsd.report and python -m fastsd.evaluate: numbers against a hand computation on tiny
runs, real PNG files, one table row per run, clear messages for incomplete run directories."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from fastsd.train import TrainConfig, Trainer

pytest.importorskip("matplotlib")

# Big enough that the snapshots learn something in two epochs: they disagree with each other
# and with the truth in ways a swapped column, a wrong teacher or a one-member ensemble would show
# (smaller runs predict one class everywhere, which makes every error the same number).
CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(root, name, **overrides):
    values = dict(device="cpu", dataset="synthetic", num_classes=CLASSES,
                  synthetic_size=[2048, 100], image_size=16, batch_size=64, eval_batch_size=50,
                  log_every=8, progress="none",
                  tensorboard=False, seed=0, teacher_dtype="fp32", amp="none",
                  out=os.path.join(root, name))  # float32 throughout, as the hand computation
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny finished runs of different methods: sd (2 cycles), bl, tt (generations 0, 1)."""
    from fastsd.ops.distill import cpu_backend

    root = str(tmp_path_factory.mktemp("runs"))
    out = {}
    with cpu_backend("native"):
        for name, kw in (("sd", dict(method="sd", epochs=2, cycles=2)),
                         ("bl", dict(method="bl", epochs=1)),
                         ("tt", dict(method="tt", epochs=1, generations=1, topk=3))):
            cfg = tiny(root, name, **kw)
            out[name] = (cfg, Trainer(cfg, quiet=True).run())
    return root, out


# ------------------------------------------------------------------------------ by hand, in numpy
def eval_split(cfg):
    from fastsd.data import build_loaders

    loaders = build_loaders("synthetic", None, batch_size=cfg.batch_size,
                            eval_batch_size=cfg.eval_batch_size, workers=0, num_classes=CLASSES,
                            image_size=cfg.image_size, synthetic_size=tuple(cfg.synthetic_size))
    images, labels = zip(*loaders.test)
    return torch.cat(images), torch.cat(labels).numpy()


def logits_of(path, images, half=False):
    """Logits (numpy float64) of a weights file; ``half``: weights rounded as the trainer's fp32
    teachers hold them (widened from a slot: float16, but BatchNorm layers in float32)."""
    from safetensors.torch import load_file

    from fastsd.models import create_model

    state = load_file(path)
    model = create_model("resnet20", CLASSES)
    if half:
        kept = {f"{name}.{key}" for name, m in model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                for key in ("weight", "bias", "running_mean", "running_var")}
        state = {k: v.half().float() if v.is_floating_point() and k not in kept else v
                 for k, v in state.items()}
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(images).double().numpy()


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def by_hand(z, y):
    order = np.argsort(-z, axis=1, kind="stable")
    p = np.sort(softmax(z), axis=1)[:, ::-1]
    second = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    for label, c in zip(y, order[:, 1]):
        second[label, c] += 1
    return dict(top1=100.0 * np.mean(order[:, 0] != y),
                top5=100.0 * np.mean([label not in row[:5] for label, row in zip(y, order)]),
                conf=p[:, :4].mean(0), second=second, top=order[:, 0])


def entropy(z, T):
    p = softmax(z / T)
    return float(-(p * np.log(p)).sum(1).mean())


def sd_snapshot_logits(runs, half=False):
    """The SD run's config, results, directory, test labels, and each cycle snapshot's logits."""
    root, out = runs
    cfg, results = out["sd"]
    run = os.path.join(root, "sd")
    images, y = eval_split(cfg)
    z = [logits_of(os.path.join(run, "snapshots", f"cycle{c}.safetensors"), images, half=half)
         for c in (1, 2)]
    return cfg, results, run, y, z


# ------------------------------------------------------------------------------------------ tests
def test_report_numbers_equal_a_hand_computation(runs, tmp_path):
    from fastsd.report import build_report

    cfg, results, run, y, z = sd_snapshot_logits(runs)
    zh = sd_snapshot_logits(runs, half=True)[-1]
    hand = [by_hand(zc, y) for zc in z]
    stored = [by_hand(zc, y) for zc in zh]
    ens = by_hand(np.log((softmax(zh[0]) + softmax(zh[1])) / 2), y)
    agreement = 100.0 * np.mean(stored[1]["top"] == stored[0]["top"])
    # The numbers tell the columns apart: a swapped column, the wrong "best", a one-member
    # ensemble or the wrong teacher would not pass.
    assert (hand[0]["top1"], hand[0]["top5"]) != (hand[1]["top1"], hand[1]["top5"])
    assert all(0 < h["top5"] < h["top1"] for h in hand)
    assert 0 < agreement < 100
    assert all((ens["top1"], ens["top5"]) != (h["top1"], h["top5"]) for h in stored)

    done = build_report([run], str(tmp_path / "rep"))
    md = open(done["report"]).read()
    table = [line for line in md.splitlines() if "| top-1 |" in line or "| top-5 |" in line]
    assert len(table) == 2
    top1 = [c.strip() for c in table[0].split("|")[1:-1]]
    top5 = [c.strip() for c in table[1].split("|")[1:-1]]
    best = min(hand, key=lambda h: (h["top1"], h["top5"]))
    assert top1[2:] == [f"{hand[0]['top1']:.2f}", f"{hand[1]['top1']:.2f}", f"{best['top1']:.2f}",
                        f"{ens['top1']:.2f}"]
    assert top5[2:] == [f"{hand[0]['top5']:.2f}", f"{hand[1]['top5']:.2f}", f"{best['top5']:.2f}",
                        f"{ens['top5']:.2f}"]
    # Secondary information: top-1..4 confidences and test accuracy per cycle.
    for label, h in zip(("M#L1", "M#L2"), hand):
        row = next(line for line in md.splitlines() if f"| {label} | 0." in line)
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2:6] == [f"{c:.4f}" for c in h["conf"]]
        assert cells[7] == f"{100 - h['top1']:.2f}"
    # Teacher agreement and entropy: M#L2 against its teacher M#L1 (as stored).
    row = next(line for line in md.splitlines() if "| M#L2 | M#L1 |" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3] == f"{agreement:.2f}"
    assert float(cells[4]) == pytest.approx(entropy(zh[0], cfg.temperature), abs=1e-4)
    # The confusion matrix drawn is ground truth vs second-highest class, counted by hand.
    second = done["runs"][0]["results"]["snapshots"][-1]["_second"]
    np.testing.assert_array_equal(second.numpy(), hand[1]["second"])
    assert second.sum() == len(y)
    # The learning rate plotted is the trainer's schedule: it equals every logged value.
    from fastsd.report import lr_curve, rows

    its, lrs = lr_curve(done["runs"][0])
    at = dict(zip(its, lrs))
    steps = rows(done["runs"][0], "step")
    assert len(its) == 2 * 32 and len(steps) == 2 * 32 // 8  # 2 epochs of 32, log_every=8
    for r in steps:
        assert at[r["iteration"] - 1] == pytest.approx(r["lr"], rel=1e-12)
    # A run of several GPU processes with SyncBatchNorm has the same curve when reported here.
    ddp = dict(done["runs"][0], config={**done["runs"][0]["config"], "world_size": 2,
                                         "sync_bn": True, "device": "cuda"})
    assert lr_curve(ddp) == (its, lrs)


def test_repeated_runs_get_mean_and_standard_deviation(runs, tmp_path):
    """Runs that differ only in seed (and where and how they ran) are one experiment: the report
    adds its table as mean ± sample standard deviation, computed here from results.json."""
    from fastsd.ops.distill import cpu_backend
    from fastsd.report import build_report

    root, out = runs
    with cpu_backend("native"):
        # --threads differs too: still a repeat
        cfg = tiny(str(tmp_path), "sd-seed1", method="sd", epochs=2, cycles=2, seed=1, threads=1)
        repeats = [out["sd"][1], Trainer(cfg, quiet=True).run()]
    # as a run from before these settings existed wrote it: still the same experiment
    config_yaml = os.path.join(repeats[1]["run_dir"], "config.yaml")
    with open(config_yaml) as fh:
        kept = [line for line in fh if not line.startswith(("grad_accum_steps:",
                                                            "restart_warmup_epochs:"))]
    with open(config_yaml, "w") as fh:
        fh.writelines(kept)
    dirs = [repeats[0]["run_dir"], os.path.join(root, "bl"), repeats[1]["run_dir"],
            repeats[0]["run_dir"]]  # the same directory twice counts once
    md = open(build_report(dirs, str(tmp_path / "rep"), plots=False)["report"]).read()
    lines = md.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("| experiment |")))
    assert lines[at].split("|")[1:-1] == [" experiment ", " runs (seed) ", " error (%) ",
                                          " M#L1 ", " M#L2 ", " best ", " ensemble "]
    table = lines[at + 2:at + 4]
    assert table[0].startswith("| SD (T=2), resnet20 | sd (0), sd-seed1 (1) | top-1 |")
    assert lines[at + 4] == ""  # the one repeated experiment: bl has no repeat

    def mean_std(values):
        return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"

    a, b = repeats
    stds = []
    for row, key in zip(table, ("top1_error", "top5_error")):
        expected = [mean_std([x[key], y[key]]) for x, y in zip(a["snapshots"], b["snapshots"])]
        expected += [mean_std([a["best"][key], b["best"][key]]),
                     mean_std([a["ensemble"][key], b["ensemble"][key]])]
        assert [c.strip() for c in row.split("|")[4:-1]] == expected
        stds += [float(e.split(" ± ")[1]) for e in expected]
    assert min(stds) > 0  # the seeds gave different numbers in every column


def test_columns_of_runs_with_different_numbers_of_snapshots_stay_in_order():
    from fastsd.train.results import stage_labels

    def run(*labels):
        return {"snapshots": [{"label": label} for label in labels]}

    assert stage_labels([run("M#L1", "M#L2"), run("G#0", "G#1"), run("M#L1", "M#L2", "M#L3"),
                         run("G#0", "G#1", "G#2"), run("final")]) == [
        "M#L1", "M#L2", "M#L3", "G#0", "G#1", "G#2", "final"]


def test_runs_on_different_image_folders_are_not_repeats():
    from fastsd.report import repeat_groups

    def run(name, data, seed, dataset="imagefolder"):
        return {"dir": f"/runs/{name}", "config": {"dataset": dataset, "data": data,
                                                   "seed": seed, "method": "bl"}}

    assert repeat_groups([run("a", "/data/cats", 0), run("b", "/data/dogs", 1)]) == []
    same = [run("a", "/data/cats", 0), run("b", "/data/cats", 1)]
    assert repeat_groups(same) == [same]
    cifar = [run("a", "/data/c1", 0, "cifar10"), run("b", "/scratch/c2", 1, "cifar10")]
    assert repeat_groups(cifar) == [cifar]  # two copies of CIFAR-10 are one data set
    # the same seed twice is no repeat (a copy of a run, or the run again)
    assert repeat_groups([run("a", "/data/cats", 0), run("b", "/data/cats", 0)]) == []
    assert repeat_groups([*same, run("c", "/data/cats", 0)]) == [same]
    # how often a run evaluated and whether it fetched its data change nothing it trains
    watched = [{**cifar[0], "config": {**cifar[0]["config"], "eval_every": 1, "download": True}},
               {**cifar[1], "config": {**cifar[1]["config"], "eval_every": 4}}]
    assert repeat_groups(watched) == [watched]


def test_evaluate_prints_the_same_numbers(runs, capsys):
    from fastsd.evaluate import main

    cfg, results, run, y, z = sd_snapshot_logits(runs)
    hand = [by_hand(zc, y) for zc in z]
    ens = by_hand(np.log((softmax(z[0]) + softmax(z[1])) / 2), y)
    assert main(["--checkpoint", run, "--snapshots", "all", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    top1 = next(line for line in text.splitlines() if line.startswith("| top-1 |"))
    assert [c.strip() for c in top1.split("|")[2:-1]] == [
        f"{hand[0]['top1']:.2f}", f"{hand[1]['top1']:.2f}",
        f"{min(h['top1'] for h in hand):.2f}", f"{ens['top1']:.2f}"]
    row = next(line for line in text.splitlines() if line.startswith("| M#L2 | 0."))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:5] == [f"{c:.4f}" for c in hand[1]["conf"]]
    assert cells[6] == f"{100 * np.mean(hand[1]['top'] == hand[0]['top']):.2f}"
    assert float(cells[7]) == pytest.approx(entropy(z[1], cfg.temperature), abs=1e-4)
    # The snapshot's errors are the run's own columns (float32 evaluation of the same model).
    assert results["snapshots"][1]["top1_error"] == pytest.approx(hand[1]["top1"])
    # One snapshot by number, and the final model of the run.
    assert main(["--checkpoint", run, "--snapshots", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "ensemble" not in text and f"| {hand[0]['top1']:.2f} |" in text
    assert main(["--checkpoint", os.path.join(run, "model.safetensors"), "--device", "cpu"]) == 0
    assert f"| {hand[1]['top1']:.2f} |" in capsys.readouterr().out


def test_evaluate_ensembles_generations_as_the_run_does(runs, capsys):
    """BAN/TT: the ensemble is of generations 1..g, without generation 0, in the run's
    results.json and in fastsd.evaluate alike (evaluate once averaged G#0 in as well)."""
    from fastsd.evaluate import main

    root, out = runs
    cfg, results = out["tt"]
    assert main(["--checkpoint", cfg.out, "--snapshots", "all", "--device", "cpu", "--json",
                 os.path.join(root, "tt-eval.json")]) == 0
    capsys.readouterr()
    with open(os.path.join(root, "tt-eval.json")) as f:
        evaluated = json.load(f)
    assert [m["label"] for m in evaluated["models"]] == ["G#0", "G#1"]
    assert evaluated["ensemble"]["members"] == ["G#1"]
    for key in ("top1_error", "top5_error"):
        assert evaluated["ensemble"][key] == pytest.approx(results["ensemble"][key])
        assert evaluated["ensemble"][key] == pytest.approx(evaluated["models"][1][key])
    # the printed table names the members where they are not every model listed
    assert main(["--checkpoint", cfg.out, "--snapshots", "all", "--device", "cpu"]) == 0
    assert "| best | ensemble of G#1 |" in capsys.readouterr().out


def test_evaluate_builds_each_model_from_its_own_file(runs, tmp_path, capsys):
    """A KD student beside its bigger teacher: every file is built as the architecture it
    records, not as the first one's (or the run's config.yaml's)."""
    from fastsd.evaluate import main
    from fastsd.models import create_model
    from fastsd.train.checkpoint import model_weights, save_safetensors

    root, out = runs
    bigger = str(tmp_path / "resnet32.safetensors")
    save_safetensors(model_weights(create_model("resnet32", CLASSES)), bigger,
                     {"arch": "resnet32", "num_classes": str(CLASSES)})
    student = os.path.join(out["bl"][0].out, "model.safetensors")
    for files in ([student, bigger], [bigger, student]):
        assert main(["--checkpoint", out["bl"][0].out, "--snapshots", *files,
                     "--device", "cpu"]) == 0, capsys.readouterr().err
        assert "| best | ensemble |" in capsys.readouterr().out
    other = str(tmp_path / "five.safetensors")
    save_safetensors(model_weights(create_model("resnet20", 5)), other,
                     {"arch": "resnet20", "num_classes": "5"})
    assert main(["--checkpoint", out["bl"][0].out, "--snapshots", student, other,
                 "--device", "cpu"]) == 2
    assert "five.safetensors scores 5 classes but" in capsys.readouterr().err
    # a model that cannot run on the run's 16-pixel images: refused by name before any forward
    small = str(tmp_path / "squeeze.safetensors")
    save_safetensors(model_weights(create_model("squeezenet1_1", CLASSES)), small,
                     {"arch": "squeezenet1_1", "num_classes": str(CLASSES)})
    assert main(["--checkpoint", out["bl"][0].out, "--snapshots", student, small,
                 "--device", "cpu"]) == 2
    assert "--image-size: squeezenet1_1 needs images of at least 17x17" in \
        capsys.readouterr().err


def test_evaluate_names_a_model_given_twice_and_labels_another_runs_file(runs, tmp_path,
                                                                         capsys):
    from fastsd.evaluate import main

    root, out = runs
    sd = out["sd"][0].out
    assert main(["--checkpoint", sd, "--snapshots", "1", "cycle1", "--device", "cpu"]) == 2
    assert "'cycle1' names a model given already" in capsys.readouterr().err
    other = str(tmp_path / "other")
    shutil.copytree(sd, other)
    theirs = os.path.join(other, "snapshots", "cycle1.safetensors")
    assert main(["--checkpoint", sd, "--snapshots", "1", theirs, "--device", "cpu"]) == 0
    assert f"| M#L1 | M#L1 ({theirs}) | best |" in capsys.readouterr().out


def test_evaluate_a_file_out_of_its_run_on_the_runs_synthetic_split(runs, tmp_path, capsys):
    """Without the run's config.yaml beside it, --synthetic-size rebuilds the run's test split
    (its size depends on both numbers): the run's own error again."""
    from fastsd.evaluate import main

    root, out = runs
    cfg, results = out["bl"]
    lonely = str(tmp_path / "bl.safetensors")
    shutil.copy(os.path.join(cfg.out, "model.safetensors"), lonely)
    assert main(["--checkpoint", lonely, "--synthetic-size", "2048,100", "--image-size", "16",
                 "--amp", "none", "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    with open(tmp_path / "e.json") as f:
        evaluated = json.load(f)["models"][0]
    assert evaluated["samples"] == 100
    assert evaluated["top1_error"] == pytest.approx(results["final"]["top1_error"])


def test_evaluate_into_a_closed_pipe_ends_quietly(runs):
    """`fastsd.evaluate ... | head -1`, the reader gone before the table: no traceback."""
    import subprocess
    import sys

    root, out = runs
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastsd.evaluate", "--checkpoint",
                             out["bl"][0].out, "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert b"Traceback" not in proc.stderr.read()


def test_evaluate_all_takes_only_the_runs_own_snapshots(runs, tmp_path, capsys):
    """A snapshot file the run's settings do not make (an earlier run's, in a reused folder) is
    no member of --snapshots all; and a fresh run is refused in a folder holding results."""
    from fastsd.evaluate import main
    from fastsd.train.errors import SetupError

    root, out = runs
    run = str(tmp_path / "sd")
    shutil.copytree(out["sd"][0].out, run)
    shutil.copy(os.path.join(run, "snapshots", "cycle2.safetensors"),
                os.path.join(run, "snapshots", "cycle3.safetensors"))
    assert main(["--checkpoint", run, "--snapshots", "all", "--device", "cpu", "--json",
                 str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    with open(tmp_path / "e.json") as f:
        assert [m["label"] for m in json.load(f)["models"]] == ["M#L1", "M#L2"]
    shutil.rmtree(os.path.join(run, "checkpoints"))
    with pytest.raises(SetupError, match="holds a finished run"):
        Trainer(out["sd"][0].replace(out=run), quiet=True).setup()


def test_evaluate_follows_the_runs_mixed_precision(tmp_path, capsys):
    """A run evaluated under bf16 autocast in channels_last (the CPU defaults where bf16 is
    native) is evaluated the same way by fastsd.evaluate: every snapshot's numbers are the run's
    own, to the last bit. In float32 (--amp none) the confidences differ, so the comparison can
    tell the precisions apart."""
    import json

    from fastsd.evaluate import main
    from fastsd.ops.distill import cpu_backend

    with cpu_backend("native"):
        results = Trainer(tiny(str(tmp_path), "sd", method="sd", epochs=2, cycles=2, amp="bf16",
                               channels_last=True), quiet=True).run()
    run = str(tmp_path / "sd")

    def evaluated(*extra):
        path = str(tmp_path / "eval.json")
        assert main(["--checkpoint", run, "--snapshots", "all", "--device", "cpu", "--json",
                     path, *extra]) == 0, capsys.readouterr().err
        with open(path) as fh:
            return json.load(fh)

    out = evaluated()
    assert (out["amp"], out["channels_last"]) == ("bf16", True)
    for mine, theirs in zip(out["models"], results["snapshots"], strict=True):
        assert mine["label"] == theirs["label"]
        assert (mine["top1_error"], mine["top5_error"]) == (theirs["top1_error"],
                                                            theirs["top5_error"])
        assert mine["confidence_top4"] == theirs["confidence_top4"]
    fp32 = evaluated("--amp", "none", "--no-channels-last")
    assert fp32["amp"] == "none"
    assert all(a["confidence_top4"] != b["confidence_top4"]
               for a, b in zip(fp32["models"], results["snapshots"]))


def test_evaluate_on_the_cpu_of_a_run_trained_in_fp16(runs, tmp_path, capsys):
    """fp16 autocast is for GPUs: asked for on the CPU it is refused; a run that trained in fp16
    (on a GPU) is evaluated on the CPU in float32, and the message says so."""
    import json

    import yaml

    from fastsd.evaluate import main

    root, _ = runs
    assert main(["--checkpoint", os.path.join(root, "sd"), "--device", "cpu", "--amp",
                 "fp16"]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    run = str(tmp_path / "sd")
    shutil.copytree(os.path.join(root, "sd"), run)
    with open(os.path.join(run, "config.yaml")) as fh:
        config = yaml.safe_load(fh)
    with open(os.path.join(run, "config.yaml"), "w") as fh:
        yaml.safe_dump({**config, "amp": "fp16", "device": "cuda"}, fh)
    path = str(tmp_path / "eval.json")
    assert main(["--checkpoint", run, "--device", "cpu", "--json", path]) == 0
    assert "evaluating in float32" in capsys.readouterr().err
    with open(path) as fh:
        assert json.load(fh)["amp"] == "none"


def test_evaluate_crops_a_folder_to_the_models_input_size(tmp_path, monkeypatch, capsys):
    """Without a run's config.yaml the image size follows fastsd.train's rule: a CIFAR ResNet
    evaluates a folder at its own 32 px, not at the ImageNet 224. The folder's training split
    (4 images) is smaller than the evaluation batch: it is not read, so it is not refused."""
    import fastsd.data
    from PIL import Image

    from fastsd.evaluate import main
    from fastsd.models import create_model
    from fastsd.train.checkpoint import save_safetensors

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "folder" / split / c)
            for i in range(2):
                pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "folder" / split / c / f"{i}.png")
    weights = str(tmp_path / "resnet20.safetensors")
    save_safetensors(create_model("resnet20", 2).state_dict(), weights)
    seen = {}
    build = fastsd.data.build_loaders

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return build(*args, **kwargs)

    monkeypatch.setattr(fastsd.data, "build_loaders", spy)
    args = ["--checkpoint", weights, "--arch", "resnet20", "--num-classes", "2", "--dataset",
            "imagefolder", "--data", str(tmp_path / "folder"), "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    assert seen["image_size"] == 32
    assert main(args + ["--image-size", "40"]) == 0 and seen["image_size"] == 40


def test_evaluate_reads_a_folder_with_its_evaluation_split_only(tmp_path, capsys):
    """ImageNet's val/ beside a checkpoint is enough: no train/ is needed, and the error is the
    model's on those images, found here by an independent forward of the same pixels. A train/
    that is there must still hold the same class folders, as they give the labels."""
    from PIL import Image

    from fastsd.data import IMAGENET_MEAN, IMAGENET_STD
    from fastsd.evaluate import main
    from fastsd.models import create_model
    from fastsd.train.checkpoint import save_safetensors

    rng = np.random.default_rng(1)
    files, labels = [], []
    for label, c in enumerate(("ant", "bee", "cat")):
        os.makedirs(tmp_path / "folder" / "val" / c)
        for i in range(4):
            files.append(tmp_path / "folder" / "val" / c / f"{i}.png")
            labels.append(label)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    torch.manual_seed(0)
    model = create_model("resnet20", 3).eval()
    weights = str(tmp_path / "resnet20.safetensors")
    save_safetensors(model.state_dict(), weights)
    out = str(tmp_path / "eval.json")
    args = ["--checkpoint", weights, "--arch", "resnet20", "--num-classes", "3", "--dataset",
            "imagefolder", "--data", str(tmp_path / "folder"), "--device", "cpu", "--workers",
            "1", "--json", out]
    assert main(args) == 0, capsys.readouterr().err
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in files])
    x = (pixels.permute(0, 3, 1, 2) / 255.0 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        wrong = (model(x).argmax(1) != torch.tensor(labels)).sum().item()
    with open(out) as fh:
        evaluated = json.load(fh)["models"][0]
    assert evaluated["samples"] == 12
    assert evaluated["top1_error"] == pytest.approx(100.0 * wrong / 12)
    os.makedirs(tmp_path / "folder" / "train" / "dog")
    assert main(args) == 2
    assert "only in train: dog; only in val: ant, bee, cat" in capsys.readouterr().err


def test_evaluate_names_a_missing_snapshot(runs, capsys):
    from fastsd.evaluate import main

    root, _ = runs
    assert main(["--checkpoint", os.path.join(root, "sd"), "--snapshots", "7"]) == 2
    err = capsys.readouterr().err
    assert "no snapshot '7'" in err and "cycle1 (M#L1)" in err and "cycle2 (M#L2)" in err
    assert main(["--checkpoint", os.path.join(root, "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_and_report_refuse_bad_input_by_name(runs, tmp_path, capsys):
    """No traceback and no silent fallback: a device that is not there, a 0 that would have been
    replaced by the run's value, a config.yaml that is not YAML, a report folder that cannot be
    made."""
    from fastsd.evaluate import main as evaluate
    from fastsd.report import main as report

    root, _ = runs
    run = os.path.join(root, "sd")
    for extra, wanted in ((["--device", "gpu"], "--device: cannot parse 'gpu'"),
                          (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
                          (["--temperature", "-1"], "--temperature must be > 0, got -1.0")):
        assert evaluate(["--checkpoint", run, *extra]) == 2
        assert wanted in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert evaluate(["--checkpoint", run, "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "config.yaml").write_text("arch: [resnet20\n")
    assert evaluate(["--checkpoint", str(broken), "--device", "cpu"]) == 2
    assert "config.yaml is not valid YAML" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert report([run, "--out", str(blocker / "rep"), "--no-plots"]) == 4
    assert "choose an --out folder you can write to" in capsys.readouterr().err


def test_every_plot_is_a_real_png_and_one_row_per_run(runs, tmp_path, capsys):
    from PIL import Image

    from fastsd.report import main

    root, _ = runs
    dirs = [os.path.join(root, n) for n in ("sd", "bl", "tt")]
    out = tmp_path / "rep"
    assert main(dirs + ["--out", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    expected = {"lr.png", "curves.png", "stage_errors.png", "teacher.png", "confusion_sd.png",
                "confusion_bl.png", "confusion_tt.png"}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        with Image.open(out / name) as im:
            im.load()
            assert im.width >= 300 and im.height >= 200, name
            assert np.asarray(im.convert("L")).std() > 1, name  # not a blank canvas
        assert f"]({name})" in md
    top1_rows = [line for line in md.splitlines() if "| top-1 |" in line]
    assert len(top1_rows) == 3
    assert top1_rows[0].startswith("| SD (T=2), resnet20 [sd]")
    assert top1_rows[1].startswith("| BL, resnet20 [bl]")
    assert top1_rows[2].startswith("| TT (T=2), resnet20 [tt]")
    # Columns: M#L1, M#L2 (sd), final (bl), G#0, G#1 (tt), best, ensemble.
    header = next(line for line in md.splitlines() if line.startswith("| run | error (%)"))
    assert [c.strip() for c in header.split("|")[3:-1]] == [
        "M#L1", "M#L2", "final", "G#0", "G#1", "best", "ensemble"]
    # Teachers: SD's cycle 2 and TT's generation 1.
    assert "| M#L2 | M#L1 |" in md and "| G#1 | G#0 |" in md


def test_missing_files_are_named(runs, tmp_path, capsys):
    from fastsd.report import ReportError, build_report, main

    root, _ = runs
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(root, "bl"), broken)
    os.remove(broken / "metrics.jsonl")
    os.remove(broken / "results.json")
    with pytest.raises(ReportError) as err:
        build_report([os.path.join(root, "sd"), str(broken)], str(tmp_path / "rep"))
    assert str(broken) in str(err.value)
    assert "results.json" in str(err.value) and "metrics.jsonl" in str(err.value)
    assert "config.yaml" not in str(err.value)
    assert not (tmp_path / "rep").exists()  # nothing written before the check
    assert main([str(broken), str(tmp_path / "none"), "--out", str(tmp_path / "rep")]) == 2
    text = capsys.readouterr().err
    assert "missing results.json, metrics.jsonl" in text and "is not a directory" in text
    # Only the results missing: the run has not finished; say how to continue it.
    # The command is quoted for a shell, and --resume is offered only where a checkpoint is.
    import shlex

    unfinished = tmp_path / "un finished"
    shutil.copytree(os.path.join(root, "bl"), unfinished)
    os.remove(unfinished / "results.json")
    with pytest.raises(ReportError, match="missing results.json: the run has not finished") as e:
        build_report([str(unfinished)], str(tmp_path / "rep"))
    assert f"continue with python -m fastsd.train --resume {shlex.quote(str(unfinished))} " \
        in str(e.value)
    shutil.rmtree(unfinished / "checkpoints")  # stopped before its first checkpoint
    with pytest.raises(ReportError, match="start the run again \\(python -m fastsd.train "
                                          "--config .* --out NEW_DIR\\)") as e:
        build_report([str(unfinished)], str(tmp_path / "rep"))
    assert "--resume" not in str(e.value)
    # A missing diagnostics file is a note in the report, not an error.
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(root, "sd"), partial)
    os.remove(partial / "diagnostics" / "cycle2.safetensors")
    done = build_report([str(partial)], str(tmp_path / "rep2"))
    assert "diagnostics/cycle2.safetensors is missing" in open(done["report"]).read()


def test_tables_without_matplotlib(runs, tmp_path, monkeypatch):
    import sys

    from fastsd.report import ReportError, build_report

    root, _ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ReportError, match=r"pip install 'fastsd\[report\]'.*--no-plots"):
        build_report([os.path.join(root, "sd")], str(tmp_path / "rep"))
    done = build_report([os.path.join(root, "sd")], str(tmp_path / "rep"), plots=False)
    md = open(done["report"]).read()
    assert done["images"] == [] and "| M#L2 | M#L1 |" in md and ".png" not in md
    assert list((tmp_path / "rep").iterdir()) == [tmp_path / "rep" / "report.md"]


def test_a_diverged_model_is_written_as_strict_json(runs, tmp_path, capsys):
    """A model whose outputs are NaN has NaN confidences: evaluate --json writes them as null,
    never Python's bare NaN token, which strict JSON readers refuse."""
    from safetensors.torch import load_file, save_file

    from fastsd.evaluate import main
    from fastsd.train.checkpoint import json_text

    root, out = runs
    cfg, _ = out["sd"]
    weights = load_file(os.path.join(cfg.out, "model.safetensors"))
    bias = next(k for k in weights if k.endswith("bias") and weights[k].shape == (CLASSES,))
    weights[bias] = torch.full_like(weights[bias], float("nan"))
    run = tmp_path / "diverged"
    shutil.copytree(cfg.out, run)
    save_file(weights, str(run / "model.safetensors"))
    path = str(tmp_path / "eval.json")
    assert main(["--checkpoint", str(run / "model.safetensors"), "--device", "cpu", "--json",
                 path]) == 0, capsys.readouterr().err

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    with open(path) as fh:
        model = json.load(fh, parse_constant=refuse)["models"][0]
    assert model["confidence_top4"] == [None] * 4 and model["entropy_T"] is None
    assert json.loads(json_text({"a": [1.5, float("inf")], "b": (float("-inf"),)}),
                      parse_constant=refuse) == {"a": [1.5, None], "b": [None]}


def test_runs_are_listed_once_and_told_apart(runs, tmp_path):
    """``sd`` and ``sd/`` are one run; ``a/sd`` and ``b/sd`` are two, named by their paths; a
    results.json or config.yaml that holds no mapping is refused by name."""
    from fastsd.report import ReportError, distinct_names, load_runs

    root, _ = runs
    for parent in ("a", "b"):
        shutil.copytree(os.path.join(root, "sd"), tmp_path / parent / "sd")
    a, b = str(tmp_path / "a" / "sd"), str(tmp_path / "b" / "sd")
    loaded = load_runs([a, a + "/", b, os.path.join(root, "bl")])
    assert [r["name"] for r in loaded] == ["a/sd", "b/sd", "bl"]
    assert distinct_names(["/x/y/run", "/z/y/run", "/w/other"]) == ["x/y/run", "z/y/run",
                                                                     "other"]
    (tmp_path / "b" / "sd" / "results.json").write_text("null\n")
    (tmp_path / "a" / "sd" / "config.yaml").write_text("- a\n")
    with pytest.raises(ReportError) as e:
        load_runs([a, b])
    assert f"{a}: config.yaml holds no mapping" in str(e.value)
    assert f"{b}: results.json holds no mapping" in str(e.value)
