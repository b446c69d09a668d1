"""Teachers: snapshots kept in a :class:`fastsd.SnapshotStore`, and the forward pass that runs them.

A teacher forward takes the student's (normalised, float32) batch and returns logits in the
teacher's precision, with no autograd graph. In half precision (fp16 on CUDA, bf16 on CPUs with
native bf16) the teacher is the store's own module, whose parameters are views into the slot;
in fp32 one float32 copy of the architecture is loaded from the slot when a stage starts (the
weights are still exactly the stored half-precision values, widened).
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .step import TEACHER_DTYPES


class Teachers:
    """``num_slots`` snapshots of models shaped like ``model``, and their forward passes."""

    def __init__(self, model: nn.Module, num_slots: int, teacher_dtype: str, device):
        from fastsd import SnapshotStore

        self.dtype = TEACHER_DTYPES[teacher_dtype]
        self.device = torch.device(device)
        half = self.dtype in (torch.float16, torch.bfloat16)
        # fp32 teachers are widened from fp16 storage: fp16 keeps 3 more mantissa bits than bf16.
        self.store_dtype = self.dtype if half else torch.float16
        self.store = SnapshotStore(model, capacity=num_slots, dtype=self.store_dtype,
                                   device=self.device)
        self.num_slots = num_slots
        self.half = half
        self.captured: List[bool] = [False] * num_slots
        self._forwards: Dict[int, Callable] = {}
        self._shell: Optional[nn.Module] = None
        self._shell_slot: Optional[int] = None
        if not half:
            from fastsd.snapshots import copy_without_user_hooks

            self._shell = copy_without_user_hooks(model).eval()
            for p in self._shell.parameters():
                p.requires_grad_(False)

    def capture(self, model: nn.Module, slot: int) -> None:
        """Copy ``model``'s current weights (parameters and buffers) into ``slot``."""
        with torch.no_grad():
            self.store.capture(model, slot=slot)
        self.captured[slot] = True
        if self._shell_slot == slot:
            self._shell_slot = None  # the fp32 copy is stale now

    def module(self, slot: int) -> nn.Module:
        """The teacher network of ``slot``: eval mode, no grad, in the teacher precision."""
        if not self.captured[slot]:
            raise RuntimeError(f"snapshot slot {slot} was never captured")
        teacher = self.store.teacher(slot)
        if self.half:
            return teacher
        if self._shell_slot != slot:
            with torch.no_grad():
                src = teacher.state_dict()
                for name, dst in self._shell.state_dict().items():
                    dst.copy_(src[name])
            self._shell_slot = slot
        return self._shell

    def forward(self, slot: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f(images [B,3,H,W] float) -> logits [B,C]`` of ``slot``.

        Half precision: one callable per slot (a compiled version is reused across cycles). fp32:
        the one float32 copy, loaded with ``slot`` now; it serves one slot at a time.
        """
        module = self.module(slot)
        if not self.half:
            return module
        if slot not in self._forwards:
            dtype = self.dtype

            def forward(images, _m=module):
                return _m(images.to(dtype))

            self._forwards[slot] = forward
        return self._forwards[slot]

    def state_dict(self):
        return {"store": self.store.state_dict(), "captured": list(self.captured)}

    def load_state_dict(self, state) -> None:
        self.store.load_state_dict(state["store"])
        self.captured = list(state["captured"])
        self._shell_slot = None


def load_teacher_weights(path: str, arch: str, num_classes: int) -> Dict[str, torch.Tensor]:
    """Read a KD teacher's weights from a fastsd run directory, a fastsd checkpoint, a
    ``.safetensors`` file or a plain ``state_dict`` file; check the architecture where recorded."""
    import os

    from .checkpoint import find_model_file, read_model_file
    from .errors import SetupError

    if not os.path.exists(path):
        raise SetupError(f"--teacher-checkpoint: {path!r} does not exist; give a fastsd run "
                         f"directory, its model.safetensors, a checkpoint or a state_dict file")
    file = find_model_file(path, "--teacher-checkpoint") if os.path.isdir(path) else path
    state, meta = read_model_file(file, "--teacher-checkpoint")
    if meta.get("arch") and meta["arch"] != arch:
        raise SetupError(f"--teacher-checkpoint: {file} holds a {meta['arch']} but "
                         f"--teacher-arch is {arch}; pass --teacher-arch {meta['arch']}")
    if meta.get("num_classes") and int(meta["num_classes"]) != num_classes:
        raise SetupError(f"--teacher-checkpoint: {file} was trained for {meta['num_classes']} "
                         f"classes but this data set has {num_classes}; a teacher must score the "
                         f"same classes as the student")
    return state


def build_kd_teacher(arch: str, num_classes: int, path: str, *, device, channels_last: bool
                     ) -> Tuple[nn.Module, str]:
    """The trained KD teacher as a float32 model in eval mode (its snapshot is taken from it),
    and the fingerprint of its weights (a resumed run checks that its teacher is the same)."""
    from fastsd.models import create_model

    from .checkpoint import load_into, weights_fingerprint
    from .errors import SetupError

    state = load_teacher_weights(path, arch, num_classes)
    fingerprint = weights_fingerprint(state)
    model = create_model(arch, num_classes)
    try:
        load_into(model, state)
    except ValueError as e:
        raise SetupError(f"--teacher-checkpoint: {path} does not fit a {arch} with "
                         f"{num_classes} classes ({e}); check --teacher-arch and the data set"
                         ) from None
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False), fingerprint
