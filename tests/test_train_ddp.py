"""Distributed training on the CPU: 2 gloo processes (issue 6).

Two ways in: ``torch.multiprocessing.spawn`` workers that join the process group exactly as
``python -m fastsd.train`` does under torchrun (``fastsd.train.distributed.init`` from the same
environment variables), so they can return what they hold; and ``torchrun -m fastsd.train`` itself
for SIGTERM and resume. Models and data are tiny: 16px synthetic images, a few steps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from fastsd.train import ConfigError, TrainConfig, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
PER_PROCESS_BATCH = 16
# The GroupNorm runs clip the gradient's norm (1.6 to 11.5 in their 8 steps unclipped; at 3, 6 of
# the 8 steps clip): each process must clip the all-reduced gradient, as one process clips its own.
GN_CLIP_GRAD_NORM = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(out, world_size, batch_size, **overrides):
    values = dict(method="sd", epochs=2, cycles=2, device="cpu", dataset="synthetic",
                  synthetic_size=[128, 45], image_size=16, batch_size=batch_size,
                  eval_batch_size=16, log_every=1, progress="none", tensorboard=False, seed=0,
                  world_size=world_size, out=str(out), amp="none")  # float32: rounding only
    values.update(overrides)
    return TrainConfig(**values)


def group_norm_resnet(name, num_classes, **kwargs):
    """ResNet-8 of width 4 with GroupNorm in place of BatchNorm: per-sample normalisation, so a
    step on two shards of a batch is the step on the whole batch. With BatchNorm it is not: each
    process normalises with its own shard's statistics, and SyncBatchNorm (which would fix that)
    runs on GPUs only.

    Each GroupNorm is followed by a Softplus, so every ReLU of the network (all of them follow a
    norm layer, or a sum of such outputs and the zero-padded shortcut) sees a positive input and
    passes it through: the network is smooth. With ReLU's kink, the float32 rounding between the
    two runs (1e-7) can put a pre-activation on either side of zero, and the gradient then jumps
    (measured: 4e-5 on a weight change of 1e-7, the same in float64): the runs part by more than
    rounding for a reason that has nothing to do with distributed training."""
    from fastsd.models import cifar_resnet

    model = cifar_resnet(8, num_classes, width=4)

    def swap(module):
        for child_name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name,
                        nn.Sequential(nn.GroupNorm(2, child.num_features), nn.Softplus()))
            else:
                swap(child)

    swap(model)
    return model


def _stores_state(trainer):
    """The snapshot slots' tensors, as the SnapshotStore holds them."""
    if trainer.teachers is None:
        return {}
    state = trainer.teachers.store.state_dict()
    flat = {k: state[k] for k in ("half", "float")}
    flat.update({f"exact.{k}": v for k, v in state["exact"].items()})
    return {k: v.clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _train(cfg, record_initial_eval=False):
    trainer = Trainer(cfg, quiet=True).setup()
    out = {}
    if record_initial_eval:
        out["initial_eval"] = trainer._evaluate_student()
    out["results"] = trainer.run()
    out["model"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    out["snapshots"] = _stores_state(trainer)
    return out


def _join_group(rank, port):
    """In a spawned worker: join the WORLD-process group from the environment torchrun would
    set, as ``python -m fastsd.train`` does."""
    from fastsd.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    distributed.init("cpu", WORLD)


def _worker(rank, port, root):
    import fastsd.models
    from fastsd.ops.distill import cpu_backend
    from fastsd.train import distributed

    _join_group(rank, port)
    # Rank 1 is given a run directory of its own: if it wrote anything, the directory would exist.
    name = "rank0" if rank == 0 else "rank1"
    saved = {}
    with cpu_backend("native"):
        create_model = fastsd.models.create_model
        fastsd.models.create_model = group_norm_resnet
        try:
            saved["gn"] = _train(config(os.path.join(root, "gn", name), WORLD, PER_PROCESS_BATCH,
                                        clip_grad_norm=GN_CLIP_GRAD_NORM),
                                 record_initial_eval=True)
            # Half the batch, two accumulated passes: each process's two passes of 8 images
            # are its shard of the same 32-image update (DDP's no_sync on the first pass).
            saved["gn_accum"] = _train(config(os.path.join(root, "gn_accum", name), WORLD,
                                              PER_PROCESS_BATCH // 2, grad_accum_steps=2,
                                              clip_grad_norm=GN_CLIP_GRAD_NORM))
        finally:
            fastsd.models.create_model = create_model
        # The real ResNet-20, BatchNorm included: snapshots must still be equal everywhere.
        saved["bn"] = _train(config(os.path.join(root, "bn", name), WORLD, PER_PROCESS_BATCH,
                                    tensorboard=True))
        # The other methods' ways of teaching: generations (fresh weights, a tolerant first
        # generation) and a separate trained teacher (read by every process).
        saved["tt"] = _train(config(os.path.join(root, "tt", name), WORLD, PER_PROCESS_BATCH,
                                    method="tt", epochs=1, cycles=None, generations=1, topk=3))
        saved["kd"] = _train(config(os.path.join(root, "kd", name), WORLD, PER_PROCESS_BATCH,
                                    method="kd", epochs=1, cycles=None,
                                    teacher_checkpoint=os.path.join(root, "bn", "rank0")))
    torch.save(saved, os.path.join(root, f"rank{rank}.pt"))
    distributed.shutdown()


class ConcatShards:
    """The training batches of both processes' shards, concatenated: one process then steps on
    exactly the global batch that 2 processes step on together."""

    def __init__(self, parts):
        self.parts = parts

    def set_epoch(self, epoch, start=0):
        for part in self.parts:
            part.set_epoch(epoch, start)

    def __len__(self):
        return len(self.parts[0])

    def __iter__(self):
        for batches in zip(*self.parts):
            yield torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _shard_loader(cfg, rank):
    t = Trainer.__new__(Trainer)
    t.cfg, t.rank, t.world_size, t.device = cfg, rank, WORLD, torch.device("cpu")
    return t._build_data().train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    from fastsd.ops.distill import cpu_backend

    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # One process, the same global batch, the same images in each step.
    import fastsd.models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    create_model = fastsd.models.create_model
    fastsd.models.create_model = group_norm_resnet
    try:
        with cpu_backend("native"):
            cfg = config(root / "single", 1, WORLD * PER_PROCESS_BATCH,
                         clip_grad_norm=GN_CLIP_GRAD_NORM)
            trainer = Trainer(cfg, quiet=True).setup()
            shard_cfg = cfg.replace(batch_size=PER_PROCESS_BATCH, out=None)
            trainer.data.train = ConcatShards([_shard_loader(shard_cfg, r) for r in range(WORLD)])
            single = dict(initial_eval=trainer._evaluate_student(), results=trainer.run(),
                          model=dict(trainer.model.state_dict()),
                          snapshots=_stores_state(trainer))
    finally:
        fastsd.models.create_model = create_model
        torch.set_num_threads(threads)
    return root, ranks, single


@pytest.mark.parametrize("run", ["gn", "gn_accum"])
def test_two_processes_step_like_one_with_the_same_global_batch(runs, run):
    """Also with the batch of an update accumulated over two passes of half its size."""
    _, ranks, single = runs
    assert ranks[0][run]["results"]["snapshots"][-1]["iteration"] == 8  # 2 epochs x 4 steps
    for key, value in single["model"].items():
        torch.testing.assert_close(ranks[0][run]["model"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)
    # the cycle-1 snapshot taught cycle 2 (SD): the same teacher in both runs
    for key, value in single["snapshots"].items():
        torch.testing.assert_close(ranks[0][run]["snapshots"][key].float(), value.float(),
                                   rtol=1e-2, atol=1e-3)  # half precision storage
    a, b = ranks[0][run]["results"], single["results"]
    assert [e["label"] for e in a["snapshots"]] == [e["label"] for e in b["snapshots"]]
    for x, y in zip(a["snapshots"], b["snapshots"]):
        assert x["top1_error"] == pytest.approx(y["top1_error"], abs=100 / 45 + 1e-9)


def metrics_rows(run_dir, kind):
    """The rows of one ``kind`` ("step", "epoch", ...) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_processes_clip_the_all_reduced_gradient_as_one_process_clips_its_own(runs):
    root, _, _ = runs
    single = [row["clipped"] for row in metrics_rows(root / "single", "epoch")]
    assert 0 < sum(single) < 8  # of the 8 steps, some were clipped and some not
    # the same updates clipped, each counted once (an update is shared by the processes; it
    # was once counted once per process)
    assert ([row["clipped"] for row in metrics_rows(root / "gn" / "rank0", "epoch")]
            == single)


@pytest.mark.parametrize("run", ["gn", "gn_accum", "bn", "tt", "kd"])
def test_every_process_holds_the_same_weights_and_snapshots(runs, run):
    _, ranks, _ = runs
    for part in ("model", "snapshots"):
        a, b = ranks[0][run][part], ranks[1][run][part]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)
    keys = ("top1_error", "top5_error", "snapshot_top1_error", "confidence_top4")
    assert [{k: e.get(k) for k in keys} for e in ranks[0][run]["results"]["snapshots"]] == [
        {k: e.get(k) for k in keys} for e in ranks[1][run]["results"]["snapshots"]]


def test_evaluation_of_an_odd_sized_split_equals_one_process(runs):
    _, ranks, single = runs
    # 45 test images: shards of 22 and 23, every image counted once
    for r in range(WORLD):
        assert ranks[r]["gn"]["initial_eval"] == single["initial_eval"]
    assert single["initial_eval"]["samples"] == 45


def test_only_rank_0_writes_and_results_record_the_world_size(runs):
    root, _, _ = runs
    for run in ("gn", "bn", "tt", "kd"):
        assert not (root / run / "rank1").exists()
        main = root / run / "rank0"
        results = json.loads((main / "results.json").read_text())
        assert (results["world_size"], results["batch_size"], results["global_batch_size"]) == (
            2, 16, 32)
        assert (main / "checkpoints" / "last.pt").is_file()
        assert torch.load(main / "checkpoints" / "last.pt", weights_only=True)["world_size"] == 2
        config_text = (main / "config.yaml").read_text()
        assert "world_size: 2" in config_text and "global batch 32" in config_text
    assert any((root / "bn" / "rank0" / "tensorboard").iterdir())


# ------------------------------------------------------------------------- torchrun, SIGTERM
# --checkpoint-every 4: the two processes write periodic checkpoints together, and the resumed run
# still ends bit for bit where the uninterrupted one does
RUN_ARGS = ["--method", "sd", "--epochs", "12", "--cycles", "3", "--synthetic-size", "256,45",
            "--image-size", "16", "--batch-size", "16", "--device", "cpu", "--progress", "plain",
            "--log-every", "4", "--checkpoint-every", "4", "--no-tensorboard"]


def _torchrun(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # a run on the CPU uses the loss's C++ kernel
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # --standalone: the rendezvous store binds a free port itself. A port picked by free_port()
    # is free only until it is closed, and two launches here run at the same time.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "-m", "fastsd.train"] + args
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigterm_stops_every_process_with_one_checkpoint_and_the_run_resumes(tmp_path, capsys):
    reference = tmp_path / "reference"
    uninterrupted = _torchrun(RUN_ARGS + ["--out", str(reference)])
    run = tmp_path / "run"
    proc = _torchrun(RUN_ARGS + ["--out", str(run)])
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what a scheduler does: torchrun passes it to the workers
    log, _ = proc.communicate(timeout=120)
    assert not (run / "results.json").exists(), "the run finished before the signal"
    assert log.count("stopped by SIGTERM") == 1, log  # both stopped, rank 0 says so
    assert f"--resume {run}" in log
    state = torch.load(ckpt, weights_only=True)
    # the stop was agreed at a step boundary, every STOP_CHECK_EVERY steps (or the last)
    assert state["iteration"] % 10 == 0 and state["world_size"] == 2
    assert state["iteration"] == state["epoch"] * 8 + state["batch_in_epoch"]

    # another number of processes is refused, before anything runs
    from fastsd.train.cli import main

    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "2 process(es)" in err and "this launch has 1" in err and "torchrun" in err

    proc = _torchrun(["--resume", str(run), "--progress", "none"])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["snapshots"][-1]["iteration"] == 96
    steps = [row["iteration"] for row in metrics_rows(run, "step")]
    assert steps == list(range(4, 97, 4))  # each logged once, as if the run had not stopped

    # and bit for bit the run that was never stopped (BatchNorm included: see distributed.py)
    log, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, log
    from safetensors.torch import load_file

    for name in ("model", "snapshots/cycle1", "snapshots/cycle2", "snapshots/cycle3"):
        a = load_file(str(run / f"{name}.safetensors"))
        b = load_file(str(reference / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # The stop came between two log lines (every 4 steps; it is agreed every 10): the window in
    # progress was summed over both processes into the checkpoint, so the rows logged after the
    # resume are the uninterrupted run's (to float32 rounding: the sums were added in another
    # order), not rows of the steps since the resume.
    timing = ("images_per_s", "time")
    for row, expected in zip(metrics_rows(run, "step"), metrics_rows(reference, "step"),
                             strict=True):
        for key, value in expected.items():
            if key not in timing:
                assert row[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                                    else value), (row["iteration"], key)


def _download_worker(rank, port, root):
    """Joins a 2-process group and builds CIFAR-10's loaders with --download, the download
    replaced by one that logs who called it and writes torchvision's files slowly."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as tv_cifar

    from fastsd.train import distributed

    def fake_download(url, download_root, **kwargs):
        with open(os.path.join(root, "downloads.log"), "a") as fh:
            fh.write(f"{rank}\n")
        time.sleep(0.5)  # long enough for another process to read half-written files
        folder = os.path.join(download_root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(os.path.join(folder, name), "wb") as fh:
                pickle.dump({"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                             "labels": rng.integers(0, 10, 8).tolist()}, fh)
        with open(os.path.join(folder, "batches.meta"), "wb") as fh:
            pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, fh)

    tv_cifar.download_and_extract_archive = fake_download
    tv_cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
    _join_group(rank, port)
    t = Trainer.__new__(Trainer)
    t.cfg = TrainConfig(dataset="cifar10", data=os.path.join(root, "data"), download=True,
                        batch_size=4, device="cpu", world_size=WORLD, progress="none")
    t.rank, t.world_size, t.device, t.is_main = rank, WORLD, torch.device("cpu"), rank == 0
    data = t._build_data()
    torch.save(data.info.train_size, os.path.join(root, f"train_size{rank}.pt"))
    distributed.shutdown()


def test_download_under_several_processes_fetches_once(tmp_path):
    """--download under torchrun: one process downloads, the others read the files once whole
    (all of them at once would overwrite each other's partial files)."""
    import torch.multiprocessing as mp

    mp.spawn(_download_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "downloads.log").read_text() == "0\n"
    assert [torch.load(tmp_path / f"train_size{r}.pt") for r in range(WORLD)] == [40, 40]


def _rng_worker(rank, port, root):
    """Sets a 2-process run up, draws from the global generator (dropout's), writes a checkpoint
    and draws again; then resumes the run from that checkpoint and draws once more."""
    from fastsd.train import distributed

    _join_group(rank, port)
    cfg = config(os.path.join(root, "run"), WORLD, PER_PROCESS_BATCH)
    trainer = Trainer(cfg, quiet=True).setup()
    first = torch.rand(4)
    trainer.save_checkpoint()
    after_save = torch.rand(4)
    trainer.monitor.close()
    torch.distributed.barrier()  # rank 0 has written the checkpoint (a relaunch, in real life)
    resumed = Trainer(cfg.replace(resume=cfg.out), quiet=True).setup()
    after_resume = torch.rand(4)
    resumed.monitor.close()
    torch.save(dict(first=first, after_save=after_save, after_resume=after_resume),
               os.path.join(root, f"rng{rank}.pt"))
    distributed.shutdown()


def test_each_process_draws_its_own_randomness_and_resumes_it(tmp_path):
    """Dropout and other randomness inside the model: another stream in each process (one
    process's batch would draw different masks for the two shards' samples), and a resumed run
    goes on with each process's own stream, not rank 0's."""
    import torch.multiprocessing as mp

    mp.spawn(_rng_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    draws = [torch.load(tmp_path / f"rng{r}.pt") for r in range(WORLD)]
    assert not torch.equal(draws[0]["first"], draws[1]["first"])
    for d in draws:
        assert torch.equal(d["after_resume"], d["after_save"])


def _late_stop_worker(rank, port, root):
    """Rank 0 alone is signalled, at iteration 3 of 8: before any multiple of STOP_CHECK_EVERY."""
    from fastsd.train import distributed
    from fastsd.train.errors import Interrupted

    class SignalRankZero:
        def on_step_end(self, trainer):
            if rank == 0 and trainer.iteration == 3:
                trainer._stop_signal = signal.SIGTERM

    _join_group(rank, port)
    trainer = Trainer(config(os.path.join(root, "run"), WORLD, PER_PROCESS_BATCH),
                      hooks=[SignalRankZero()], quiet=True)
    try:
        trainer.run()
        outcome = "finished"
    except Interrupted:
        outcome = f"stopped at {trainer.iteration} of {trainer.plan.total_iters}"
    torch.save(outcome, os.path.join(root, f"outcome{rank}.pt"))
    distributed.shutdown()


def test_a_signal_in_the_last_steps_stops_every_process(tmp_path):
    """The processes agree on a stop every STOP_CHECK_EVERY iterations and at the run's last: a
    signal after the last multiple stops the run, as it stops one process (it used to finish
    and exit 0)."""
    import torch.multiprocessing as mp

    mp.spawn(_late_stop_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert [torch.load(tmp_path / f"outcome{r}.pt") for r in range(WORLD)] == [
        "stopped at 8 of 8"] * WORLD
    assert not (tmp_path / "run" / "results.json").exists()


def test_world_size_must_match_the_launch(monkeypatch):
    with pytest.raises(ConfigError, match="--world-size.*this launch has 1"):
        TrainConfig(world_size=2, device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TrainConfig(device="cpu").world_size == 2
    assert TrainConfig(device="cpu", batch_size=8).global_batch_size == 16
    with pytest.raises(ConfigError, match="--sync-bn.*GPUs only"):
        TrainConfig(device="cpu", sync_bn=True)
