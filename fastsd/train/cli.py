"""``python -m fastsd.train``: the command line over :class:`~fastsd.train.config.TrainConfig`.

Every flag is generated from a config field (same name, ``-`` for ``_``, the field's help text),
so the command line, ``--config FILE.yaml`` and the saved ``config.yaml`` never drift apart.
Precedence: field defaults < ``--config`` file < flags. ``--resume DIR`` starts from ``DIR``'s
config.yaml; only the fields in ``RESUME_OVERRIDABLE`` may change then. ``--auto-resume`` (with
``--out DIR``, a flag of the command line only) is ``--resume DIR`` when DIR holds a checkpoint.
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional

from .config import (METHOD_SETTINGS, RESUME_OVERRIDABLE, TrainConfig, field_default, flag,
                     load_yaml, refuse_other_methods_settings, unread_settings)
from .errors import ConfigError, TrainError, program_name

_GROUPS = {
    "method": "method (bl, se, sd, kd, ban, tt) and its loss",
    "model": "model",
    "data": "data",
    "optim": "optimisation and schedule",
    "perf": "speed: device, precision, compilation",
    "run": "run directory, logging, resume",
}

EXAMPLES = """\
examples:
  python -m fastsd.train          # an SD demonstration on synthetic data (12 s on 2 CPU cores)
  python -m fastsd.train --dataset cifar100 --data ~/data --arch resnet56 --temperature 3
  python -m fastsd.train --dataset cifar100 --data ~/data --cycle-epochs 150,50,50,50
  python -m fastsd.train --dataset imagefolder --data /imagenet --arch resnet50 --compile
  python -m fastsd.train --method kd --teacher-arch resnet110 --teacher-checkpoint RUN_DIR
  python -m fastsd.train --method tt --generations 2 --eta 0.6 --topk 5
  python -m fastsd.train --resume runs/sd-resnet20-20250101-120000
  python -m fastsd.train --dataset imagefolder --data /imagenet --arch resnet152 --dali \\
      --out /shared/runs/sd-r152 --auto-resume --checkpoint-every 1000   # a requeued job
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("fastsd.train"),
        description="Train image classifiers with Snapshot Distillation and the methods it is\n"
                    "compared with (BL, SE, SD, KD, BAN, TT). Values marked [auto] are resolved\n"
                    "from the method, data set and device and written to <run>/config.yaml.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="read settings from a YAML file (keys are the flag names); flags "
                             "given on the command line override it")
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        kwargs: Dict[str, Any] = dict(dest=f.name)
        help_text = meta["help"]
        default = f.default
        base = getattr(f.type, "__args__", None)
        kind = next(a for a in base if a is not type(None)) if base else f.type
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta.get("list"):
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = kind
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X"}.get(kind, "S")
        if default is not None and "[auto" not in help_text:
            help_text += f" (default: {default})"
        kwargs["help"] = help_text
        groups[meta["group"]].add_argument(flag(f.name), **kwargs)
    groups["run"].add_argument(
        "--auto-resume", action="store_true",
        help="with --out DIR: continue the run in DIR from its checkpoint when it holds one, "
             "start it there otherwise; the one command for a job that a scheduler may start "
             "again (SLURM --requeue, preemptible machines)")
    return parser


def config_from_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Parse the command line (and files it names) into a validated config."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    auto_resume = args.pop("auto_resume", False)
    values = {}
    if config_file:
        if os.path.isdir(config_file):  # a run directory, as --resume takes: its config.yaml
            config_file = os.path.join(config_file, "config.yaml")
        # A run's config.yaml: what it left to auto is resolved again, from these settings.
        file_values, file_auto = load_yaml(config_file)
        values = {k: v for k, v in file_values.items() if k not in file_auto}
        # A file's method-specific settings that differ from their defaults are checked as
        # flags are (a run's config.yaml holds every field, at its default where unused): one
        # that neither the file's method nor a --method flag's reads is refused. Those only the
        # file's method reads go unused after a --method flag (--config SD_RUN --method bl).
        file_method = values.get("method") or field_default("method")
        stray = [k for k, v in values.items() if k in METHOD_SETTINGS and v != field_default(k)
                 and k not in args and file_method not in METHOD_SETTINGS[k]]
        refuse_other_methods_settings(stray, args.get("method") or file_method,
                                      source=config_file)
        # --cycles and --cycle-epochs say one thing two ways: a flag for one replaces the
        # file's other, as a flag replaces the file's setting
        for flag_name, other in (("cycles", "cycle_epochs"), ("cycle_epochs", "cycles")):
            if flag_name in args and other not in args:
                values.pop(other, None)
    values.update(args)
    if auto_resume:
        if values.get("resume"):
            raise ConfigError("--auto-resume goes with --out DIR, not --resume: it resumes DIR "
                              "when DIR holds a checkpoint")
        if not values.get("out"):
            raise ConfigError("--auto-resume needs --out DIR: the automatic run directory is "
                              "named after the time of the start, so a second start would not "
                              "find the first one's")
        from .checkpoint import checkpoint_path

        if os.path.isfile(checkpoint_path(values["out"])):
            values["resume"] = values["out"]
    resume = values.get("resume")
    if not resume:
        # the command line's own settings only: a run's config.yaml holds every one
        refuse_other_methods_settings(args, values.get("method") or field_default("method"))
        return TrainConfig(**values)
    saved_path = os.path.join(resume, "config.yaml")
    if not os.path.isfile(saved_path):
        from .checkpoint import find_checkpoint

        find_checkpoint(resume)  # raises the message that fits what is missing
    out = values.get("out")
    if out is not None and os.path.abspath(out) != os.path.abspath(resume):
        raise ConfigError(f"--out {out} with --resume {resume}: a resumed run goes on writing "
                          f"into its own directory; drop --out")
    saved_values, saved_auto = load_yaml(saved_path)
    if saved_values.get("dataset") == "imagefolder" and saved_values.get("image_size") is None:
        # Written before the crop followed the model (config.yaml now records it): it was 224.
        saved_values["image_size"] = 224
    # Written before a setting that the others leave unread was refused: it changed nothing
    # then, so it is the default's equal (which the resumed run's config.yaml then records).
    for name in unread_settings(lambda n: saved_values.get(n, field_default(n))):
        saved_values[name] = field_default(name)
    try:
        saved = TrainConfig(**saved_values)
    except ConfigError as e:
        raise ConfigError(f"--resume {resume}: the run's config.yaml does not hold on this "
                          f"machine ({e}); a resumed run keeps its settings, so continue it on a "
                          f"machine like the one it started on") from None
    saved_dict = saved.to_dict()

    def refuse(changed):
        verb = "differs" if len(changed) == 1 else "differ"
        may = [flag(n) for n in RESUME_OVERRIDABLE if n not in ("resume", "out")]
        how = f"--auto-resume (continuing {resume})" if auto_resume else "--resume"
        return ConfigError(f"{how}: {', '.join(flag(n) for n in changed)} {verb} from the "
                           f"run's config.yaml; a resumed run keeps its settings (only "
                           f"{', '.join(may)} may change). Drop those flags, or start a new run")

    try:
        resumed = TrainConfig(**{**saved_dict, **values, "resume": resume, "out": resume})
    except ConfigError:
        # A changed setting that does not fit the others: name the change, not its consequence.
        given = [n for n, v in values.items()
                 if n not in RESUME_OVERRIDABLE and n in saved_dict and v != saved_dict[n]]
        if given:
            raise refuse(given) from None
        raise
    changed = [name for name, value in resumed.to_dict().items()
               if name not in RESUME_OVERRIDABLE and saved_dict[name] != value]
    if changed:
        # the flags given, where they explain it (--epochs 6 also moves the cycles)
        raise refuse([name for name in changed if name in values] or changed)
    # Still auto in the config.yaml the resumed run writes again, unless given now.
    resumed.auto_fields = saved_auto - values.keys()
    return resumed


def main(argv: Optional[List[str]] = None) -> int:
    """Run the trainer; return the process exit status: 0 done, 2 bad input, 3 non-finite loss,
    4 a file of the run could not be written (disk full, permissions), 128 + signal number (143
    SIGTERM, 130 SIGINT) stopped with a checkpoint written.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: it joins the process group
    first and leaves it on the way out."""
    from . import distributed

    from .errors import NonFiniteLossError

    status = 1
    try:
        status = _run(argv)
        return status
    finally:
        # The end of a run, a stop and a non-finite loss are decided by all processes together:
        # they leave together. After an error that may be one process's own, none waits.
        distributed.shutdown(synchronize=status in (0, NonFiniteLossError.exit_code, 130, 143))


def _run(argv: Optional[List[str]]) -> int:
    from . import distributed
    from .loop import Trainer

    try:
        cfg = config_from_args(argv)
        distributed.init(cfg.device, cfg.world_size)
        trainer = Trainer(cfg).setup()
    except TrainError as e:
        print(f"fastsd.train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the trainer's own handlers: nothing trained, nothing lost
        print("fastsd.train: stopped by Ctrl-C before training began", file=sys.stderr)
        return 130
    from fastsd.data.folders import UnreadableImageError

    from .checkpoint import how_to_go_on

    try:
        trainer.run()
    except TrainError as e:
        from .errors import Interrupted, WriteError

        stopped = isinstance(e, Interrupted)
        then = f", then {how_to_go_on(trainer.run_dir)}" if isinstance(e, WriteError) else ""
        if trainer.is_main or not stopped:  # every process stops: one message is enough
            print(f"fastsd.train: {'stopped' if stopped else 'error'}: {e}{then}",
                  file=sys.stderr)
        return e.exit_code
    except UnreadableImageError as e:  # a file that broke after the pre-flight check
        print(f"fastsd.train: error: {e}; once the file is fixed, "
              f"{how_to_go_on(trainer.run_dir)}", file=sys.stderr)
        return 2
    return 0
