"""A small, learnable, deterministic image classification data set, generated in memory.

Each class has a fixed random template: a smooth colour pattern (a coarse random grid upsampled
to the image size). An image of class c is ``0.5 + s * (a * shift(T_c) + b * shift(T_d) + noise)``
clipped to [0, 1] and quantised to uint8: T_c shifted by a few pixels, at a random contrast a,
blended with a weaker template of another random class d (a distractor) and per-pixel Gaussian
noise. Networks learn it quickly (a ResNet-20 is far above chance after one or two epochs on a
CPU), but neither a linear model nor one step gets 100 %: the distractors and the noise make some
samples genuinely ambiguous.

The content depends only on the arguments (``seed`` included), never on global RNG state or on
the device, so every run and every process sees the same images.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["make_synthetic", "SYNTHETIC_DEFAULTS"]

#: (num_classes, image_size, train_size, test_size) when nothing else is asked for
SYNTHETIC_DEFAULTS = (10, 32, 5000, 1000)

_GRID = 8           # template resolution before upsampling:
                    # patterns vary on a scale of S / 8 pixels
_MAX_SHIFT = 4      # pixels of random translation, each axis
_NOISE = 1.0        # per-pixel noise, in units of the template's standard deviation
_DISTRACTOR = 0.7   # weight of the other class's template
_SCALE = 0.16       # template std in [0, 1] pixel units


def _templates(num_classes: int, image_size: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(num_classes, 3, _GRID, _GRID, generator=g, dtype=torch.float32)
    t = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
    t = t - t.mean(dim=(1, 2, 3), keepdim=True)
    return t / t.std(dim=(1, 2, 3), keepdim=True)


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Translate each image of [N, C, H, W] by (dy[n], dx[n]) pixels, filling with edge values."""
    n, _, h, w = x.shape
    rows = (torch.arange(h)[None, :] - dy[:, None]).clamp_(0, h - 1)   # [N, H]
    cols = (torch.arange(w)[None, :] - dx[:, None]).clamp_(0, w - 1)   # [N, W]
    idx = torch.arange(n)[:, None, None, None]
    ch = torch.arange(x.shape[1])[None, :, None, None]
    return x[idx, ch, rows[:, None, :, None], cols[:, None, None, :]]


def _sample(templates: torch.Tensor, n: int,
            g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    k, _, s, _ = templates.shape
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    other = (labels + torch.randint(1, max(k, 2), (n,), generator=g)) % k if k > 1 else labels
    a = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    b = _DISTRACTOR * torch.rand(n, 1, 1, 1, generator=g)
    shifts = torch.randint(-_MAX_SHIFT, _MAX_SHIFT + 1, (4, n), generator=g)
    x = a * _shift(templates[labels], shifts[0], shifts[1])
    x = x + b * _shift(templates[other], shifts[2], shifts[3])
    x = x + _NOISE * torch.randn(n, 3, s, s, generator=g)
    x = (0.5 + _SCALE * x).clamp_(0.0, 1.0)
    images = (x * 255.0).round_().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous(), labels.to(torch.int64)


def make_synthetic(num_classes: int = 10, image_size: int = 32, train_size: int = 5000,
                   test_size: int = 1000, seed: int = 0):
    """Generate the data set.

    Returns ``(train_images, train_labels, test_images, test_labels)``: uint8 images
    [N, H, W, 3] (channels last, like decoded image files) and int64 labels [N] on the CPU.
    """
    for name, v, lo in (("num_classes", num_classes, 2), ("image_size", image_size, 8),
                        ("train_size", train_size, 1), ("test_size", test_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"synthetic {name} must be an int >= {lo}, got {v!r}")
    g = torch.Generator().manual_seed(int(seed))
    templates = _templates(num_classes, image_size, g)
    train = _sample(templates, train_size, g)
    test = _sample(templates, test_size, g)
    return train[0], train[1], test[0], test[1]
