"""Checks that run before the first step, where the data layer reads lazily.

Image folders are read by DataLoader workers while training; a broken file would otherwise stop
the run hours in. ``--check-images`` opens every file first: ``full`` decodes each one (what
training will do), ``header`` only identifies the format and size (fast: about a file-open per
image, minutes for ImageNet on a local disk), ``auto`` decodes folders of up to
``FULL_CHECK_LIMIT`` images and checks headers beyond.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

FULL_CHECK_LIMIT = 50_000


def check_image_folder(data_dir: str, num_classes: Optional[int], mode: str, workers: int) -> int:
    """Open every image of ``data_dir``'s train and eval splits; raise UnreadableImageError naming
    the first bad file (in folder order). Returns the number of files checked."""
    from fastsd.data.folders import read_image_size, read_rgb_image, scan_train_and_eval

    train, evaluation = scan_train_and_eval(data_dir, num_classes)
    paths = [p for split in (train, evaluation) for p, _ in split.samples]
    if mode == "auto":
        mode = "full" if len(paths) <= FULL_CHECK_LIMIT else "header"
    check = read_rgb_image if mode == "full" else read_image_size
    # PIL releases the GIL while decoding: threads are enough, and need no pickling.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(check, paths, chunksize=256):
            pass
    return len(paths)
