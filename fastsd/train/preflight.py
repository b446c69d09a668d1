"""Checks that run before the first step, where the data layer reads lazily.

Image folders are read by DataLoader workers while training; a broken file would otherwise stop
the run hours in. ``--check-images`` opens every file first: ``full`` decodes each one (what
training will do), ``header`` only identifies the format and size (fast: about a file-open per
image, minutes for ImageNet on a local disk), ``auto`` decodes folders of up to
``FULL_CHECK_LIMIT`` images and checks headers beyond.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Optional

FULL_CHECK_LIMIT = 50_000


def check_image_folder(data_dir: str, num_classes: Optional[int], mode: str, workers: int,
                       formats: Optional[Collection[str]] = None) -> int:
    """Open every image of ``data_dir``'s train and eval splits; raise UnreadableImageError naming
    the first bad file (in folder order). ``formats``: the image formats (PIL's names) the
    pipeline decodes, where it decodes fewer than PIL (DALI: no GIF, whatever the file is
    called). Returns the number of files checked."""
    from fastsd.data.folders import (UnreadableImageError, read_image_header, read_rgb_image,
                                     scan_train_and_eval)

    train, evaluation = scan_train_and_eval(data_dir, num_classes)
    paths = [p for split in (train, evaluation) for p, _ in split.samples]
    if mode == "auto":
        mode = "full" if len(paths) <= FULL_CHECK_LIMIT else "header"

    def check(path):
        if mode == "full":
            read_rgb_image(path)
        if formats is not None or mode != "full":
            kind, _ = read_image_header(path)
            if formats is not None and kind not in formats:
                raise UnreadableImageError(
                    f"image file {path!r} holds {kind} data, which the DALI pipeline does not "
                    f"decode ({', '.join(sorted(formats))}): convert it to JPEG, or drop --dali")

    # PIL releases the GIL while decoding: threads are enough, and need no pickling.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(check, paths, chunksize=256):
            pass
    return len(paths)
