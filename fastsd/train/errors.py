"""Exceptions of the trainer that carry a message a user can act on.

The command line prints these without a traceback and exits with a non-zero status; anything else
is a bug (or a failure of a lower layer) and keeps its traceback.
"""

import os
import sys


def program_name(module: str) -> str:
    """How the user started the program, for its usage line: ``fastsd-train`` (the console
    script of ``module`` fastsd.train) or ``python -m fastsd.train``."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script == module.replace(".", "-"):
        return script
    return f"python -m {module}"


class TrainError(Exception):
    """Base class: the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(TrainError, ValueError):
    """A configuration value (flag, YAML key) that cannot work; raised before anything runs."""


class SetupError(TrainError):
    """Something the run needs is missing or unusable (data folder, checkpoint, run directory)."""


class NonFiniteLossError(TrainError):
    """The loss stayed non-finite for too many steps in a row; the last good checkpoint is kept."""

    exit_code = 3


class WriteError(TrainError, OSError):
    """A file of the run could not be written (disk full, permissions, a vanished mount); what
    was written before it, the last checkpoint included, is intact."""

    exit_code = 4

    @classmethod
    def of(cls, path: str, error: OSError, intact: str) -> "WriteError":
        """The error for ``path``, whose writing raised ``error``; ``intact`` names what is kept."""
        return cls(f"cannot write {path}: {error.strerror or error}; {intact} is intact. Free "
                   f"space or fix the folder's permissions")


class Interrupted(TrainError):
    """SIGTERM / SIGINT: a consistent checkpoint was written; ``--resume`` continues the run."""

    exit_code = 143
