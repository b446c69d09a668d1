"""Checkpoints and weight files, written atomically; random-number-generator states.

Every file is written to a temporary name in the same folder, flushed to disk, and renamed over
the target (``os.replace`` is atomic on POSIX), so a run killed at any moment leaves either the old
file or the new one, never a torn one.

Layout of a run directory::

    checkpoints/last.pt            the whole training state (resume)
    snapshots/<label>.safetensors  the float32 student at each cycle / generation end
    diagnostics/<label>.safetensors  at each cycle / generation end (and bl/kd's end, "final"):
                                   ``second_confusion`` [C, C] int32, test images of class y whose
                                   second-highest score is class c (read by fastsd.report)
    model.safetensors              the final student (loads into the torchvision model of its name)
"""

import glob
import os
import random
import tempfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .errors import SetupError, WriteError

CHECKPOINT = os.path.join("checkpoints", "last.pt")
FORMAT_VERSION = 1


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (mkstemp's temporaries are private, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


# ------------------------------------------------------------------------------------ atomic I/O
def _atomic(path: str, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename; an
    OSError (disk full, permissions) leaves the old file and raises :class:`WriteError`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    # A writer killed mid-write (SIGKILL, a lost node) left its temporary behind: as large as a
    # checkpoint, and nothing else would ever delete it. One writer per file (rank 0), so any
    # other temporary of this file is such a leftover.
    for stale in glob.glob(os.path.join(glob.escape(folder),
                                        "." + glob.escape(os.path.basename(path)) + ".*.tmp")):
        try:
            os.unlink(stale)
        except OSError:
            pass


def _write_error(path: str, e: OSError) -> WriteError:
    return WriteError.of(path, e, "the file as it was before (the last checkpoint, if this was "
                                  "one)")


def atomic_write_text(path: str, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text.encode()))


def json_text(obj: Any, indent: Optional[int] = 2) -> str:
    """``obj`` as strict JSON: a float that is not finite (the confidences of a diverged
    model) becomes null, as Python's bare NaN / Infinity tokens are no JSON and strict
    readers (jq, JavaScript, serde) refuse the whole file."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def save_safetensors(state: Dict[str, torch.Tensor], path: str,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Weights as a safetensors file: contiguous, on the CPU, no shared storage."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    data = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    _atomic(path, lambda fh: fh.write(data))


def _without_wrapper_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with the key prefixes of torch.compile and DDP wrappers removed."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def model_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state_dict as torchvision names it (no compile / DDP wrapper prefixes)."""
    return _without_wrapper_prefixes(model.state_dict())


# ----------------------------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> Dict[str, Any]:
    """Every generator the run could draw from, as ``torch.load(weights_only=True)`` reads it.

    On CUDA, the generator of ``device``, the process's GPU (its copies of the other GPUs'
    generators, which it never draws from, are left out). Under DDP each process has generators
    of its own; rank 0 gathers them all into the checkpoint and each process restores its own.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    cuda_state = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda_state, torch.Tensor):
        torch.cuda.set_rng_state(cuda_state, device)


# ------------------------------------------------------------------------------- the checkpoint
def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT)


def how_to_go_on(run_dir: str, program: str = "") -> str:
    """What to do about a run that stopped: ``--resume`` where a checkpoint was written, else
    the run again (it stopped before its first checkpoint). ``program``: the command to name
    ("python -m fastsd.train"), where the reader is not at fastsd.train's prompt already."""
    import shlex

    if os.path.isfile(checkpoint_path(run_dir)):
        command = f"{program} --resume {shlex.quote(run_dir)}".strip()
        return f"continue with {command} (its last checkpoint is intact)"
    again = f" ({program} --config {shlex.quote(run_dir)} --out NEW_DIR)" if program else ""
    return f"start the run again{again} (it stopped before its first checkpoint)"


def find_checkpoint(run_dir: str) -> str:
    """The checkpoint of a run directory, or a SetupError that says what is there instead."""
    if not os.path.isdir(run_dir):
        raise SetupError(f"--resume: {run_dir!r} is not a directory; pass the run directory of "
                         f"the training to continue (it holds config.yaml and checkpoints/)")
    path = checkpoint_path(run_dir)
    if not os.path.isfile(path):
        raise SetupError(f"--resume: {run_dir!r} holds no checkpoint ({CHECKPOINT} is missing): "
                         f"the run stopped before its first epoch ended, or this is not a fastsd "
                         f"run directory; start it again without --resume")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise SetupError(f"--resume: {run_dir!r} has a checkpoint but no config.yaml; it cannot "
                         f"be resumed")
    return path


def why_unreadable(error: Exception) -> str:
    """One line on why ``torch.load(..., weights_only=True)`` failed, for an error message:
    torch's own text runs to a dozen lines with terminal colour codes and advice to load
    unsafely, which fastsd never does (a pickle can run code)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"WeightsUnpickler error: (Unsupported global: GLOBAL \S+|[^\n.]*)", text)
    if refused:
        return (f"it pickles Python objects, which a weights-only load refuses: "
                f"{refused.group(1).strip()[:200]}")
    lines = text.strip().splitlines()
    return type(error).__name__ + (f": {lines[0][:200]}" if lines else "")


def load_checkpoint(path: str, device) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which, why, and what to do
        why = why_unreadable(e)
        raise SetupError(f"cannot read checkpoint {path} ({why}): the file is damaged (fastsd "
                         f"writes it atomically, so a kill does not tear it: a disk error or a "
                         f"copy cut short does) and no older one is kept; restore it from a "
                         f"copy, or start the run again with another --out") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise SetupError(f"{path} is not a fastsd training checkpoint (format "
                         f"{FORMAT_VERSION})")
    return state


# ------------------------------------------------------------------------- reading weight files
def find_model_file(run_dir: str, what: str) -> str:
    """The most useful weights in a run directory: model.safetensors, else the checkpoint;
    ``what``: the flag that named the directory, for the error."""
    for name in ("model.safetensors", CHECKPOINT):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    raise SetupError(f"{what}: {run_dir!r} holds neither model.safetensors nor {CHECKPOINT}: "
                     f"not a fastsd run directory, or its run has not finished an epoch; give "
                     f"the run's directory or a weights file")


def read_model_file(path: str, what: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(state_dict, metadata)`` from a safetensors file, a fastsd checkpoint or a state_dict."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                return {k: fh.get_tensor(k) for k in fh.keys()}, meta
        except Exception as e:
            raise SetupError(f"{what}: cannot read {path} as safetensors: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SetupError(f"{what}: cannot read {path} ({why_unreadable(e)}); expected a fastsd "
                         f"checkpoint, a .safetensors file or a torch.save'd state_dict (save "
                         f"model.state_dict(), not the model)") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT_VERSION and "model" in obj:
        return obj["model"], {"arch": obj.get("arch"), "num_classes": obj.get("num_classes")}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SetupError(f"{what}: {path} holds no state_dict (a mapping of names to tensors)")
    return obj, {}


def weights_fingerprint(state: Dict[str, torch.Tensor]) -> str:
    """A hash of the names, dtypes, shapes and bytes of a state_dict (wrapper prefixes removed):
    equal exactly when the weights are. A ResNet-152's 240 MB take ~0.3 s on one core."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(_without_wrapper_prefixes(state).items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def load_into(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load weights strictly, with prefixes of wrappers removed; ValueError lists what differs."""
    clean = _without_wrapper_prefixes(state)
    own = model.state_dict()
    missing = [k for k in own if k not in clean]
    unexpected = [k for k in clean if k not in own]
    shapes = [f"{k}: {tuple(clean[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in clean and tuple(clean[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise ValueError("; ".join(parts))
    model.load_state_dict(clean)
