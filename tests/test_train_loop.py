"""The trainer end to end at tiny scale (CPU): every method, teachers, ensembles, resume, faults.

Runs use ResNet-20 on 16x16 synthetic images, a few iterations per epoch.
"""

import contextlib
import itertools
import json
import math
import shutil
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from fastsd.train import NonFiniteLossError, TrainConfig, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny models here gain nothing from more, and on a shared CPU
    spinning OpenMP threads slow every test (and everyone else) down several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def native_cpu_loss():
    """The loss's C++ CPU kernel (what a CPU run uses), not the Triton interpreter that the test
    configuration switches on for the kernel tests."""
    from fastsd.ops.distill import cpu_backend

    with cpu_backend("native"):
        yield


def tiny(tmp_path, name="run", **overrides):
    values = dict(device="cpu", dataset="synthetic", synthetic_size=[96, 48], image_size=16,
                  batch_size=32, eval_batch_size=48, log_every=1, progress="none",
                  tensorboard=False, seed=0, out=str(tmp_path / name))
    values.update(overrides)
    return TrainConfig(**values)


def train(cfg, hooks=None):
    trainer = Trainer(cfg, hooks=hooks, quiet=True)
    results = trainer.run()
    return trainer, results


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------- every method, e2e
@pytest.mark.parametrize("method, extra, n_snapshots, has_ensemble", [
    ("bl", dict(epochs=2), 1, False),
    ("se", dict(epochs=2, cycles=2), 2, True),
    ("sd", dict(epochs=3, cycle_epochs=[1, 1], temperature=3.0), 2, True),
    ("sd", dict(epochs=2, cycles=2, label_smoothing=0.1, warmup_epochs=0.5), 2, True),
    ("ban", dict(epochs=1, generations=1), 2, True),
    ("tt", dict(epochs=1, generations=2, eta=0.6, topk=3), 3, True),
])
def test_every_method_end_to_end(tmp_path, method, extra, n_snapshots, has_ensemble):
    cfg = tiny(tmp_path, method=method, **extra)
    trainer, results = train(cfg)
    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (on_disk["method"], on_disk["arch"], on_disk["dataset"]) == (method, "resnet20",
                                                                        "synthetic")
    snaps = on_disk["snapshots"]
    assert len(snaps) == n_snapshots
    for entry in snaps:
        assert {"index", "epoch", "top1_error", "top5_error"} <= set(entry)
        assert 0 <= entry["top5_error"] <= entry["top1_error"] <= 100
    assert on_disk["final"]["index"] == snaps[-1]["index"]
    assert on_disk["best"]["top1_error"] == min(e["top1_error"] for e in snaps)
    assert (on_disk["ensemble"] is not None) == has_ensemble
    if method in ("ban", "tt"):
        assert [e["index"] for e in snaps] == list(range(n_snapshots))
        assert on_disk["ensemble"]["members"] == list(range(1, n_snapshots))
    elif method in ("se", "sd"):
        assert [e["label"] for e in snaps] == [f"M#L{i + 1}" for i in range(n_snapshots)]
    # taken at the end of every cycle / generation (sd: 3 epochs as cycles of 1 and 2)
    if method in ("se", "sd"):
        ends = list(itertools.accumulate(cfg.cycle_epochs))
    else:
        ends = [cfg.epochs * (g + 1) for g in range(n_snapshots)]
    assert [e["epoch"] for e in snaps] == ends
    if extra.get("cycle_epochs") == [1, 1]:
        assert [e["epoch"] for e in snaps] == [1, 3]
    md = (run / "results.md").read_text()
    assert "| run | error (%) |" in md and "best" in md and "ensemble" in md
    # config.yaml is the resolved configuration
    from fastsd.train.config import load_yaml

    assert TrainConfig(**load_yaml(str(run / "config.yaml"))[0]) == cfg
    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(steps) == trainer.plan.total_iters and len(epochs) == cfg.total_epochs
    assert all(r["test_top1_error"] is not None for r in epochs)
    assert all(r["lr"] > 0 and r["images_per_s"] > 0 for r in steps)
    for r in steps:  # the loss terms the fused loss returned, as the stage defines them
        stage = trainer.plan.stages[r["stage"]]
        assert (r["kl"] > 0) == (stage.loss.teacher is not None)
        assert (r["tolerance"] != 0) == (stage.loss.tolerance_weight > 0)
    # the final weights load into a fresh model of the architecture
    from fastsd.models import create_model
    from fastsd.train.checkpoint import load_into

    load_into(create_model("resnet20", 10), load_safetensors(str(run / "model.safetensors")))
    snapshot_files = os.listdir(run / "snapshots") if method != "bl" else []
    assert len(snapshot_files) == (0 if method == "bl" else n_snapshots)
    assert method != "bl" or not (run / "snapshots").exists()


def test_kd_from_a_teacher_of_another_architecture(tmp_path):
    from fastsd.models import create_model
    from fastsd.train.checkpoint import model_weights, save_safetensors

    teacher = create_model("resnet32", 10)
    save_safetensors(model_weights(teacher), str(tmp_path / "t.safetensors"),
                     {"arch": "resnet32", "num_classes": 10})
    cfg = tiny(tmp_path, method="kd", epochs=1, teacher_arch="resnet32",
               teacher_checkpoint=str(tmp_path / "t.safetensors"), temperature=4.0)
    seen = []

    class Spy:
        def on_stage_start(self, trainer, stage):
            seen.append(trainer.kd_teacher.module(0))

    trainer, results = train(cfg, hooks=[Spy()])
    assert results["ensemble"] is None and len(results["snapshots"]) == 1
    module = seen[0]
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    for (name, p), ref in zip(module.named_parameters(), teacher.parameters()):
        # the stored teacher is the checkpoint in the teacher precision
        assert torch.equal(p.float(), ref.to(trainer.kd_teacher.store_dtype).float()), name
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "stage"]
    assert rows[0]["loss"] == {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0,
                               "student_temperature": 4.0, "t2_scaling": True}
    md = (tmp_path / "run" / "results.md").read_text()  # the teacher is named with the numbers
    assert "| teacher_arch | resnet32 |" in md and str(tmp_path / "t.safetensors") in md
    assert "cycle" not in md.split("| run |")[0]  # no cycles or snapshots in KD's caption


def test_a_kd_resume_refuses_a_teacher_whose_weights_changed(tmp_path):
    """The checkpoint keeps the teacher's fingerprint: a teacher file overwritten between the
    stop and the resume (retrained, or a teacher run that has finished since) is refused; the
    same weights in another file are not."""
    from fastsd.models import create_model
    from fastsd.train.checkpoint import model_weights, save_safetensors
    from fastsd.train.errors import Interrupted, SetupError

    teacher = create_model("resnet20", 10)
    save_safetensors(model_weights(teacher), str(tmp_path / "t.safetensors"))
    cfg = tiny(tmp_path, method="kd", epochs=2,
               teacher_checkpoint=str(tmp_path / "t.safetensors"))
    with pytest.raises(Interrupted):
        train(cfg, hooks=[StopAtIteration(2)])
    torch.save(model_weights(teacher), tmp_path / "t.pt")  # the same weights, another format
    resumed = cfg.replace(resume=cfg.out)
    Trainer(resumed.replace(teacher_checkpoint=str(tmp_path / "t.pt")), quiet=True).setup()
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    save_safetensors(model_weights(teacher), str(tmp_path / "t.safetensors"))
    with pytest.raises(SetupError, match="is not the one the run started with"):
        Trainer(resumed, quiet=True).setup()


# ------------------------------------------------------------------------------- SD teachers
class Recorder:
    """Student weights at every stage end; the teacher module at every stage start; the step's
    teacher output on one fixed input at every stage start and epoch end."""

    def __init__(self):
        self.ends, self.starts, self.outputs = {}, {}, {}
        self.probe = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def on_epoch_end(self, trainer, epoch):
        if isinstance(trainer.active_stage.loss.teacher, int):
            self.outputs[trainer.active_stage.index].append(trainer.step.teacher(self.probe))

    def on_stage_end(self, trainer, stage):
        start, end = trainer.plan.stage_bounds(stage)
        assert trainer.iteration == end  # after the stage's last iteration, before the next
        self.ends[stage.index] = {k: v.detach().clone() for k, v in
                                  trainer.model.state_dict().items()}

    def on_stage_start(self, trainer, stage):
        if isinstance(stage.loss.teacher, int):
            module = trainer.teachers.module(stage.loss.teacher)
            x = torch.randn(4, 3, 16, 16)
            self.starts[stage.index] = dict(
                slot=stage.loss.teacher, training=module.training,
                grad=any(p.requires_grad for p in module.parameters()),
                state={k: v.detach().clone() for k, v in module.state_dict().items()},
                step_out=trainer.step.teacher(x), module_out=module(x.to(trainer.teachers.dtype)))
            self.outputs[stage.index] = [trainer.step.teacher(self.probe)]


# bf16 named, not "auto": auto is fp32 on a CPU without native bf16, which would test fp32 twice
@pytest.mark.parametrize("teacher_dtype", ["bf16", "fp32"])
def test_sd_teacher_is_the_snapshot_of_the_previous_cycles_last_iteration(tmp_path,
                                                                          teacher_dtype):
    rec = Recorder()
    # cycles of 2 epochs: a snapshot taken at every epoch end, or a teacher that follows the
    # student during its cycle, would show
    trainer, _ = train(tiny(tmp_path, method="sd", cycle_epochs=[1, 2, 2],
                            teacher_dtype=teacher_dtype), hooks=[rec])
    assert trainer.teachers.dtype == (torch.float32 if teacher_dtype == "fp32" else
                                      trainer.teachers.store_dtype)
    assert sorted(rec.starts) == [1, 2]
    dtype = trainer.teachers.store_dtype
    for c, info in rec.starts.items():
        assert info["slot"] == c - 1
        assert info["training"] is False and info["grad"] is False
        student = rec.ends[c - 1]
        assert info["state"].keys() == student.keys()
        for name, value in info["state"].items():
            # the student's value in the precision the snapshot keeps it (exact for buffers kept
            # in float32 or integers; rounded to the storage dtype for half-precision copies)
            exact = student[name].to(value.dtype)
            rounded = student[name].to(dtype).to(value.dtype)
            assert torch.equal(value, exact) or torch.equal(value, rounded), name
        assert torch.equal(info["step_out"], info["module_out"])
        # the same teacher for the whole cycle, through its last epoch (after the capture of
        # the cycle's own snapshot into the next slot)
        assert len(rec.outputs[c]) == 3
        for out in rec.outputs[c][1:]:
            assert torch.equal(out, rec.outputs[c][0])


class StepAudit:
    """Hook: what each training step really used. Its learning rate (the optimizer's, against
    the plan: a step that ran at the next step's rate, the cycle's last at lr_max, would show),
    the teacher logits its loss got (recorded at the loss's door, against the stage's teacher on
    the same images: a zero or shifted teacher would show), and at a generation's start fresh
    weights (those of create_model under the generation's seed) and zero momentum."""

    def __init__(self):
        self.lrs, self.taught, self.fresh = [], 0, []
        self.batch = None

    def on_stage_start(self, trainer, stage):
        from fastsd.models import create_model
        from fastsd.train.loop import model_seed

        step = trainer.step
        forward = step._forward

        def recorded(images, labels, teacher_logits, metrics):
            self.batch = (images, teacher_logits)
            return forward(images, labels, teacher_logits, metrics)

        step._forward = recorded
        if stage.fresh_model and stage.index > 0:
            torch.manual_seed(model_seed(trainer.cfg.seed, stage.index))
            expected = create_model(trainer.cfg.arch, trainer.num_classes).state_dict()
            now = trainer.model.state_dict()
            momentum = [s["momentum_buffer"] for s in trainer.optimizer.state.values()]
            self.fresh.append(all(torch.equal(now[k], v) for k, v in expected.items())
                              and all(not m.any() for m in momentum))

    def on_step_end(self, trainer):
        used = {g["lr"] for g in trainer.optimizer.param_groups}
        self.lrs.append((used, trainer.plan.lr_at(trainer.iteration - 1)))
        images, teacher_logits = self.batch
        if trainer.step.teacher is None:
            assert teacher_logits is None
        else:
            with torch.no_grad():
                assert torch.equal(teacher_logits, trainer.step.teacher(images))
            self.taught += 1


@pytest.mark.parametrize("method", ["sd", "ban"])
def test_every_step_trains_at_its_planned_rate_with_its_teacher(tmp_path, method):
    audit = StepAudit()
    settings = (dict(cycle_epochs=[1, 2]) if method == "sd" else
                dict(generations=1, epochs=2))
    trainer, _ = train(tiny(tmp_path, method=method, **settings), hooks=[audit])
    assert len(audit.lrs) == trainer.plan.total_iters
    assert all(used == {planned} for used, planned in audit.lrs), audit.lrs
    assert len({planned for _, planned in audit.lrs}) > 3  # the schedule moves
    stages = trainer.plan.stages
    assert audit.taught == sum(s.epochs for s in stages if s.loss.teacher is not None) * \
        trainer.plan.iters_per_epoch > 0
    assert audit.fresh == ([True] if method == "ban" else [])


def test_se_and_sd_give_the_same_first_cycle_snapshot(tmp_path):
    train(tiny(tmp_path, "se", method="se", epochs=2, cycles=2))
    train(tiny(tmp_path, "sd", method="sd", epochs=2, cycles=2))
    se = load_safetensors(str(tmp_path / "se" / "snapshots" / "cycle1.safetensors"))
    sd = load_safetensors(str(tmp_path / "sd" / "snapshots" / "cycle1.safetensors"))
    assert_same_tensors(se, sd)
    se2 = load_safetensors(str(tmp_path / "se" / "snapshots" / "cycle2.safetensors"))
    sd2 = load_safetensors(str(tmp_path / "sd" / "snapshots" / "cycle2.safetensors"))
    assert any(not torch.equal(se2[k], sd2[k]) for k in se2)  # the teacher changed cycle 2


def test_ensemble_is_the_mean_of_the_snapshots_softmax(tmp_path):
    trainer, results = train(tiny(tmp_path, method="se", epochs=3, cycles=3, teacher_dtype="bf16",
                                  synthetic_size=[96, 150], eval_batch_size=64))
    probs, labels = [], []
    for slot in range(3):
        module = trainer.teachers.module(slot)
        out = [torch.softmax(module(x.to(trainer.teachers.dtype)).float(), -1)
               for x, _ in trainer.data.test]
        probs.append(torch.cat(out))
    labels = torch.cat([y for _, y in trainer.data.test])

    def errors(p):
        return (100 * (1 - (p.argmax(-1) == labels).float().mean().item()),
                100 * (1 - (p.topk(5, -1).indices == labels[:, None]).any(-1).float().mean()
                       .item()))

    # The members disagree enough that an "ensemble" of one member would show.
    assert all(errors(torch.stack(probs).mean(0)) != errors(p) for p in probs)
    for k, ens in enumerate(results["ensembles"]):
        top1, top5 = errors(torch.stack(probs[:k + 1]).mean(0))
        assert ens["members"] == list(range(1, k + 2))
        assert ens["top1_error"] == pytest.approx(top1, abs=1e-4)
        assert ens["top5_error"] == pytest.approx(top5, abs=1e-4)
    assert results["ensemble"] == results["ensembles"][-1]
    # the store's own ensemble of its half-precision teachers (bf16 probabilities: 1e-2)
    store = trainer.teachers.store
    assert trainer.teachers.half
    x, _ = next(iter(trainer.data.test))
    torch.testing.assert_close(store.ensemble_probs(x.to(trainer.teachers.dtype), [0, 1, 2])
                               .float(), torch.stack([p[:x.shape[0]] for p in probs]).mean(0),
                               atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------- resume
RESUME_ARGS = ["--method", "sd", "--epochs", "4", "--cycle-epochs", "1,1,2", "--synthetic-size",
               "192,48", "--image-size", "16", "--batch-size", "32", "--device", "cpu",
               "--log-every", "1", "--seed", "3", "--no-tensorboard"]


def _run_cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # a plain CPU run, as a user starts it
    return subprocess.Popen([sys.executable, "-m", "fastsd.train"] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _run_cli(RESUME_ARGS + ["--out", str(out)])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return out


def _finish_by_resume(run):
    proc = _run_cli(["--resume", str(run)])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return log


def _assert_same_run(run, reference):
    assert_same_tensors(load_safetensors(str(run / "model.safetensors")),
                        load_safetensors(str(reference / "model.safetensors")))
    for name in ("cycle1", "cycle2", "cycle3"):
        assert_same_tensors(load_safetensors(str(run / "snapshots" / f"{name}.safetensors")),
                            load_safetensors(str(reference / "snapshots" /
                                                 f"{name}.safetensors")))
    a = json.loads((run / "results.json").read_text())
    b = json.loads((reference / "results.json").read_text())
    for key in ("snapshots", "ensemble", "ensembles"):
        assert a[key] == b[key]
    # the metrics log holds each iteration once, as if the run had never stopped
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["iteration"] for r in rows] == list(range(1, 25))


@pytest.mark.parametrize("again", ["resume", "auto-resume"])
def test_kill_and_resume_is_bit_exact(tmp_path, reference_run, again):
    """Continued with --resume DIR, or by the same command again with --auto-resume."""
    run = tmp_path / "run"
    command = RESUME_ARGS + ["--out", str(run)] + (["--auto-resume"] if again == "auto-resume"
                                                   else [])
    proc = _run_cli(command)
    _wait_for(run / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "the run finished before the kill"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 4
    if again == "resume":
        _finish_by_resume(run)
    else:
        proc = _run_cli(command)
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        assert f"resuming at epoch {state['epoch'] + 1}, iteration {state['iteration']}" in log
    _assert_same_run(run, reference_run)


def _tiny_cli(run, epochs, *extra):
    """Command-line arguments of a one-cycle run on 64 synthetic images (2 iterations an epoch)."""
    return ["--epochs", str(epochs), "--cycles", "1", "--synthetic-size", "64,16",
            "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--progress", "none",
            "--no-tensorboard", "--out", str(run), *extra]


def test_command_line_errors_name_what_the_user_did(tmp_path, capsys):
    """Mistakes around --out and --resume get a message about what was given (exit 2), not a
    traceback or a message about a flag the user never passed."""
    import yaml

    from fastsd.train.cli import main

    def fails(argv, *wanted, unwanted=()):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in wanted) and not any(u in err for u in unwanted), err
        assert "Traceback" not in err

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fails(_tiny_cli(blocker / "run", 1), f"--out: cannot create the run directory "
          f"'{blocker / 'run'}'", "choose a folder you can write to")
    run = tmp_path / "run"
    assert main(_tiny_cli(run, 1)) == 0
    capsys.readouterr()
    # An SD run resumed as BL: its cycle settings no longer fit, but what changed is --method.
    fails(["--resume", str(run), "--method", "bl"], "--method differs from the run's config.yaml",
          unwanted=["--cycle-epochs"])
    fails(["--resume", str(run), "--out", str(tmp_path / "elsewhere")], "drop --out")
    if not torch.cuda.is_available():
        config = yaml.safe_load((run / "config.yaml").read_text())
        gpu_run = tmp_path / "gpu-run"
        shutil.copytree(run, gpu_run)
        (gpu_run / "config.yaml").write_text(yaml.safe_dump({**config, "device": "cuda"}))
        fails(["--resume", str(gpu_run)], "config.yaml does not hold on this machine",
              "CUDA is not available", "a machine like the one it started on")
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    fails(["--resume", str(run)], "cannot read checkpoint", "the file is damaged",
          "start the run again with another --out")


def _tiny_image_folder(root):
    """train/ and val/ with classes a and b of 4 small PNGs each."""
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 9, 90)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("mode", ["full", "header"])
def test_check_images_for_dali_refuses_formats_dali_does_not_decode(tmp_path, mode):
    """A GIF named .jpg passes PIL's check (the torch path reads it); for --dali the pre-flight
    names it and what it holds, instead of the run failing on it in the first epoch."""
    from PIL import Image

    from fastsd.data.dali import DALI_IMAGE_FORMATS
    from fastsd.train.preflight import check_image_folder

    _tiny_image_folder(tmp_path / "imgs")
    gif = tmp_path / "imgs" / "train" / "b" / "gif.jpg"
    Image.effect_noise((16, 16), 40).convert("RGB").save(gif, format="GIF")
    assert check_image_folder(str(tmp_path / "imgs"), None, mode, 2) == 17
    with pytest.raises(ValueError, match=f"{gif}.* holds GIF data, which the DALI pipeline does "
                                         f"not decode .*JPEG.*PNG.*: convert it to JPEG"):
        check_image_folder(str(tmp_path / "imgs"), None, mode, 2, formats=DALI_IMAGE_FORMATS)
    gif.unlink()
    assert check_image_folder(str(tmp_path / "imgs"), None, mode, 2,
                              formats=DALI_IMAGE_FORMATS) == 16


def test_check_images_auto_decodes_the_evaluation_split_whole(tmp_path, monkeypatch):
    """auto: a training split above FULL_CHECK_LIMIT images gets header checks, the evaluation
    split is decoded whole (a file cut short there would stop the run at its first evaluation,
    an ImageNet epoch in)."""
    import io

    from PIL import Image

    import fastsd.train.preflight as preflight

    _tiny_image_folder(tmp_path / "imgs")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(jpeg, "JPEG")
    cut = jpeg.getvalue()[:len(jpeg.getvalue()) // 2]               # a whole header, no pixels
    (tmp_path / "imgs" / "train" / "a" / "cut.jpg").write_bytes(cut)   # 9 training images
    monkeypatch.setattr(preflight, "FULL_CHECK_LIMIT", 9)
    with pytest.raises(ValueError, match="train/a/cut.jpg"):
        preflight.check_image_folder(str(tmp_path / "imgs"), None, "auto", 2)
    monkeypatch.setattr(preflight, "FULL_CHECK_LIMIT", 8)
    assert preflight.check_image_folder(str(tmp_path / "imgs"), None, "auto", 2) == 17
    (tmp_path / "imgs" / "val" / "b" / "cut.jpg").write_bytes(cut)
    with pytest.raises(ValueError, match="val/b/cut.jpg"):
        preflight.check_image_folder(str(tmp_path / "imgs"), None, "auto", 2)


def test_which_runs_read_image_files_while_training(tmp_path):
    from fastsd.train.preflight import reads_image_files_while_training as reads

    (tmp_path / "jpegs" / "train").mkdir(parents=True)
    (tmp_path / "binary" / "cifar-10-batches-py").mkdir(parents=True)
    assert reads("imagefolder", str(tmp_path / "jpegs"), dali=False, download=False)
    assert reads("cifar10", str(tmp_path / "jpegs"), dali=True, download=False)
    assert not reads("cifar10", str(tmp_path / "jpegs"), dali=False, download=False)  # in memory
    assert not reads("cifar10", str(tmp_path / "binary"), dali=True, download=False)
    assert not reads("cifar10", str(tmp_path / "jpegs"), dali=True, download=True)
    assert not reads("synthetic", None, dali=True, download=False)


def test_evaluation_images_are_resized_as_the_models_recipe(tmp_path):
    """mnasnet0_75's recipe resizes to 232 before its 224 crop: at 72 px the trainer's test
    images are the centre 72 of a 75-pixel shorter side (0.875's 82 would show a wider view)."""
    import torchvision.transforms as T
    from PIL import Image

    from fastsd.data import IMAGENET_MEAN, IMAGENET_STD

    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "imgs" / split / c)
            Image.effect_noise((120, 90), 60).convert("RGB").save(
                tmp_path / "imgs" / split / c / "0.png")
    cfg = tiny(tmp_path, arch="mnasnet0_75", method="bl", dataset="imagefolder",
               data=str(tmp_path / "imgs"), synthetic_size=None, image_size=72, batch_size=2,
               eval_batch_size=2, workers=0)
    trainer = Trainer(cfg, quiet=True).setup()
    x, _ = next(iter(trainer.data.test))
    tf = T.Compose([T.Resize(75), T.CenterCrop(72), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = tf(Image.open(tmp_path / "imgs" / "val" / "a" / "0.png").convert("RGB"))
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-5)


def _image_folder_cli(tmp_path, check_images):
    """A one-epoch BL run on tmp_path/imgs into tmp_path/run."""
    return ["--method", "bl", "--dataset", "imagefolder", "--data", str(tmp_path / "imgs"),
            "--check-images", check_images, "--epochs", "1", "--batch-size", "8",
            "--image-size", "8", "--workers", "0", "--device", "cpu", "--progress", "none",
            "--no-tensorboard", "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("mode", ["full", "header"])
def test_check_images_names_a_broken_file_before_training(tmp_path, capsys, mode):
    """--check-images opens every file of both splits up front (full decodes it, header reads
    only its header): a file that is no image ends the run with its name before any step; one
    whose header is whole but whose pixels are cut short fails the full check only."""
    import io

    from PIL import Image

    from fastsd.train.cli import main
    from fastsd.train.preflight import check_image_folder

    _tiny_image_folder(tmp_path / "imgs")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(jpeg, "JPEG")
    cut = tmp_path / "imgs" / "val" / "a" / "cut.jpg"
    cut.write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    if mode == "header":
        assert check_image_folder(str(tmp_path / "imgs"), None, "header", 2) == 17
    else:
        with pytest.raises(ValueError, match="cut.jpg"):
            check_image_folder(str(tmp_path / "imgs"), None, "full", 2)
    cut.unlink()
    broken = tmp_path / "imgs" / "val" / "b" / "1.png"
    broken.write_bytes(b"not a png")
    assert main(_image_folder_cli(tmp_path, mode)) == 2
    err = capsys.readouterr().err
    assert f"cannot read image file {str(broken)!r}" in err and "replace or delete" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_an_image_that_breaks_during_training_is_named_with_the_way_on(tmp_path, capsys):
    """With --check-images none a broken file stops the run when it is read: the message names
    it, and since no checkpoint was written yet, it says to start again (not to --resume)."""
    from fastsd.train.cli import main

    _tiny_image_folder(tmp_path / "imgs")
    broken = tmp_path / "imgs" / "train" / "b" / "2.png"
    broken.write_bytes(b"not a png")
    assert main(_image_folder_cli(tmp_path, "none")) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "start the run again (it stopped before its first " \
        "checkpoint)" in err and "--resume" not in err


def test_a_temporary_left_by_a_killed_writer_goes_with_the_next_write(tmp_path):
    """A SIGKILL during a checkpoint write leaves its temporary (a checkpoint's size) behind; the
    next write of that file deletes it, and no other file."""
    from fastsd.train.checkpoint import atomic_write_text

    target = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    other = tmp_path / ".metrics.jsonl.x.tmp"
    for path in (stale, other):
        path.write_text("half a file")
    atomic_write_text(str(target), "whole")
    assert target.read_text() == "whole"
    assert sorted(os.listdir(tmp_path)) == [".metrics.jsonl.x.tmp", "last.pt"]


def test_auto_resume_starts_a_run_afresh_where_no_checkpoint_was_written(tmp_path, capsys):
    """The directory of an attempt killed before its first checkpoint: the rows it logged go."""
    from fastsd.train.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "step", "iteration": 1, "loss": 9.0}\n')
    argv = _tiny_cli(run, 1, "--log-every", "1", "--auto-resume")
    assert main(argv) == 0
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["iteration"] for r in steps] == [1, 2] and steps[0]["loss"] != 9.0
    # finished: a third start resumes after the last epoch and trains nothing more
    assert main(argv) == 0
    assert ("training is complete (1 epoch): evaluating and writing the results again"
            in capsys.readouterr().err)
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")
            if r["kind"] == "step"] == [1, 2]


def test_sigterm_writes_a_checkpoint_mid_epoch_and_resumes_bit_exactly(tmp_path, reference_run):
    run = tmp_path / "run"
    proc = _run_cli(RESUME_ARGS + ["--out", str(run)])
    _wait_for(run / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, log
    assert "--resume" in log
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["batch_in_epoch"] > 0  # a mid-epoch checkpoint: the resume skips its head
    assert state["iteration"] == state["epoch"] * 6 + state["batch_in_epoch"]
    _finish_by_resume(run)
    _assert_same_run(run, reference_run)


class StopAtIteration:
    """Hook: a SIGTERM arrives during iteration ``iteration`` (the handler's flag, set directly)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def on_step_end(self, trainer):
        if trainer.iteration == self.iteration:
            trainer._stop_signal = signal.SIGTERM


def _rows(run, kind):
    """A run's metrics.jsonl rows of one kind, without their timings."""
    timing = ("epoch_time", "images_per_s", "time")
    return [{k: v for k, v in r.items() if k not in timing}
            for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


def _epoch_rows(run):
    return _rows(run, "epoch")


def _resume_to_the_reference(tmp_path):
    """Finish ``tmp_path/run`` with --resume and return its checkpoint from before; its weights
    then equal those of ``tmp_path/reference`` bit for bit, and so do its step and epoch rows
    but for their timings (a stop between two log lines keeps that window's sums)."""
    from fastsd.train.cli import main

    run, reference = tmp_path / "run", tmp_path / "reference"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert main(["--resume", str(run), "--progress", "none"]) == 0
    assert_same_tensors(load_safetensors(str(run / "model.safetensors")),
                        load_safetensors(str(reference / "model.safetensors")))
    for kind in ("step", "epoch"):
        assert _rows(run, kind) == _rows(reference, kind), kind
    return state


def test_deterministic_selects_deterministic_cuda_kernels(monkeypatch):
    """What --deterministic sets for CUDA runs; process-wide flags that need no GPU to read."""
    from fastsd.train.loop import configure_cuda_kernels

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_cuda_kernels(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_float32_matmul_precision() == "highest"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own is kept
        configure_cuda_kernels(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        configure_cuda_kernels(False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        benchmark, deterministic, algorithms, precision = saved
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(algorithms)
        torch.set_float32_matmul_precision(precision)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_stop_resumes_bit_exactly_on_cuda_with_deterministic(tmp_path, amp):
    """README: resume is bit for bit on CUDA with --deterministic (the fp16 run carries the
    GradScaler's state over the stop). The SD teacher of cycle 2 is in play after the stop."""
    from fastsd.train.errors import Interrupted

    settings = dict(device="cuda", amp=amp, deterministic=True, method="sd", epochs=3,
                    cycle_epochs=[1, 2], synthetic_size=[96, 48], log_every=2)
    train(tiny(tmp_path, "reference", **settings))
    with pytest.raises(Interrupted, match="at iteration 5 "):
        train(tiny(tmp_path, "run", **settings), hooks=[StopAtIteration(5)])
    assert _resume_to_the_reference(tmp_path)["iteration"] == 5


@pytest.mark.parametrize("stop", [2, 3, 4, 5, 6, 7], ids=lambda i: f"iteration{i}")
def test_a_stop_anywhere_resumes_to_the_same_run_and_epoch_rows(tmp_path, stop):
    """3 iterations an epoch, a line logged at every even iteration, cycles of 1 and 2 epochs: a
    stop right after a log line (2, 4), at an epoch's last step (3, also a cycle's and in the
    middle of a window; 6), and in the middle of a log window (5, 7: the row logged at 6 or 8
    covers the steps before the stop too). The resumed run logs the rows of the run that never
    stopped, not rows of the steps after the resume."""
    from fastsd.train.errors import Interrupted

    settings = dict(method="sd", epochs=5, cycle_epochs=[1, 2, 2], synthetic_size=[96, 48],
                    log_every=2)
    train(tiny(tmp_path, "reference", **settings))
    with pytest.raises(Interrupted, match=f"at iteration {stop} "):
        train(tiny(tmp_path, "run", **settings), hooks=[StopAtIteration(stop)])
    assert _resume_to_the_reference(tmp_path)["iteration"] == stop
    assert len(_epoch_rows(tmp_path / "run")) == 5


@pytest.mark.parametrize("stop", [2, 4])
def test_accumulated_passes_make_an_iteration_and_a_stop_resumes_between_them(tmp_path, stop,
                                                                              monkeypatch):
    """--grad-accum-steps 2 on batches of 16: 112 images are 7 batches, 3 updates an epoch, the
    7th batch left out like a partial batch. Stops after iteration 2 (mid-epoch: the resume skips
    4 batches) and 4 resume to the run that never stopped."""
    from fastsd.train.errors import Interrupted
    from fastsd.train.step import TrainStep

    passes = []
    forward_and_backward = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, images, labels: (
        passes.append(images.shape[0]), forward_and_backward(self, images, labels))[1])
    settings = dict(method="sd", epochs=5, cycle_epochs=[1, 2, 2], synthetic_size=[112, 48],
                    batch_size=16, grad_accum_steps=2, log_every=2)
    trainer, results = train(tiny(tmp_path, "reference", **settings))
    assert trainer.plan.iters_per_epoch == 3 and results["snapshots"][-1]["iteration"] == 15
    assert passes == [16] * 30  # 5 epochs x 3 updates x 2 passes
    with pytest.raises(Interrupted, match=f"at iteration {stop} "):
        train(tiny(tmp_path, "run", **settings), hooks=[StopAtIteration(stop)])
    state = _resume_to_the_reference(tmp_path)
    assert (state["iteration"], state["batch_in_epoch"]) == (stop, stop % 3)


class Crash(BaseException):
    """Stands for a SIGKILL: nothing in the trainer catches it, so no checkpoint is written."""


class CrashAtIteration:
    def __init__(self, iteration):
        self.iteration = iteration

    def on_step_end(self, trainer):
        if trainer.iteration == self.iteration:
            raise Crash


@pytest.mark.parametrize("crash, saved", [(5, 4), (9, 8)])
def test_periodic_checkpoints_inside_an_epoch_resume_to_the_same_run(tmp_path, crash, saved):
    """3 iterations an epoch, a checkpoint every 4 steps: at iteration 4 (epoch 2, batch 1) and
    8 (epoch 3, batch 2), besides each epoch's end. A crash that writes nothing loses only the
    steps since the last of them."""
    settings = dict(method="sd", epochs=5, cycle_epochs=[1, 2, 2], synthetic_size=[96, 48],
                    log_every=2, checkpoint_every=4)
    train(tiny(tmp_path, "reference", **settings))
    with pytest.raises(Crash):
        train(tiny(tmp_path, "run", **settings), hooks=[CrashAtIteration(crash)])
    state = _resume_to_the_reference(tmp_path)
    assert (state["iteration"], state["batch_in_epoch"]) == (saved, saved % 3)
    # the checkpoints follow log lines, so every step and epoch row is the uninterrupted run's,
    # exactly
    for kind in ("step", "epoch"):
        assert _rows(tmp_path / "run", kind) == _rows(tmp_path / "reference", kind)
    assert [r["iteration"] for r in _rows(tmp_path / "run", "step")] == list(range(2, 16, 2))


def test_tensorboard_after_a_crash_and_resume_holds_each_point_once(tmp_path):
    """TensorBoard's events after a crash (at 9; checkpoint at 8) and a resume: the killed
    attempt's points after the checkpoint are purged, the checkpoint's own (the step row at 8)
    kept, so every scalar has the uninterrupted run's steps, each once. All on the iteration
    axis: an epoch's and a snapshot's points sit at the iteration that ended them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = dict(method="sd", epochs=5, cycle_epochs=[1, 2, 2], synthetic_size=[96, 48],
                    log_every=2, checkpoint_every=4, tensorboard=True)
    train(tiny(tmp_path, "reference", **settings))
    with pytest.raises(Crash):
        train(tiny(tmp_path, "run", **settings), hooks=[CrashAtIteration(9)])
    assert _resume_to_the_reference(tmp_path)["iteration"] == 8

    def steps(run, tag):
        events = EventAccumulator(str(tmp_path / run / "tensorboard")).Reload()
        return [e.step for e in events.Scalars(tag)]

    for tag, expected in (("train/loss", list(range(2, 16, 2))),
                          ("epoch/loss", [3, 6, 9, 12, 15]), ("snapshot/top1_error", [3, 9, 15])):
        assert steps("reference", tag) == expected, tag
        assert steps("run", tag) == expected, tag


# ------------------------------------------------------------------------------------- faults
def test_profile_records_the_iterations_after_the_first_six(tmp_path):
    """--profile 2: iterations 7 and 8 (after 5 left out and 1 of warm-up), as trace spans
    ProfilerStep#6 and #7 holding the step's convolutions, and the operators' table."""
    cfg = tiny(tmp_path, method="sd", epochs=3, cycles=3, profile=2)  # 9 iterations
    train(cfg)
    folder = tmp_path / "run" / "profile"
    trace = json.loads((folder / "trace.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert sorted({n for n in names if n.startswith("ProfilerStep")}) == ["ProfilerStep#6",
                                                                         "ProfilerStep#7"]
    assert "aten::convolution_backward" in names
    table = (folder / "operators.txt").read_text()
    assert table.startswith("2 training iterations after 6, by self_cpu_time_total")
    assert "aten::convolution_backward" in table


def test_profile_of_a_run_shorter_than_the_record_says_what_it_holds(tmp_path, capsys):
    """A record cut short by the run's end holds the iterations there were, the last one's span
    ending with it (not with the evaluation after it), and says so; a run that ends before the
    record begins says that nothing was recorded."""
    train(tiny(tmp_path, method="sd", epochs=3, cycles=1, profile=10))  # 9 iterations
    folder = tmp_path / "run" / "profile"
    trace = json.loads((folder / "trace.json").read_text())
    spans = {e["name"]: e["dur"] for e in trace["traceEvents"]
             if e.get("name", "").startswith("ProfilerStep")}
    assert sorted(spans) == ["ProfilerStep#6", "ProfilerStep#7", "ProfilerStep#8"]
    # the last span is one iteration long, as the one before it (not also the final evaluation)
    assert spans["ProfilerStep#8"] < 3 * spans["ProfilerStep#7"]
    assert (folder / "operators.txt").read_text().startswith(
        "3 training iterations after 6 (the run ended before the 10 asked for)")
    from fastsd.train.cli import main

    assert main(["--epochs", "1", "--synthetic-size", "96,48", "--batch-size", "32",
                 "--device", "cpu", "--progress", "none", "--no-tensorboard", "--profile", "2",
                 "--out", str(tmp_path / "short")]) == 0
    assert "--profile: nothing recorded: this run trained 3 iteration(s) and the record starts " \
           "after the first 6" in capsys.readouterr().err
    assert not (tmp_path / "short" / "profile").exists()


def test_a_console_closed_early_does_not_end_the_run(tmp_path):
    """`python -m fastsd.train ... 2>&1 | head -1`: the messages stop, the training does not
    (it used to end at the next line with a BrokenPipeError and no checkpoint)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the C++ loss: quick
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastsd.train", "--epochs", "3",
                             "--synthetic-size", "256,64", "--progress", "plain", "--log-every",
                             "1", "--no-tensorboard", "--device", "cpu", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout.readline().startswith(b"fastsd.train: sd resnet20")
    proc.stdout.close()  # the reader goes away, as head does after its line
    assert proc.wait(timeout=300) == 0
    assert json.loads((run / "results.json").read_text())["snapshots"]


def test_a_full_disk_stops_the_run_with_the_last_checkpoint_intact(tmp_path, capsys,
                                                                    monkeypatch):
    """The second checkpoint (epoch 2's) meets a full disk: exit status 4, a message that names
    the file and the cause, epoch 1's checkpoint as it was, no temporary file left behind."""
    import errno

    from fastsd.train.cli import main

    save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    argv = _tiny_cli(run, 2)
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert f"cannot write {run / 'checkpoints' / 'last.pt'}: No space left on device" in err
    assert "is intact" in err and f"then continue with --resume {run}" in err
    monkeypatch.setattr(torch, "save", save)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (1, 2)
    assert os.listdir(run / "checkpoints") == ["last.pt"]


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    class Poison:
        def on_step_end(self, trainer):
            if trainer.iteration == 4:  # in epoch 2 (3 iterations per epoch)
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))

    cfg = tiny(tmp_path, method="sd", epochs=3, cycles=3, max_nonfinite=2)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row") as exc:
        train(cfg, hooks=[Poison()])
    assert "last good checkpoint" in str(exc.value)
    # the advice is one the command line takes (--resume would refuse a changed --lr)
    run = str(tmp_path / "run")
    assert f"start a new run with --config {run} --out NEW_DIR" in str(exc.value)
    from fastsd.train.cli import config_from_args

    assert config_from_args(["--config", run, "--out", str(tmp_path / "new"), "--lr",
                             "0.01"]).lr == 0.01
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())
    # and the command line says so with a non-zero status
    from fastsd.train.errors import NonFiniteLossError as E

    assert E.exit_code != 0


def test_nonfinite_steps_are_skipped_on_device():
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = build_optimizer(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                          wd_norm_bias=False)
    step = TrainStep(model, opt, device="cpu", amp="none", num_classes=3)
    step.set_stage(LossSpec(), None)
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    step(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    step(torch.full_like(x, float("inf")), y)  # a non-finite loss: no update at all
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(m, opt.state[p]["momentum_buffer"])
               for m, p in zip(momentum, model.parameters()))
    m = step.read_metrics()
    assert m["steps"] == 2 and m["nonfinite"] == 1 and m["max_nonfinite_run"] == 1
    assert m["skipped"] == 1
    assert m["loss"] == pytest.approx(m["ce"])
    step(torch.full_like(x, float("inf")), y)  # a window of bad steps only has no mean loss
    m = step.read_metrics()
    assert m["steps"] == m["nonfinite"] == 1 and math.isnan(m["loss"]) and math.isnan(m["ce"])


@pytest.mark.parametrize("accum", [1, 2])
def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(accum):
    """One inf pixel makes the forward's batch statistics non-finite. The skipped update must
    leave BatchNorm's running mean, variance and count as they were before the update's first
    pass (else every later evaluation, snapshot and teacher is NaN), and training goes on."""
    torch.manual_seed(0)
    model = TinyNet()
    step = _plain_sgd_step(model, grad_accum_steps=accum)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(4)]
    step(*batches[0])
    if accum == 2:
        step(*batches[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = batches[2][0].clone()
    poisoned[0, 0, 0, 0] = float("inf")
    if accum == 2:
        step(*batches[3])      # a good first pass: its statistics go too, with the update
    step(poisoned, batches[2][1])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])]
    assert step.read_metrics()["skipped"] == 1
    for _ in range(accum):
        step(*batches[3])
    assert torch.isfinite(model.bn.running_var).all()
    assert not torch.equal(model.bn.running_var, before["bn.running_var"])
    assert int(model.bn.num_batches_tracked) == int(before["bn.num_batches_tracked"]) + accum
    model.eval()
    assert torch.isfinite(model(batches[0][0])).all()


def _plain_sgd_step(model, amp="none", device="cpu", clip_grad_norm=None, grad_accum_steps=1):
    """A TrainStep with plain CE and SGD at lr 1 without momentum or weight decay: its update is
    minus the (clipped) gradient."""
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer

    opt = build_optimizer(model, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
                          wd_norm_bias=True)
    step = TrainStep(model, opt, device=device, amp=amp, num_classes=3,
                     clip_grad_norm=clip_grad_norm, grad_accum_steps=grad_accum_steps)
    step.set_stage(LossSpec(), None)
    return step


def _clipped_update(model, x, y, bound):
    """The weights after one such step, in float64: the cross-entropy's gradient, scaled by
    bound / (its global L2 norm) where that is below 1."""
    import copy

    reference = copy.deepcopy(model).double()
    nn.functional.cross_entropy(reference(x.double()), y).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    scale = min(1.0, bound / norm)
    return [p.detach() - scale * g for p, g in zip(reference.parameters(), grads)], scale


@pytest.mark.parametrize("bound", [0.05, 1e6])
def test_clip_grad_norm_scales_the_update_down_to_the_bound(bound):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    expected, scale = _clipped_update(model, x, y, bound)
    assert scale < 0.2 if bound < 1 else scale == 1  # both cases are what they claim to be
    step = _plain_sgd_step(model, clip_grad_norm=bound)
    step(x, y)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7)
    assert step.read_metrics()["clipped"] == (scale < 1)
    before = [p.detach().clone() for p in model.parameters()]
    step(torch.full_like(x, float("inf")), y)  # clipping does not hide a non-finite gradient
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    m = step.read_metrics()
    assert m["skipped"] == 1 and m["clipped"] == 0


@pytest.mark.parametrize("bound", [None, 0.05])
def test_accumulated_passes_update_as_one_pass_over_all_their_images(bound):
    """--grad-accum-steps 2: two passes of 8 images, then one update, the float64 update of the
    mean cross-entropy over the 16 images (clipped as a whole)."""
    class Wrapper(nn.Sequential):
        """Stands for DDP: records the passes that ran under no_sync (no all-reduce)."""

        unsynced = 0

        @contextlib.contextmanager
        def no_sync(self):
            Wrapper.unsynced += 1
            yield

    torch.manual_seed(0)
    model = Wrapper(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(16, 3, 2, 2), torch.randint(0, 3, (16,))
    expected, scale = _clipped_update(model, x, y, bound or math.inf)
    step = _plain_sgd_step(model, clip_grad_norm=bound, grad_accum_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    step(x[:8], y[:8])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update yet
    assert Wrapper.unsynced == 1
    with pytest.raises(RuntimeError, match="between the 1 accumulated passes"):
        step.state_dict()  # a checkpoint would lose the first pass's gradient
    step(x[8:], y[8:])
    assert Wrapper.unsynced == 1  # the last pass of an update all-reduces
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7)
    m = step.read_metrics()
    assert (m["steps"], m["skipped"], m["clipped"]) == (2, 0, int(scale < 1))
    # one non-finite pass spoils its update, which is skipped (once) and counted per pass
    before = [p.detach().clone() for p in model.parameters()]
    step(torch.full_like(x[:8], float("inf")), y[:8])
    step(x[8:], y[8:])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    m = step.read_metrics()
    assert (m["steps"], m["nonfinite"], m["skipped"], m["clipped"]) == (2, 1, 1, 0)
    assert all(p.grad is None for p in model.parameters())  # the next update starts afresh


# The trainer refuses fp16 on a CPU (too slow there), but TrainStep's GradScaler path runs on one:
# these checks then run on every machine, and on CUDA where there is one.
FP16_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", FP16_DEVICES)
def test_accumulated_passes_under_fp16_update_as_one_pass(device):
    """The GradScaler's scale multiplies every pass's loss and is taken off once, at the update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(device)
    x, y = torch.randn(16, 3, 2, 2).to(device), torch.randint(0, 3, (16,)).to(device)
    expected, _ = _clipped_update(model, x, y, math.inf)
    step = _plain_sgd_step(model, amp="fp16", device=device, grad_accum_steps=2)
    step(x[:8], y[:8])
    step(x[8:], y[8:])
    assert step.scaler.get_scale() == 65536.0  # not skipped
    for p, e in zip(model.parameters(), expected):  # the forward ran in float16
        torch.testing.assert_close(p.detach().double(), e, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("device", FP16_DEVICES)
def test_clip_grad_norm_bounds_the_unscaled_gradient_under_fp16(device):
    """Under fp16 the GradScaler multiplies the loss by 65536: the bound must apply to the
    gradient after unscaling, or it would clip every step to almost nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(device)
    # drawn on the CPU, as in the test above: the largest scaled gradient is then 24 800, which
    # float16 holds, so the scaler does not skip this step
    x, y = torch.randn(8, 3, 2, 2).to(device), torch.randint(0, 3, (8,)).to(device)
    expected, scale = _clipped_update(model, x, y, 0.05)
    assert scale < 0.2
    step = _plain_sgd_step(model, amp="fp16", device=device, clip_grad_norm=0.05)
    step(x, y)
    assert step.scaler.get_scale() == 65536.0  # not skipped (a skip halves the scale)
    for p, e in zip(model.parameters(), expected):  # the forward ran in float16
        torch.testing.assert_close(p.detach().double(), e, rtol=2e-3, atol=2e-4)


def test_a_finite_loss_with_a_nonfinite_gradient_is_a_skipped_step():
    """sqrt(|g(x)|) is finite at g(x) = 0, its gradient is not: no update, counted as skipped,
    and the run of such steps is what --max-nonfinite bounds (the loss alone never stops it).
    The skipped update leaves BatchNorm's statistics too (under DDP such a skip may come from
    another process's batch, whose loss this process never saw)."""
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer

    class SqrtNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(12)
            self.fc = nn.Linear(12, 3)
            self.g = nn.Linear(12, 1, bias=False)

        def forward(self, x):
            h = x.flatten(1)
            return self.fc(self.bn(h)) + torch.sqrt(self.g(h).abs())

    torch.manual_seed(0)
    model = SqrtNet()
    opt = build_optimizer(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                          wd_norm_bias=False)
    step = TrainStep(model, opt, device="cpu", amp="none", num_classes=3)
    step.set_stage(LossSpec(), None)
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    step(x, y)                                   # a good step
    before = [t.detach().clone() for t in model.state_dict().values()]
    bad = torch.zeros_like(x)                    # g(0) = 0: loss finite, d/dg.weight NaN
    for _ in range(3):
        step(bad, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    m = step.read_metrics()
    assert m["steps"] == 4 and m["nonfinite"] == 0 and math.isfinite(m["loss"])
    assert m["skipped"] == 3 and m["max_nonfinite_run"] == 3
    step(x, y)                                   # a good step ends the run
    m = step.read_metrics()
    assert m["skipped"] == 0 and m["max_nonfinite_run"] == 3   # the run that was still going on
    step(x, y)
    assert step.read_metrics()["max_nonfinite_run"] == 0


# --------------------------------------------------------------------------- the step itself
class TinyNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _tiny_steps(compile, spec, teacher, n=3, amp="none"):
    """(model, its TrainStep) after n steps on random batches."""
    from fastsd.train.step import TrainStep, build_optimizer

    torch.manual_seed(0)
    model = TinyNet()
    opt = build_optimizer(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          wd_norm_bias=False)
    step = TrainStep(model, opt, device="cpu", amp=amp, num_classes=5, compile=compile)
    step.set_stage(spec, teacher)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        step(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))
    return model, step


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_follow_the_fp32_step(amp):
    """The AMP paths of the step (autocast, and for fp16 the GradScaler handing its scale and
    found_inf to the fused SGD kernel) run on the CPU too: same training as fp32, to low-precision
    tolerance, and a non-finite fp16 step is skipped on device with the loss scale halved."""
    from fastsd.train.schedule import LossSpec

    torch.manual_seed(2)
    teacher_net = TinyNet().eval().requires_grad_(False)
    spec = LossSpec(ce_weight=1.5, kd_weight=1.0, temperature=2.0, teacher=0)
    full, full_step = _tiny_steps(False, spec, teacher_net)
    m_full = full_step.read_metrics()
    mixed, step = _tiny_steps(False, spec, teacher_net, amp=amp)
    for a, b in zip(full.parameters(), mixed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=5e-3)
    before = [p.detach().clone() for p in mixed.parameters()]
    stats = [b.clone() for b in mixed.buffers()]
    scale = step.scaler.get_scale() if step.scaler is not None else None
    step(torch.full((16, 3, 8, 8), float("inf")), torch.zeros(16, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(before, mixed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(stats, mixed.buffers()))
    m = step.read_metrics()
    assert m["steps"] == 4 and m["nonfinite"] == 1
    assert m["loss"] == pytest.approx(m_full["loss"], rel=1e-2)
    if amp == "fp16":
        assert step.scaler.get_scale() == scale / 2
    else:
        assert step.scaler is None


def test_compiled_step_runs_on_cpu_and_matches_eager():
    from fastsd.train.schedule import LossSpec

    torch.manual_seed(2)
    teacher_net = TinyNet().eval().requires_grad_(False).to(torch.bfloat16)

    def teacher(images):
        return teacher_net(images.to(torch.bfloat16))

    spec = LossSpec(ce_weight=1.5, kd_weight=1.0, temperature=2.0, teacher=0)
    eager, eager_step = _tiny_steps(False, spec, teacher)
    m_eager = eager_step.read_metrics()
    torch._dynamo.reset()
    compiled, compiled_step = _tiny_steps(True, spec, teacher)
    m_comp = compiled_step.read_metrics()
    assert m_comp["steps"] == 3 and m_comp["kl"] > 0
    for key in ("loss", "ce", "kl"):
        assert m_comp[key] == pytest.approx(m_eager[key], rel=1e-4, abs=1e-5)
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The compiled forward updates BatchNorm's statistics in place too, and a non-finite one is
    # put back all the same.
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    compiled_step(torch.full((16, 3, 8, 8), float("inf")), torch.zeros(16, dtype=torch.long))
    assert all(torch.equal(v, compiled.state_dict()[k]) for k, v in before.items())


def test_label_smoothing_has_the_gradient_of_smoothed_cross_entropy():
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 7, (10,))
    step = TrainStep(model, build_optimizer(model, lr=0.0 + 1e-9, momentum=0.0, nesterov=False,
                                            weight_decay=0.0, wd_norm_bias=True),
                     device="cpu", amp="none", num_classes=7)
    step.set_stage(LossSpec(ce_weight=1.0, label_smoothing=0.2), None)
    loss = step._forward(x, y, None, step.metrics)
    loss.backward()
    nn.functional.cross_entropy(ref(x), y, label_smoothing=0.2).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_model_safetensors_loads_into_the_torchvision_model(tmp_path):
    import torchvision

    cfg = tiny(tmp_path, method="bl", arch="resnet18", epochs=1, batch_size=16,
               synthetic_size=[32, 16], eval_batch_size=16)
    train(cfg)
    model = torchvision.models.resnet18(num_classes=10)
    state = load_safetensors(str(tmp_path / "run" / "model.safetensors"))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------- command line
def test_command_line_runs_prints_the_table_and_refuses_changed_settings_on_resume(tmp_path,
                                                                                   capsys):
    from fastsd.train.cli import main

    run = tmp_path / "bl"
    args = ["--method", "bl", "--epochs", "1", "--synthetic-size", "64,32", "--image-size", "8",
            "--batch-size", "32", "--device", "cpu", "--progress", "plain", "--out", str(run)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "| run | error (%) | final | best | ensemble |" in out
    assert "fastsd.train: bl resnet20 on synthetic" in err and "epoch 1/1" in err
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    # the same run again is refused, a resumed run keeps its settings
    assert main(args) == 2
    assert "holds a finished run (results.json); choose another --out" in capsys.readouterr().err
    assert main(["--resume", str(run), "--lr", "0.5", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "--epochs" in err and "keeps its settings" in err
    # resuming a finished run only re-reports it
    assert main(["--resume", str(run), "--progress", "none"]) == 0
    assert "| run | error (%) |" in capsys.readouterr().out
    # a finished run directory is a KD teacher
    kd = tmp_path / "kd"
    assert main(["--method", "kd", "--teacher-checkpoint", str(run), "--epochs", "1",
                 "--synthetic-size", "64,32", "--image-size", "8", "--batch-size", "32",
                 "--device", "cpu", "--progress", "none", "--no-tensorboard", "--out",
                 str(kd)]) == 0
    assert json.loads((kd / "results.json").read_text())["method"] == "kd"


# ----------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_step_has_no_host_sync(amp):
    from fastsd.models import create_model
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer
    from fastsd.train.teachers import Teachers

    cl = torch.channels_last
    model = create_model("resnet20", 10).cuda().to(memory_format=cl)
    opt = build_optimizer(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          wd_norm_bias=False)
    step = TrainStep(model, opt, device="cuda", amp=amp, num_classes=10)
    teachers = Teachers(model, 1, "fp16", "cuda")
    teachers.capture(model, 0)
    step.set_stage(LossSpec(ce_weight=1.5, kd_weight=1.0, temperature=2.0, teacher=0),
                   teachers.forward(0))
    x = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=cl)
    y = torch.randint(0, 10, (32,), device="cuda")
    step(x, y)  # first call: allocations, kernel selection
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    m = step.read_metrics()
    assert m["steps"] == 4 and m["nonfinite"] == 0 and m["kl"] > 0


@pytest.mark.gpu
def test_compiled_step_is_captured_as_cuda_graphs():
    """--compile-mode reduce-overhead: the student's step runs as CUDA graphs (nothing makes
    inductor skip them, e.g. the metrics it adds into in place) and trains as the eager step."""
    from torch._dynamo.utils import counters

    from fastsd.models import create_model
    from fastsd.train.schedule import LossSpec
    from fastsd.train.step import TrainStep, build_optimizer
    from fastsd.train.teachers import Teachers

    spec = LossSpec(ce_weight=1.5, kd_weight=1.0, temperature=2.0, teacher=0)
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = create_model("resnet20", 10).cuda()
        opt = build_optimizer(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                              wd_norm_bias=False)
        step = TrainStep(model, opt, device="cuda", amp="bf16", num_classes=10, compile=compile,
                         compile_mode="reduce-overhead")
        teachers = Teachers(model, 1, "fp16", "cuda")
        teachers.capture(model, 0)
        step.set_stage(spec, teachers.forward(0))
        torch._dynamo.reset()
        counters.clear()
        for _ in range(5):
            step(x, y)
        results.append(step.read_metrics())
        if compile:
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    eager, compiled = results
    assert compiled["steps"] == 5 and compiled["nonfinite"] == 0
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_sd_end_to_end_on_cuda(tmp_path, amp):
    trainer, results = train(tiny(tmp_path, device="cuda", amp=amp, method="sd", epochs=2,
                                  cycles=2, channels_last=True, deterministic=True))
    assert trainer.teachers.dtype == torch.float16
    assert len(results["snapshots"]) == 2 and results["ensemble"] is not None
    peaks = [r["max_memory_gib"] for r in _epoch_rows(tmp_path / "run")]
    assert len(peaks) == 2 and all(0 < p < torch.cuda.get_device_properties(0).total_memory
                                   / 2 ** 30 for p in peaks)


def test_a_fresh_generation_learns_under_its_teacher(tmp_path):
    """Regression: generation 1 of BAN starts from fresh weights under a teacher. With SD's
    λ_S = 1 + 1/T and no warm-up it diverged to chance on this data; the ban/tt defaults
    (λ_S = 1, one warm-up epoch per generation) must let it learn.

    The quick demo's data and batch (2048 images, 64 a batch): generation 1 reaches about 50 %
    error here, and 90 % with λ_S = 1.5 and no warm-up. With 1024 images in batches of 32 its
    error swung between 69 % and 90 % with the seed, the teacher precision and the CPU."""
    cfg = tiny(tmp_path, method="ban", generations=1, epochs=3, synthetic_size=[2048, 256],
               batch_size=64, log_every=50)
    assert cfg.lambda_s == 1.0 and cfg.warmup_epochs == 1.0
    _, results = train(cfg)
    chance = 90.0
    for generation in results["snapshots"]:
        assert generation["top1_error"] < chance - 15, results["snapshots"]


def test_secondary_meter_against_numpy_and_independent_of_batching():
    """Top-1..4 confidences and the second-class confusion match a float64 numpy reference, and
    collecting the same logits in batches of 7 or of 500 gives the same means to float64
    rounding (a float32 running sum moved them in the 7th digit: --eval-batch-size may change
    only how a run is fed)."""
    import numpy as np

    from fastsd.train.step import SecondaryMeter

    g = torch.Generator().manual_seed(3)
    n, C = 500, 10
    logits = torch.randn(n, C, generator=g) * 4
    labels = torch.randint(0, C, (n,), generator=g)
    labels[:5] = -100                      # ignored rows: counted in the confidences only

    z = logits.double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, axis=1)
    want_conf = np.take_along_axis(p, order[:, :4], 1).mean(0)
    want_second = np.zeros((C, C), dtype=np.int64)
    for y, c in zip(labels.numpy(), order[:, 1]):
        if 0 <= y < C:
            want_second[y, c] += 1

    means = []
    for batch in (7, 500):
        meter = SecondaryMeter("cpu", C)
        for lo in range(0, n, batch):
            meter(logits[lo:lo + batch], labels[lo:lo + batch])
        means.append(meter.mean())
        np.testing.assert_allclose(means[-1], want_conf, rtol=1e-6)
        np.testing.assert_array_equal(meter.second_confusion().numpy(), want_second)
    np.testing.assert_allclose(means[0], means[1], rtol=1e-14, atol=0)
    # two classes: two confidences, not two more of 0 for classes that do not exist
    two = SecondaryMeter("cpu", 2)
    two(logits[:, :2], labels.clamp(-100, 1))
    np.testing.assert_allclose(two.mean(), np.sort(torch.softmax(logits[:, :2].double(), -1)
                                                   .numpy(), 1)[:, ::-1].mean(0), rtol=1e-6)
