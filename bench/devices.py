"""What the benchmarks record as their device: the GPU's name (an H100 and an A100 are both
"cuda"), or "cpu"."""

import torch


def device_label(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
