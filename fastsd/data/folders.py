"""Finding and checking image folders (ImageFolder / ImageNet layout) for both input pipelines.

Layout: ``root/train/<class>/**/<image>`` and ``root/val/<class>/...`` (or ``root/test/...``).
Classes are the sorted names of the sub-folders and the images of a class are in the order of
``torchvision.datasets.ImageFolder``, so label ``i`` and sample ``j`` mean the same in fastsd,
torchvision and DALI. One difference: hidden folders and files (names starting with ``.``, such as
``.ipynb_checkpoints/`` or macOS's ``._photo.jpg``) are skipped, where torchvision would count a
hidden folder as a class and try to decode a hidden file.

Every problem a user can fix is raised here, before training, with the path and the fix:
:class:`FileNotFoundError` for a missing folder, :class:`ValueError` for a wrong layout.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "ImageFolderSplit", "find_split_dirs",
           "scan_image_folder", "scan_train_and_eval", "read_rgb_image", "read_image_size",
           "check_image_sizes", "wrong_size_error"]

#: the extensions torchvision's ImageFolder accepts (compared case-insensitively)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLIT_NAMES = ("val", "test")

PathLike = Union[str, "os.PathLike[str]"]


class UnreadableImageError(ValueError):
    """An image file could not be opened or decoded; the message names the file.

    Takes one message argument so a DataLoader worker can re-raise it in the main process.
    """


@dataclass(frozen=True)
class ImageFolderSplit:
    """One split of an image folder: files in a fixed order and their labels."""

    root: Path
    classes: Tuple[str, ...]
    samples: Tuple[Tuple[str, int], ...]   #: (path, label), sorted by class then path

    def __len__(self) -> int:
        return len(self.samples)


def _check_dir(path: Path, what: str, fix: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: {fix}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a directory (archives must be "
                                f"extracted first): {fix}")


def find_split_dirs(data_dir: Optional[PathLike], dataset: str = "imagefolder",
                    need_train: bool = True) -> Tuple[Optional[Path], Path]:
    """``(data_dir/train, data_dir/val or data_dir/test)``, or a clear error
    saying what is missing; without ``need_train`` a missing train/ gives None."""
    layout = (f"{dataset} expects DIR/train/<class>/<images> and DIR/val/<class>/<images> "
              f"(or DIR/test/...)")
    if data_dir is None or str(data_dir) == "":
        raise FileNotFoundError(f"no data directory given for dataset {dataset!r}: pass one "
                                f"(--data DIR); {layout}")
    root = Path(data_dir).expanduser()
    _check_dir(root, "data directory", f"pass the folder that holds train/ and val/; {layout}")
    train = root / "train"
    if not train.is_dir():
        if need_train:
            raise FileNotFoundError(f"no train/ folder in {str(root)!r}: {layout}")
        train = None
    for name in EVAL_SPLIT_NAMES:
        if (root / name).is_dir():
            return train, root / name
    raise FileNotFoundError(f"no val/ or test/ folder in {str(root)!r}: {layout}")


def _walk_images(class_dir: Path) -> List[str]:
    found = []
    # torchvision's order: folders sorted by their whole path (so "a-b" before "a/sub", as "-"
    # sorts before "/"), then files by name
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
        if any(part.startswith(".") for part in Path(dirpath).relative_to(class_dir).parts):
            continue  # a hidden folder inside the class (.AppleDouble/, .thumbnails/)
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append(os.path.join(dirpath, f))
    return found


def _class_folders(root: Path) -> List[str]:
    """The class names of a split folder: its sub-folders, sorted, hidden ones left out."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(split_dir: PathLike, num_classes: Optional[int] = None) -> ImageFolderSplit:
    """List the images of one split folder (``<split_dir>/<class>/**/<image>``), checked.

    Raises FileNotFoundError if the folder is missing, ValueError if it holds no class folders,
    a class folder holds no image, or the class count differs from ``num_classes`` (when given).
    """
    root = Path(split_dir).expanduser()
    _check_dir(root, "image folder", "create it with one sub-folder per class")
    classes = _class_folders(root)
    if not classes:
        raise ValueError(f"image folder {str(root)!r} holds no class folders: put each class's "
                         f"images in its own sub-folder ({root}/<class>/<image>.jpg)")
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"image folder {str(root)!r} has {len(classes)} class folders but "
                         f"num_classes is {num_classes}: fix the folder layout or pass "
                         f"--num-classes {len(classes)}")
    samples: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = _walk_images(root / name)
        if not files:
            raise ValueError(f"class folder {str(root / name)!r} holds no images (extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder")
        samples.extend((f, label) for f in files)
    return ImageFolderSplit(root, tuple(classes), tuple(samples))


def scan_train_and_eval(data_dir: Optional[PathLike], num_classes: Optional[int] = None,
                        dataset: str = "imagefolder", eval_only: bool = False
                        ) -> Tuple[Optional[ImageFolderSplit], ImageFolderSplit]:
    """Scan ``data_dir/train`` and ``data_dir/val`` (or ``test``) and check their classes agree.

    eval_only: the training split is not scanned (None in its place) and may be missing; where it
    is there, its class folder names must still be the evaluation split's, as they set the labels.
    """
    train_dir, eval_dir = find_split_dirs(data_dir, dataset, need_train=not eval_only)
    train = None if eval_only else scan_image_folder(train_dir, num_classes)
    evaluation = scan_image_folder(eval_dir, num_classes)
    if train is not None:
        train_classes = list(train.classes)
    elif train_dir is not None:
        train_classes = _class_folders(train_dir)
    else:
        train_classes = list(evaluation.classes)
    if train_classes != list(evaluation.classes):
        only_train = sorted(set(train_classes) - set(evaluation.classes))
        only_eval = sorted(set(evaluation.classes) - set(train_classes))
        raise ValueError(f"the class folders of {str(train_dir)!r} and {str(evaluation.root)!r} "
                         f"differ (only in train: {_short(only_train)}; only in "
                         f"{evaluation.root.name}: {_short(only_eval)}): both splits need the "
                         f"same class folders, or the labels would not mean the same classes")
    return train, evaluation


def _short(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def wrong_size_error(path: str, width: int, height: int, expected: int) -> ValueError:
    """The error for an image of a CIFAR image folder that is not ``expected`` pixels square."""
    return ValueError(f"image file {path!r} is {width}x{height}, expected {expected}x{expected} "
                      f"(a CIFAR image folder holds 32x32 images; use --dataset imagefolder for "
                      f"other sizes)")


def check_image_sizes(paths: Sequence[str], size: int, workers: int = 1) -> None:
    """Raise :func:`wrong_size_error` for the first of ``paths`` (in order) whose header does not
    say ``size`` x ``size`` (UnreadableImageError for a file that is no image). Reads headers only:
    about a file-open per image."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, (width, height) in zip(paths, pool.map(read_image_size, paths, chunksize=256)):
            if (width, height) != (size, size):
                raise wrong_size_error(path, width, height, size)


def _unreadable(path: str, error: Exception) -> UnreadableImageError:
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):  # a valid image, only a large one
        return UnreadableImageError(f"image file {path!r} is larger than PIL's limit ({error}): "
                                    f"shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is "
                                    f"meant to be this large")
    return UnreadableImageError(f"cannot read image file {path!r} ({type(error).__name__}: "
                                f"{error}): replace or delete the file")


def _errors_of_pil():
    """What PIL raises for a file it cannot read (the bomb check raises from Image.open)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def read_image_header(path: str) -> Tuple[str, Tuple[int, int]]:
    """``(format, (width, height))`` from the image's header alone (fast: no decoding), the
    format as PIL names it ("JPEG", "PNG", "GIF", ...); UnreadableImageError names a file that
    is no image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format, img.size
    except _errors_of_pil() as e:
        raise _unreadable(path, e) from e


def read_image_size(path: str) -> Tuple[int, int]:
    """``(width, height)`` from the image's header alone; see :func:`read_image_header`."""
    return read_image_header(path)[1]


def read_rgb_image(path: str):
    """Open and fully decode an image as an RGB PIL image; UnreadableImageError names the file.

    16-bit grayscale (PNG, TIFF) keeps its top 8 bits, as DALI's decoder does; PIL's own
    conversion would clip every value above 255 and give a white image. 32-bit pixels (integer
    or float) have no one 8-bit meaning and are refused."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()                  # decode now, while the file is open: errors surface here
    except _errors_of_pil() as e:
        raise _unreadable(path, e) from e
    # (older Pillow opened a 16-bit PNG as 32-bit "I"; a PNG holds at most 16 bits a channel)
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        import numpy as np

        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        kind = "float" if img.mode == "F" else "integer"
        raise UnreadableImageError(f"image file {path!r} has 32-bit {kind} pixels, which no "
                                   f"8-bit image holds: convert it to 8 bits per channel")
    return img.convert("RGB")
