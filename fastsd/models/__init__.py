"""Models by name: the CIFAR ResNets and DenseNet-BC of fastsd, and every torchvision classifier.

>>> from fastsd.models import create_model, list_models, get_model_info
>>> model = create_model("resnet56", num_classes=100)        # CIFAR ResNet-56 (He et al. 2016)
>>> model = create_model("resnet50", num_classes=1000)       # torchvision's, randomly initialised
>>> get_model_info("resnet56").input_size, get_model_info("resnet50").input_size
(32, 224)

Names are case-insensitive and may use "-" (``"ResNet-20"``, ``"DenseNet-BC-100"`` work).
torchvision models are always built with ``weights=None``: nothing is ever downloaded. Every model
maps [B, 3, H, W] float images to [B, num_classes] logits, in train and eval mode (the auxiliary
heads of inception_v3 and googlenet are off by default so that training also returns one tensor;
pass ``aux_logits=True`` to get them back), and runs in channels_last memory format.
"""

import difflib
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from .cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, cifar_resnet
from .densenet import DenseNetBC, densenet_bc

__all__ = ["create_model", "list_models", "get_model_info", "model_input_size",
           "check_input_size", "ModelInfo",
           "CifarResNet", "DenseNetBC"]


@dataclass(frozen=True)
class ModelInfo:
    """What the trainer needs to know about a model name before building it."""

    name: str               #: canonical name, as listed by :func:`list_models`
    family: str             #: "cifar" (32x32 inputs, built here) or "imagenet" (torchvision)
    input_size: int         #: side of the square training / evaluation crop the design expects
    eval_resize_size: int   #: shorter side images are resized to before the centre crop (eval)
    source: str             #: "fastsd" or "torchvision"
    min_input_size: int = 1         #: the smallest side the network runs on
    fixed_input_size: bool = False  #: runs on ``input_size`` only (a ViT's position embedding)

    @property
    def eval_crop_fraction(self) -> Optional[float]:
        """The part of the resized shorter side its recipe's evaluation centre crop keeps
        (``input_size / eval_resize_size``: 0.875 for most, 1.0 for efficientnet_b7), for the data
        layer's ``eval_crop_fraction``; None for the CIFAR models, whose design has no resize."""
        return self.input_size / self.eval_resize_size if self.family == "imagenet" else None


# The smallest side each model runs on, found by forwards on the meta device at every side from
# 1 to 80 px (torchvision 0.29; each runs on every side above its bound): their pooling or
# strided stages leave nothing below it. Models not listed run on any side. The ViTs check for
# their one size; MaxViT's 7x7 windows fit 221-224 px only (up to 700).
_MIN_INPUT_SIZE = {
    "alexnet": 63, "inception_v3": 75, "googlenet": 15, "squeezenet1_0": 21,
    "squeezenet1_1": 17, "densenet_bc_100": 4, "densenet_bc_190": 4,
    **{f"densenet{depth}": 29 for depth in (121, 161, 169, 201)},
    **{f"convnext_{size}": 32 for size in ("tiny", "small", "base", "large")},
    **{f"vgg{depth}{bn}": 32 for depth in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"swin_{v2}{size}": 4 for v2 in ("", "v2_") for size in "tsb"},
}


def _fixed_input_size(name: str) -> bool:
    return name.startswith("vit_") or name == "maxvit_t"


_CIFAR_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}
for _depth in CIFAR_RESNET_DEPTHS:
    _CIFAR_BUILDERS[f"resnet{_depth}"] = (lambda d: (lambda num_classes, **kw:
                                                     cifar_resnet(d, num_classes, **kw)))(_depth)
_CIFAR_BUILDERS["densenet_bc_100"] = (lambda num_classes, **kw:
                                      densenet_bc(100, kw.pop("growth_rate", 12),
                                                  num_classes, **kw))
_CIFAR_BUILDERS["densenet_bc_190"] = (lambda num_classes, **kw:
                                      densenet_bc(190, kw.pop("growth_rate", 40),
                                                  num_classes, **kw))

@lru_cache(maxsize=None)
def _torchvision_eval_sizes(name: str) -> Tuple[int, int]:
    """``(crop, resize)`` of the model's own ImageNet-1k recipe, from torchvision's metadata of
    its IMAGENET1K_V1 weights (nothing is downloaded). The crop: 299 for inception_v3, 240 ... 600
    for efficientnet_b1 ... b7 (resolution is part of their compound scaling), 384 / 480 for
    efficientnet_v2, 256 for swin_v2; 224 for the rest. The shorter side before it: mostly the
    crop / 0.875 (256 <- 224), but the EfficientNets' recipes resize to about the crop (600 for
    b7). The two models whose only weights are fine-tuned at other sizes (regnet_y_128gf,
    vit_h_14) get 224 and 256."""
    import torchvision.models

    weights = {w.name: w for w in torchvision.models.get_model_weights(name)}
    recipe = weights.get("IMAGENET1K_V1")
    if recipe is None:
        return 224, 256
    transforms = recipe.transforms()
    return int(transforms.crop_size[0]), int(transforms.resize_size[0])

# Off by default so train() mode returns a tensor, not a namedtuple; init_weights=True silences
# torchvision's FutureWarning about their default initialisation (the behaviour is the same).
_TORCHVISION_DEFAULT_KWARGS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}
# torchvision's ResNets start with the last BatchNorm of every residual block at zero, so each
# block starts as the identity (Goyal et al., "Accurate, large minibatch SGD"; timm's default
# too). Without it the residual stream of a deep ResNet grows block by block: a ResNet-152 starts
# with a loss near 10 on 10 classes and stayed at chance on the quick demo, where with it it
# reached 42 % test error in 4 epochs. ``zero_init_residual=False`` gives torchvision's init.
# Every builder of torchvision's resnet module (ResNet, ResNeXt, Wide ResNet) takes the keyword.
def _torchvision_defaults(name: str) -> dict:
    import torchvision.models

    defaults = dict(_TORCHVISION_DEFAULT_KWARGS.get(name, {}))
    if torchvision.models.get_model_builder(name).__module__ == "torchvision.models.resnet":
        defaults["zero_init_residual"] = True
    return defaults


@lru_cache(maxsize=1)
def _torchvision_names() -> tuple:
    import torchvision.models

    # module=torchvision.models lists the classification models only (no detection/segmentation).
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def list_models(family: Optional[str] = None) -> List[str]:
    """All model names ``create_model`` accepts, sorted;
    ``family`` = "cifar" or "imagenet" filters."""
    if family not in (None, "cifar", "imagenet"):
        raise ValueError(f"family must be None, 'cifar' or 'imagenet', got {family!r}")
    names: List[str] = []
    if family in (None, "cifar"):
        names += sorted(_CIFAR_BUILDERS)
    if family in (None, "imagenet"):
        names += list(_torchvision_names())
    return sorted(names)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    for candidate in (key, key.replace("-", "_"), key.replace("-", "")):
        if candidate in _CIFAR_BUILDERS or candidate in _torchvision_names():
            return candidate
    # Separators in other places ("resnet_20", "DenseNet-BC_100"): compare without any, where
    # that is unambiguous (regnet_x_1_6gf and regnet_x_16gf are not).
    bare = key.replace("-", "").replace("_", "")
    found = [n for n in list_models() if n.replace("_", "") == bare]
    if len(found) == 1:
        return found[0]
    key = key.replace("-", "_")
    close = difflib.get_close_matches(key, list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} "
                     f"CIFAR models: {', '.join(list_models('cifar'))}; "
                     f"ImageNet models: every torchvision classification model by its name "
                     f"(resnet18 ... resnet152, ...). fastsd.models.list_models() lists all "
                     f"{len(list_models())}.")


def get_model_info(name: str) -> ModelInfo:
    """Family and expected input size of a model name (raises ValueError if unknown)."""
    key = _canonical(name)
    if key in _CIFAR_BUILDERS:
        return ModelInfo(key, "cifar", 32, 32, "fastsd", min_input_size=_MIN_INPUT_SIZE.get(key, 1))
    size, resize = _torchvision_eval_sizes(key)
    fixed = _fixed_input_size(key)
    return ModelInfo(key, "imagenet", size, resize, "torchvision",
                     min_input_size=size if fixed else _MIN_INPUT_SIZE.get(key, 1),
                     fixed_input_size=fixed)


def check_input_size(name: str, side: int) -> None:
    """ValueError, with the side to use, if the model cannot run on ``side`` x ``side`` images."""
    info = get_model_info(name)
    if info.fixed_input_size and side != info.input_size:
        raise ValueError(f"{info.name} runs on {info.input_size}x{info.input_size} images only, "
                         f"not {side}x{side}: use an image size of {info.input_size}")
    if side < info.min_input_size:
        raise ValueError(f"{info.name} needs images of at least {info.min_input_size}x"
                         f"{info.min_input_size} (its pooling leaves nothing of {side}x{side}): "
                         f"use an image size of {info.min_input_size} or more")


def model_input_size(name: str) -> int:
    """Side of the square input the model was designed for: 32 for the CIFAR models, the crop of
    its ImageNet recipe for torchvision's (224 for most, 299 for inception_v3, 600 for
    efficientnet_b7)."""
    return get_model_info(name).input_size


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a freshly initialised model: [B, 3, H, W] float images -> [B, num_classes] logits.

    ``kwargs`` go to the model's constructor: for the CIFAR ResNets ``shortcut`` ("A" or "B"),
    ``zero_init_residual``, ``width``; for DenseNet-BC ``growth_rate``, ``compression``,
    ``drop_rate``, ``memory_efficient``; for torchvision models their own keywords (``dropout``,
    ``aux_logits``, ``zero_init_residual`` (on by default for the ResNets), ...). Pretrained
    weights are never downloaded (``weights`` is refused).
    """
    key = _canonical(name)
    if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if kwargs.get("weights") is not None:
        raise ValueError("fastsd never downloads pretrained weights (weights must be None): build "
                         "the model and load a checkpoint or state_dict into it instead")
    kwargs.pop("weights", None)
    try:
        if key in _CIFAR_BUILDERS:
            return _CIFAR_BUILDERS[key](num_classes, **kwargs)
        import torchvision.models

        kwargs = {**_torchvision_defaults(key), **kwargs}
        return torchvision.models.get_model(key, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e) or "multiple values for" in str(e):
            # (multiple values: a keyword the name already fixes, as depth in densenet_bc_100)
            raise TypeError(f"model {key!r} does not accept {e}: check the model options") from e
        raise
