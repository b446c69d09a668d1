"""The trainer's configuration, schedules, stage plans and bad input (fast: no training)."""

import math
import os
import sys

import pytest
import torch

from fastsd import distill_loss
from fastsd.train import TrainConfig
from fastsd.train.cli import build_parser, config_from_args, main
from fastsd.train.config import ConfigError, dump_yaml, load_yaml
from fastsd.train.schedule import build_plan, cosine_lr

CPU = dict(device="cpu", progress="none", tensorboard=False)


# ------------------------------------------------------------------------------------- defaults
def test_defaults_resolve_to_a_short_sd_demo_on_cpu():
    cfg = TrainConfig(device="cpu")
    assert (cfg.method, cfg.arch, cfg.dataset) == ("sd", "resnet20", "synthetic")
    assert cfg.cycles == 3 and cfg.cycle_epochs == [2, 2, 2] and cfg.epochs == 6
    assert cfg.image_size == 16 and cfg.batch_size == 64 and cfg.synthetic_size == [2048, 500]
    from fastsd.train.config import _cpu_has_bf16

    # bf16 autocast where the CPU runs bf16 natively (AMX / AVX-512 BF16), as on CUDA
    assert cfg.amp == ("bf16" if _cpu_has_bf16() else "none")
    assert cfg.channels_last is True and cfg.workers == 0
    assert cfg.teacher_dtype in ("bf16", "fp32")
    # SD's asymmetric form: student temperature 1, no T², λ_S = 1 + 1/T, λ_T = 1.
    assert cfg.student_temperature == 1.0 and cfg.t2_scaling is False
    assert cfg.lambda_s == pytest.approx(1.5) and cfg.lambda_t == 1.0


def test_method_dependent_defaults():
    kd = TrainConfig(method="kd", teacher_checkpoint="x", temperature=4, **CPU)
    assert kd.student_temperature == 4 and kd.t2_scaling and kd.lambda_s == 1.0
    assert kd.teacher_arch == kd.arch and kd.cycles == 1
    # kept absolute, so that a resume started from another directory finds the teacher
    assert kd.teacher_checkpoint == os.path.join(os.getcwd(), "x")
    cifar = TrainConfig(dataset="cifar100", data="/nowhere", **CPU)
    assert cifar.epochs == 300 and cifar.cycle_epochs == [75] * 4
    imnet = TrainConfig(dataset="imagefolder", data="/x", arch="resnet50", **CPU)
    assert imnet.epochs == 90 and imnet.cycle_epochs == [45, 45] and imnet.weight_decay == 1e-4
    assert TrainConfig(method="bl", **CPU).generations == 0
    assert TrainConfig(method="tt", **CPU).total_epochs == 3 * TrainConfig(method="tt",
                                                                           **CPU).epochs


def test_auto_image_size_is_the_models_on_image_folders():
    """A folder is cropped to what the model was designed for, not a fixed 224: a CIFAR ResNet
    on a folder of CIFAR JPEGs trains at 32 px (at 224 it ran ~50x the arithmetic)."""
    def size(**kw):
        return TrainConfig(**kw, **CPU).image_size

    assert size(dataset="imagefolder", data="/x", arch="resnet20") == 32
    assert size(dataset="imagefolder", data="/x", arch="resnet50") == 224
    assert size(dataset="imagefolder", data="/x", arch="inception_v3") == 299
    assert size(dataset="imagefolder", data="/x", arch="resnet20", image_size=64) == 64
    assert size(dataset="synthetic", arch="resnet56") == 16             # the quick demo's
    assert size(dataset="synthetic", arch="resnet50") == 32             # past an ImageNet stem
    assert size(dataset="cifar10", data="/x", arch="resnet50") is None  # the data set's 32


def test_auto_learning_rate_follows_the_linear_rule_for_imagenet_models():
    """0.1 for the CIFAR models; 0.1 per 256 images of the global batch for torchvision ones."""
    assert TrainConfig(**CPU).lr == 0.1                                   # resnet20, batch 64
    assert TrainConfig(arch="resnet18", **CPU).lr == pytest.approx(0.025)  # batch 64
    imnet = TrainConfig(dataset="imagefolder", data="/x", arch="resnet50", **CPU)
    assert imnet.batch_size == 256 and imnet.lr == pytest.approx(0.1)
    assert TrainConfig(arch="resnet50", batch_size=512, **CPU).lr == pytest.approx(0.2)
    # an update's batch: 64 images x 4 accumulated passes
    accum = TrainConfig(arch="resnet50", batch_size=64, grad_accum_steps=4, **CPU)
    assert accum.global_batch_size == 256 and accum.lr == pytest.approx(0.1)
    assert TrainConfig(arch="resnet50", lr=0.3, **CPU).lr == 0.3          # given: used as is


def test_cycles_leftover_epochs_go_to_the_last_cycle():
    assert TrainConfig(epochs=10, cycles=3, **CPU).cycle_epochs == [3, 3, 4]
    assert TrainConfig(epochs=10, cycle_epochs=[4, 2], **CPU).cycle_epochs == [4, 6]
    cfg = TrainConfig(cycle_epochs="150,50,50,50", **CPU)  # a string, as YAML or a flag gives it
    assert cfg.epochs == 300 and cfg.cycles == 4 and cfg.cycle_epochs == [150, 50, 50, 50]


def test_yaml_round_trip_and_flag_precedence(tmp_path):
    cfg = TrainConfig(method="se", epochs=8, cycles=4, lr=0.05, **CPU)
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, str(path))
    text = path.read_text()
    assert "# peak learning rate" in text and "lambda_s: 1.0" in text  # se: no teacher
    assert TrainConfig(**load_yaml(str(path))[0]) == cfg
    # flags override the file
    again = config_from_args(["--config", str(path), "--lr", "0.2"])
    assert again.lr == 0.2 and again.method == "se" and again.cycle_epochs == [2, 2, 2, 2]


def test_a_run_config_read_with_config_resolves_its_auto_settings_again(tmp_path):
    """config.yaml lists what was auto: --config resolves it from the new flags (a changed
    temperature moves λ_S, another method drops the cycles), while what was given stays."""
    path = str(tmp_path / "config.yaml")
    sd = TrainConfig(method="sd", epochs=6, temperature=2.0, lr=0.05, **CPU)
    dump_yaml(sd, path)
    text = (tmp_path / "config.yaml").read_text()
    assert "\nauto_resolved: [" in text and "lambda_s" in text.rsplit("\n", 2)[-2]
    assert config_from_args(["--config", path]) == sd  # the same run, nothing changed
    hotter = config_from_args(["--config", path, "--temperature", "4"])
    assert hotter.lambda_s == pytest.approx(1 + 1 / 4) and hotter.lr == 0.05
    assert config_from_args(["--config", path, "--epochs", "9"]).cycle_epochs == [3, 3, 3]
    bl = config_from_args(["--config", path, "--method", "bl"])  # sd's cycles were auto
    assert bl.cycles == 1 and bl.lambda_s == 1.0
    ban = config_from_args(["--config", path, "--method", "ban"])  # sd had set generations 0
    assert ban.generations == 2 and ban.warmup_epochs == 1.0
    assert config_from_args(["--config", path, "--batch-size", "16"]).eval_batch_size == 32
    # A value given when the run started is kept, and so is one whose name is deleted from
    # the list.
    given = str(tmp_path / "given.yaml")
    dump_yaml(TrainConfig(method="sd", epochs=6, lambda_s=0.7, **CPU), given)
    assert config_from_args(["--config", given, "--temperature", "4"]).lambda_s == 0.7
    (tmp_path / "pinned.yaml").write_text(text.replace("lambda_s, ", "")
                                          .replace(", lambda_s", ""))
    pinned = config_from_args(["--config", str(tmp_path / "pinned.yaml"), "--temperature", "4"])
    assert pinned.lambda_s == 1.5
    # A file written by hand has no list: every value in it is as given.
    (tmp_path / "hand.yaml").write_text("method: sd\nlambda_s: 1.5\n")
    assert config_from_args(["--config", str(tmp_path / "hand.yaml"), "--temperature", "4",
                             "--device", "cpu"]).lambda_s == 1.5


def test_config_takes_a_run_directory_and_one_of_cycles_or_cycle_epochs(tmp_path, capsys):
    dump_yaml(TrainConfig(method="sd", epochs=4, cycle_epochs=[2, 1, 1], **CPU),
              str(tmp_path / "config.yaml"))
    run = str(tmp_path)
    assert config_from_args(["--config", run]).cycle_epochs == [2, 1, 1]  # DIR/config.yaml
    # a flag for one of the pair replaces the file's other (they once contradicted each other)
    assert config_from_args(["--config", run, "--cycles", "2"]).cycle_epochs == [2, 2]
    assert config_from_args(["--config", run, "--cycle-epochs", "3,1"]).cycles == 2
    with pytest.raises(ConfigError, match="no such file .*empty.*config.yaml"):
        (tmp_path / "empty").mkdir()
        config_from_args(["--config", str(tmp_path / "empty")])


def test_a_config_files_settings_for_another_method_are_refused_by_name(tmp_path):
    """A hand-written file's generations on an sd run would be dropped without a word, as the
    flag would: it is refused, naming the file. A --method flag that reads it takes it; a run's
    own settings for its method go unused when --method switches (--config SD_RUN --method bl
    is how methods are compared)."""
    hand = tmp_path / "hand.yaml"
    hand.write_text("method: sd\ngenerations: 3\nepochs: 6\n")
    with pytest.raises(ConfigError, match=f"generations in {hand}: applies to --method ban, tt, "
                                          f"not sd"):
        config_from_args(["--config", str(hand), "--device", "cpu"])
    assert config_from_args(["--config", str(hand), "--method", "ban",
                             "--device", "cpu"]).generations == 3
    run = str(tmp_path / "config.yaml")
    dump_yaml(TrainConfig(method="sd", epochs=6, temperature=4.0, **CPU), run)
    assert config_from_args(["--config", run, "--method", "bl"]).method == "bl"
    assert config_from_args(["--config", run]).temperature == 4.0


def test_ctrl_c_before_training_is_a_stop_not_a_traceback(monkeypatch, capsys, tmp_path):
    from fastsd.train import loop

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "setup", interrupted)
    assert main(["--device", "cpu", "--out", str(tmp_path / "run")]) == 130
    assert "stopped by Ctrl-C before training began" in capsys.readouterr().err


def test_a_refused_resume_names_the_flags_given(tmp_path):
    """--epochs 6 also changes the cycles it resolves to: the message names --epochs, the flag
    given; under --auto-resume it says that it was continuing the run."""
    dump_yaml(TrainConfig(method="sd", epochs=4, out=str(tmp_path), **CPU),
              str(tmp_path / "config.yaml"))
    with pytest.raises(ConfigError, match=r"^--resume: --epochs differs from"):
        config_from_args(["--resume", str(tmp_path), "--epochs", "6"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^--auto-resume \(continuing .*\): --epochs differs"):
        config_from_args(["--auto-resume", "--out", str(tmp_path), "--epochs", "6"])


def test_a_resumed_run_keeps_its_auto_list(tmp_path):
    """The resumed run writes config.yaml again: what was auto then must stay listed."""
    dump_yaml(TrainConfig(method="sd", epochs=6, **CPU), str(tmp_path / "config.yaml"))
    _, auto = load_yaml(str(tmp_path / "config.yaml"))
    assert {"lambda_s", "cycle_epochs", "eval_batch_size", "amp"} <= auto
    resumed = config_from_args(["--resume", str(tmp_path), "--eval-batch-size", "100"])
    assert resumed.auto_fields == auto - {"eval_batch_size"}
    assert resumed.replace(resume=None).auto_fields >= auto - {"eval_batch_size"}


def test_a_bad_auto_list_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("method: sd\nauto_resolved: lambda_s\n")
    with pytest.raises(ConfigError, match="auto_resolved must be a list"):
        config_from_args(["--config", str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("method: sd\nauto_resolved: [lamda_s]\n")
    with pytest.raises(ConfigError, match="lamda_s.*did you mean lambda_s"):
        config_from_args(["--config", str(tmp_path / "c.yaml")])


def test_every_field_has_help_and_a_flag():
    import dataclasses
    import re

    parser = build_parser()
    text = parser.format_help()
    options = parser._option_string_actions  # whole flags: --data is not --dataset's prefix
    for f in dataclasses.fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        assert f.metadata["help"] and name in options, name
        assert options[name].dest == f.name
        assert re.search(re.escape(name) + r"[ ,\n=]", text), name  # listed in --help
    assert "--no-nesterov" in options and "--compile" in options


def test_console_scripts_run_the_three_programs():
    from importlib.metadata import entry_points

    import fastsd.evaluate
    import fastsd.report

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")
               if ep.dist is not None and ep.dist.name == "fastsd"}
    assert sorted(scripts) == ["fastsd-evaluate", "fastsd-report", "fastsd-train"], \
        "reinstall the project (pip install --no-build-isolation -e .) to refresh its metadata"
    assert scripts["fastsd-train"].load() is main
    assert scripts["fastsd-evaluate"].load() is fastsd.evaluate.main
    assert scripts["fastsd-report"].load() is fastsd.report.main


@pytest.mark.parametrize("module", ["fastsd.train", "fastsd.evaluate", "fastsd.report"])
@pytest.mark.parametrize("started_as", ["console script", "python -m"])
def test_usage_names_the_program_the_way_it_was_started(module, started_as, monkeypatch, capsys):
    import importlib

    script = module.replace(".", "-")
    argv0 = f"/venv/bin/{script}" if started_as == "console script" else f"/src/{module}.py"
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    program = importlib.import_module("fastsd.train.cli" if module == "fastsd.train" else module)
    with pytest.raises(SystemExit) as exit_info:
        program.main(["--help"])
    assert exit_info.value.code == 0
    expected = script if started_as == "console script" else f"python -m {module}"
    assert capsys.readouterr().out.startswith(f"usage: {expected} ")


# ------------------------------------------------------------------------------------ schedules
def test_lr_follows_the_cyclic_cosine_and_restarts_at_cycle_starts():
    cfg = TrainConfig(method="sd", epochs=6, cycle_epochs=[2, 1, 3], lr=0.2, lr_min=0.01, **CPU)
    ipe = 5
    plan = build_plan(cfg, ipe)
    starts = [0, 10, 15]
    lengths = [10, 5, 15]
    lrs = [plan.lr_at(i) for i in range(plan.total_iters)]
    assert plan.total_iters == 30
    for i, lr in enumerate(lrs):
        c = max(k for k in range(3) if starts[k] <= i)
        t = (i - starts[c]) / lengths[c]
        assert lr == pytest.approx(0.01 + 0.5 * (0.2 - 0.01) * (1 + math.cos(math.pi * t)),
                                   abs=1e-12)
    for s in starts:  # a restart: lr_max at every cycle start, after a near-minimum
        assert lrs[s] == pytest.approx(0.2)
        if s:
            assert lrs[s - 1] < 0.03
    # strictly decreasing inside a cycle
    assert all(lrs[i] > lrs[i + 1] for i in range(14, 29) if i + 1 not in starts)


def test_warmup_and_step_schedule():
    cfg = TrainConfig(method="bl", epochs=4, warmup_epochs=1, lr=0.4, **CPU)
    plan = build_plan(cfg, 4)
    for i in range(4):
        assert plan.lr_at(i) == pytest.approx(cosine_lr(i, 16, 0.4, 0.0) * (i + 1) / 4)
    assert plan.lr_at(4) == pytest.approx(cosine_lr(4, 16, 0.4, 0.0))
    step = build_plan(TrainConfig(method="bl", epochs=4, schedule="step", milestones="2,3",
                                  lr=0.4, **CPU), 10)
    assert [step.lr_at(i) for i in (0, 19, 20, 29, 30, 39)] == pytest.approx(
        [0.4, 0.4, 0.04, 0.04, 0.004, 0.004])
    # generations restart the schedule (and the warm-up) with every fresh model
    gen = build_plan(TrainConfig(method="ban", epochs=2, generations=1, warmup_epochs=0.5,
                                 **CPU), 4)
    assert gen.lr_at(8) == pytest.approx(gen.lr_at(0)) == pytest.approx(0.1 / 2)


def test_restart_warmup_ramps_every_cycle_after_the_first():
    # 3 cycles of 2 epochs, 4 iterations each: cycle starts at 0, 8 and 16
    cfg = TrainConfig(method="sd", epochs=6, cycles=3, warmup_epochs=0.25,
                      restart_warmup_epochs=0.75, lr=0.4, **CPU)
    plan = build_plan(cfg, 4)
    assert plan.lr_at(0) == pytest.approx(0.4)  # warm-up of 1 iteration: lr_max at once
    for start in (8, 16):
        for local in range(3):
            assert plan.lr_at(start + local) == pytest.approx(
                cosine_lr(local, 8, 0.4, 0.0) * (local + 1) / 3)
        assert plan.lr_at(start + 3) == pytest.approx(cosine_lr(3, 8, 0.4, 0.0))
    # the default keeps SE's sharp restart: lr_max at the first iteration of every cycle
    sharp = build_plan(TrainConfig(method="se", epochs=6, cycles=3, lr=0.4, **CPU), 4)
    assert [sharp.lr_at(i) for i in (0, 8, 16)] == pytest.approx([0.4] * 3)


# ----------------------------------------------------------------------------------- the plans
def test_stage_plans_of_every_method():
    sd = build_plan(TrainConfig(method="sd", epochs=3, cycles=3, **CPU), 2)
    assert [s.loss.teacher for s in sd.stages] == [None, 0, 1]
    assert [s.capture_slot for s in sd.stages] == [0, 1, 2] and sd.num_slots == 3
    assert [s.fresh_model for s in sd.stages] == [True, False, False]
    se = build_plan(TrainConfig(method="se", epochs=3, cycles=3, **CPU), 2)
    assert [s.loss.teacher for s in se.stages] == [None] * 3
    assert se.stages[0].loss == sd.stages[0].loss  # SD's cycle 1 is SE's
    tt = build_plan(TrainConfig(method="tt", epochs=2, generations=2, eta=0.7, topk=4, **CPU), 2)
    assert [(s.start_epoch, s.end_epoch) for s in tt.stages] == [(0, 2), (2, 4), (4, 6)]
    assert [s.loss.teacher for s in tt.stages] == [None, 0, 1]
    assert all(s.fresh_model for s in tt.stages)
    g0 = tt.stages[0].loss
    assert (g0.ce_weight, g0.tolerance_weight, g0.topk) == (0.7, pytest.approx(0.3), 4)
    ban = build_plan(TrainConfig(method="ban", epochs=2, generations=1, **CPU), 2)
    assert ban.stages[0].loss.tolerance_weight == 0 and ban.stages[1].loss.teacher == 0
    kd = build_plan(TrainConfig(method="kd", epochs=2, teacher_checkpoint="x", **CPU), 2)
    assert kd.stages[0].loss.teacher == "external" and kd.num_slots == 0
    bl = build_plan(TrainConfig(method="bl", epochs=2, **CPU), 2)
    assert bl.stages[0].loss.teacher is None and bl.stages[0].loss.loss_kwargs() == {
        "ce_weight": 1.0}


def _loss(spec, z, y, t):
    return distill_loss(z, y, t if spec.teacher is not None else None, **spec.loss_kwargs())


def test_loss_keywords_match_the_formulas_of_design_section_1():
    torch.manual_seed(0)
    z, t = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (6,))
    log_f = torch.log_softmax(z, -1)
    ce = -log_f.gather(1, y[:, None]).mean()

    def kl(p_logits, q_logits):
        p = torch.softmax(p_logits, -1)
        return (p * (torch.log_softmax(p_logits, -1) - torch.log_softmax(q_logits, -1))).sum(
            -1).mean()

    T = 3.0
    sd = build_plan(TrainConfig(method="sd", epochs=2, cycles=2, temperature=T, **CPU), 1)
    # SD: λ_S·CE + λ_T·KL(f_T(x; θ_c) with T ‖ f(x; θ)), asymmetric: student temperature 1
    assert _loss(sd.stages[1].loss, z, y, t) == pytest.approx(
        float((1 + 1 / T) * ce + 1.0 * kl(t / T, z)), rel=1e-10)
    kd = build_plan(TrainConfig(method="kd", epochs=1, temperature=T, teacher_checkpoint="x",
                                lambda_s=0.5, lambda_t=2, **CPU), 1)
    # KD: both softened by T, KL scaled by T²
    assert _loss(kd.stages[0].loss, z, y, t) == pytest.approx(
        float(0.5 * ce + 2 * T * T * kl(t / T, z / T)), rel=1e-10)
    tt = build_plan(TrainConfig(method="tt", epochs=1, generations=1, eta=0.6, topk=3, **CPU), 1)
    # TT generation 0: η·CE + (1-η)·[f_a1 - 1/(K-1)·Σ_{k=2..K} f_ak] on the network's own softmax
    f = torch.softmax(z, -1).sort(-1, descending=True).values
    penalty = (f[:, 0] - f[:, 1:3].sum(-1) / 2).mean()
    assert _loss(tt.stages[0].loss, z, y, t) == pytest.approx(float(0.6 * ce + 0.4 * penalty),
                                                              rel=1e-10)
    # generation 1: plain CE + KL to generation 0 (λ_S = 1 for a fresh student:
    # TrainConfig.lambda_s)
    assert _loss(tt.stages[1].loss, z, y, t) == pytest.approx(
        float(1.0 * ce + kl(t / 2, z)), rel=1e-10)


# ----------------------------------------------------------------------------------- bad input
def _fails(capsys, argv, *needles, out=None):
    code = main(argv + ["--device", "cpu", "--progress", "none", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code != 0, err
    for needle in needles:
        assert needle in err, err
    if out is not None:
        assert not os.path.exists(os.path.join(out, "checkpoints")), "training started"
    return err


def _argparse_fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("argv, needles", [
    (["--arch", "resnet21"], ["--arch", "unknown model 'resnet21'", "resnet20"]),
    (["--cycles", "5", "--epochs", "4"], ["--cycles", "do not fit in 4 epochs"]),
    (["--cycle-epochs", "3,3", "--epochs", "5"], ["--cycle-epochs", "add up to 6"]),
    (["--cycle-epochs", "3,0"], ["--cycle-epochs", "at least 1 epoch"]),
    (["--cycle-epochs", ","], ["--cycle-epochs", "give the epochs of each cycle"]),
    (["--arch", "vit_b_32", "--image-size", "64"], ["--image-size", "224x224 images only"]),
    (["--arch", "alexnet", "--image-size", "32"], ["--image-size", "at least 63x63"]),
    (["--synthetic-size", "10,5"], ["10 training images: fewer than one batch of 64",
                                    "--batch-size"]),
    (["--method", "bl", "--cycles", "3"], ["--cycles", "se and sd"]),
    (["--temperature", "0"], ["--temperature", "> 0"]),
    (["--temperature", "-2"], ["--temperature", "> 0"]),
    (["--method", "tt", "--eta", "1.5"], ["--eta", "[0, 1]"]),
    (["--method", "tt", "--eta", "-0.1"], ["--eta", "[0, 1]"]),
    (["--method", "sd", "--generations", "3"], ["--generations", "applies to --method ban, tt"]),
    (["--eta", "0.5"], ["--eta", "applies to --method tt, not sd", "drop --eta"]),
    (["--method", "se", "--temperature", "4"], ["--temperature", "not se"]),
    (["--method", "bl", "--gamma", "0.5"], ["--gamma", "--schedule step only"]),
    (["--method", "bl", "--schedule", "step", "--lr-min", "0.05"], ["--lr-min", "no floor"]),
    (["--compile-mode", "max-autotune"], ["--compile-mode", "add --compile"]),
    (["--method", "kd"], ["--teacher-checkpoint"]),
    (["--method", "sd", "--schedule", "step"], ["--schedule", "cyclic cosine"]),
    (["--dataset", "cifar10"], ["--data", "--download"]),
    (["--amp", "fp16"], ["--amp", "CUDA"]),
    (["--lr", "0"], ["--lr"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--grad-accum-steps", "0"], ["--grad-accum-steps", ">= 1"]),
    (["--batch-size", "64", "--grad-accum-steps", "40"],
     ["--grad-accum-steps 40", "larger than the training split (2048 images)", "no full update"]),
    (["--clip-grad-norm", "0"], ["--clip-grad-norm", "> 0"]),
    (["--clip-grad-norm", "nan"], ["--clip-grad-norm", "> 0"]),
    (["--profile", "0"], ["--profile", ">= 1"]),
    (["--checkpoint-every", "30"],
     ["--checkpoint-every", "positive multiple of --log-every (50)"]),
    (["--checkpoint-every", "0", "--log-every", "1"], ["--checkpoint-every", "multiple"]),
    (["--cycle-epochs", "4,2", "--restart-warmup-epochs", "2"],
     ["--restart-warmup-epochs", "shorter than every cycle after the first (2 epochs)"]),
    (["--restart-warmup-epochs", "-1"], ["--restart-warmup-epochs", ">= 0"]),
    (["--method", "bl", "--restart-warmup-epochs", "1"],
     ["--restart-warmup-epochs", "se and sd only", "--warmup-epochs"]),
])
def test_bad_settings_are_refused_before_anything_runs(capsys, tmp_path, argv, needles):
    _fails(capsys, argv + ["--out", str(tmp_path / "run")], *needles, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_auto_resume_needs_out_and_not_resume(capsys, tmp_path):
    _fails(capsys, ["--auto-resume"], "--auto-resume needs --out DIR")
    _fails(capsys, ["--auto-resume", "--resume", str(tmp_path)], "--auto-resume goes with --out")


@pytest.mark.parametrize("argv, needles", [
    (["--method", "xyz"], ["--method", "invalid choice"]),
    (["--dataset", "mnist"], ["--dataset", "invalid choice"]),
    (["--epochs", "two"], ["--epochs", "invalid int"]),
])
def test_unknown_choices_are_refused_by_the_parser(capsys, argv, needles):
    _argparse_fails(capsys, argv, *needles)


def test_bad_values_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("method: sdd\n")
    _fails(capsys, ["--config", str(path)], "--method", "did you mean sd")
    path.write_text("lernrate: 0.1\n")
    _fails(capsys, ["--config", str(path)], "unknown setting 'lernrate'")
    with pytest.raises(ConfigError, match="--cycles"):
        TrainConfig(method="se", cycles=0, **CPU)


def _image_folder(root, classes, per_class=2, size=8, split_names=("train", "val")):
    from PIL import Image

    for split in split_names:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (40 * c, 10 * i, 0)).save(d / f"{i}.png")


def test_missing_and_empty_data_folders(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    _fails(capsys, ["--dataset", "imagefolder", "--data", str(missing), "--out",
                    str(tmp_path / "r1")], str(missing), out=str(tmp_path / "r1"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    _fails(capsys, ["--dataset", "imagefolder", "--data", str(empty), "--out",
                    str(tmp_path / "r2")], "no class folders", out=str(tmp_path / "r2"))
    assert not (tmp_path / "r2").exists()


def test_class_folders_that_do_not_match_num_classes(tmp_path, capsys):
    _image_folder(tmp_path / "d", classes=2)
    _fails(capsys, ["--dataset", "imagefolder", "--data", str(tmp_path / "d"), "--num-classes",
                    "3", "--image-size", "8", "--out", str(tmp_path / "r")],
           "2 class folders", out=str(tmp_path / "r"))


def test_unreadable_image_is_named(tmp_path, capsys):
    _image_folder(tmp_path / "d", classes=2)
    bad = tmp_path / "d" / "train" / "class1" / "broken.png"
    bad.write_bytes(b"this is not a png")
    _fails(capsys, ["--dataset", "imagefolder", "--data", str(tmp_path / "d"), "--image-size",
                    "8", "--batch-size", "2", "--out", str(tmp_path / "r")], "broken.png",
           out=str(tmp_path / "r"))


def _save_weights(model, path, **meta):
    from fastsd.train.checkpoint import model_weights, save_safetensors

    save_safetensors(model_weights(model), str(path), meta)


def test_teacher_of_another_architecture_or_class_count(tmp_path, capsys):
    from fastsd.models import create_model

    base = ["--method", "kd", "--synthetic-size", "64,32", "--batch-size", "16", "--out",
            str(tmp_path / "r")]
    # recorded architecture differs
    _save_weights(create_model("resnet32", 10), tmp_path / "r32.safetensors", arch="resnet32",
                  num_classes=10)
    _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "r32.safetensors")],
           "holds a resnet32", "--teacher-arch resnet32", out=str(tmp_path / "r"))
    # a plain state_dict of another architecture: the keys / shapes say so
    torch.save(create_model("resnet32", 10).state_dict(), tmp_path / "r32.pt")
    _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "r32.pt")],
           "does not fit a resnet20", "unexpected",
           out=str(tmp_path / "r"))
    # another class count
    _save_weights(create_model("resnet20", 5), tmp_path / "c5.safetensors", arch="resnet20",
                  num_classes=5)
    _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "c5.safetensors")],
           "5 classes", "10", out=str(tmp_path / "r"))
    torch.save(create_model("resnet20", 5).state_dict(), tmp_path / "c5.pt")
    _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "c5.pt")],
           "of another shape", out=str(tmp_path / "r"))
    _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "none.pt")], "does not exist")
    # a whole pickled module, which a weights-only load refuses: one line that names the class
    # and the fix, not torch's dozen lines of advice to load it unsafely
    torch.save(create_model("resnet20", 10), tmp_path / "module.pt")
    err = _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "module.pt")],
                 "pickles Python objects", "fastsd.models", "save model.state_dict()",
                 out=str(tmp_path / "r"))
    assert "weights_only" not in err and "\x1b" not in err and len(err.splitlines()) == 1, err
    (tmp_path / "not-a-run").mkdir()
    _fails(capsys, base + ["--teacher-checkpoint", str(tmp_path / "not-a-run")],
           "--teacher-checkpoint: ", "holds neither model.safetensors")


def test_resume_without_a_checkpoint(tmp_path, capsys):
    _fails(capsys, ["--resume", str(tmp_path)], "holds no checkpoint")
    _fails(capsys, ["--resume", str(tmp_path / "absent")], "not a directory")


def test_resume_of_a_run_from_before_unread_settings_were_refused(tmp_path, capsys):
    """Such a config.yaml may hold a --gamma on a cosine schedule or a --compile-mode without
    --compile, which the run never read: the resumed run goes on without them, and only a new
    run from the file is refused."""
    dump_yaml(TrainConfig(**CPU), str(tmp_path / "x"))
    text = (tmp_path / "x").read_text()
    assert "\ngamma: 0.1\n" in text and "\ncompile_mode: default\n" in text
    text = text.replace("\ngamma: 0.1\n", "\ngamma: 0.5\n").replace(
        "\ncompile_mode: default\n", "\ncompile_mode: max-autotune\n")
    (tmp_path / "config.yaml").write_text(text)
    resumed = config_from_args(["--resume", str(tmp_path)])
    assert (resumed.schedule, resumed.gamma, resumed.compile, resumed.compile_mode) == (
        "cosine", 0.1, False, "default")
    with pytest.raises(ConfigError, match="--gamma: the factor at each milestone"):
        config_from_args(["--config", str(tmp_path), "--out", str(tmp_path / "new")])
    with pytest.raises(ConfigError, match="--resume: --gamma differs from the run's config.yaml"):
        config_from_args(["--resume", str(tmp_path), "--gamma", "0.5"])


def test_resume_of_an_image_folder_run_from_before_the_crop_followed_the_model(tmp_path):
    """Such a config.yaml says image_size: null, which then meant 224: a resumed run keeps it."""
    dump_yaml(TrainConfig(dataset="imagefolder", data=str(tmp_path), arch="resnet20", **CPU),
              str(tmp_path / "x"))
    text = (tmp_path / "x").read_text()
    assert "\nimage_size: 32\n" in text  # what a run writes now
    (tmp_path / "config.yaml").write_text(text.replace("\nimage_size: 32\n",
                                                       "\nimage_size: null\n"))
    assert config_from_args(["--resume", str(tmp_path)]).image_size == 224
    (tmp_path / "config.yaml").write_text(text)
    assert config_from_args(["--resume", str(tmp_path)]).image_size == 32


def test_dali_flag_without_dali_is_refused_before_the_images_are_checked(tmp_path, capsys,
                                                                         monkeypatch):
    """The install command, exit status 2, and before the pre-flight decode of the folder
    (minutes on ImageNet): dali.py imports DALI lazily, so the trainer asks up front."""
    import fastsd.train.preflight as preflight

    def must_not_run(*args, **kwargs):
        raise AssertionError("the image folder was checked before DALI was")

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what `import nvidia.dali` sees
    monkeypatch.setattr(preflight, "check_image_folder", must_not_run)
    _image_folder(tmp_path / "data", 2)
    out = tmp_path / "r"
    err = _fails(capsys, ["--dataset", "imagefolder", "--data", str(tmp_path / "data"), "--dali",
                          "--arch", "resnet20", "--out", str(out)],
                 'pip install "fastsd[dali]"', "or drop --dali", out=str(out))
    assert "Traceback" not in err


def test_a_kd_teacher_that_cannot_run_on_the_images_is_refused():
    """The teacher sees the student's images: an Inception-v3 teacher of a ResNet-18 on the
    32-pixel synthetic default is refused up front, not at the first teacher forward."""
    with pytest.raises(ConfigError, match="--teacher-arch.*teacher cannot run on the training "
                                          "images: inception_v3 needs images of at least 75x75"):
        TrainConfig(method="kd", teacher_checkpoint="x", arch="resnet18",
                    teacher_arch="inception_v3", **CPU)
    cfg = TrainConfig(method="kd", teacher_checkpoint="x", arch="resnet18",
                      teacher_arch="inception_v3", image_size=75, **CPU)
    assert cfg.teacher_arch == "inception_v3"
