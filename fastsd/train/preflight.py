"""Checks that run before the first step, where the data layer reads lazily.

Image folders are read by DataLoader workers (or DALI) while training; a broken file would
otherwise stop the run hours in. ``--check-images`` opens every file first: ``full`` decodes each
one (what training will do), ``header`` only identifies the format and size (fast: about a
file-open per image, minutes for ImageNet on a local disk), ``auto`` decodes the evaluation split
whole (a bad file there would stop the run at its first evaluation, an epoch in; ImageNet's 50,000
images take a minute or two) and the training split too when it holds up to ``FULL_CHECK_LIMIT``
images, checking only headers of a larger one. Under DALI that matters more than elsewhere: DALI
2.4's CPU decoder ended the process with a segmentation fault, not an error, in most runs whose
batch of 20 to 100 images held a corrupt JPEG (README, "Training").
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Optional

FULL_CHECK_LIMIT = 50_000


def reads_image_files_while_training(dataset: str, data_dir, dali: bool, download: bool) -> bool:
    """Whether the run's loaders decode image files as they go, so that a broken one would stop
    the run in the middle: image folders always, CIFAR image folders under DALI (the torch path
    decodes those into memory as it builds its loaders, and names a bad file there)."""
    from fastsd.data.catalog import CIFAR_SETS, cifar_source

    if dataset == "imagefolder":
        return True
    return (dali and dataset in CIFAR_SETS and not download
            and cifar_source(dataset, data_dir) == "folder")


def check_image_folder(data_dir: str, num_classes: Optional[int], mode: str, workers: int,
                       formats: Optional[Collection[str]] = None,
                       dataset: str = "imagefolder") -> int:
    """Open every image of ``data_dir``'s train and eval splits; raise UnreadableImageError naming
    the first bad file (in folder order). ``formats``: the image formats (PIL's names) the
    pipeline decodes, where it decodes fewer than PIL (DALI: no GIF, whatever the file is
    called). ``dataset``: the data set's name, for the messages. Returns the number of files
    checked."""
    from fastsd.data.folders import (UnreadableImageError, read_image_header, read_rgb_image,
                                     scan_train_and_eval)

    train, evaluation = scan_train_and_eval(data_dir, num_classes, dataset)
    train_mode = eval_mode = mode
    if mode == "auto":
        train_mode = "full" if len(train) <= FULL_CHECK_LIMIT else "header"
        eval_mode = "full"
    # in folder order, so the first bad file found is the one named
    work = ([(p, train_mode) for p, _ in train.samples]
            + [(p, eval_mode) for p, _ in evaluation.samples])

    def check(item):
        path, mode = item
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
        for _ in pool.map(check, work, chunksize=256):
            pass
    return len(work)
