"""The torch input pipeline: epoch semantics, sharding, layouts, real CIFAR-10 JPEGs, bad input."""

import itertools
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from fastsd.data import (CIFAR10_MEAN, CIFAR10_STD, DataLoaders, UnreadableImageError,
                         build_loaders, list_datasets, make_synthetic, scan_image_folder)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def small_synthetic(**kw):
    args = dict(batch_size=16, seed=3, synthetic_size=(100, 37))
    args.update(kw)
    return build_loaders("synthetic", **args)


def epoch_batches(loader, epoch, limit=None):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, limit)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def write_image(path, size=(8, 8), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root, classes, per_class=2, splits=("train", "val"), size=(8, 8)):
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", size, (10 * c, 3 * i, 100))
    return root


# ------------------------------------------------------------------------------------------
# Real data: a subset of CIFAR-10 as JPEG files (20 train, 10 test images per class).

def test_cifar10_jpeg_subset_loads_with_the_right_labels(cifar_jpeg):
    dl = build_loaders("cifar10", cifar_jpeg, batch_size=32, eval_batch_size=64, workers=2)
    assert dl.info.class_names == CIFAR10_CLASSES
    assert (dl.info.num_classes, dl.info.train_size, dl.info.test_size) == (10, 200, 100)
    assert dl.info.image_size == 32 and dl.info.mean == CIFAR10_MEAN
    images, labels = map(torch.cat, zip(*dl.test))
    # Sorted by class folder, then by file name: test/<class>/0000.jpg ... 0009.jpg.
    assert torch.equal(labels, torch.arange(10).repeat_interleave(10))
    for idx in (0, 37, 99):
        cls, n = divmod(idx, 10)
        with Image.open(cifar_jpeg / "test" / CIFAR10_CLASSES[cls] / f"{n:04d}.jpg") as im:
            pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
        expected = ((pixels - torch.tensor(CIFAR10_MEAN)[:, None, None])
                    / torch.tensor(CIFAR10_STD)[:, None, None])
        torch.testing.assert_close(images[idx], expected, rtol=0, atol=1e-5)
    # The training set has every class 20 times per epoch (drop_last: 6 batches of 32 = 192).
    dl.train.set_epoch(0)
    train_labels = torch.cat([y for _, y in dl.train])
    assert len(train_labels) == 192 and torch.bincount(train_labels, minlength=10).max() <= 20


def test_cifar_image_folder_matches_imagefolder_path(cifar_jpeg):
    """The same CIFAR files through the in-memory path and through DataLoader workers."""
    mem = build_loaders("cifar10", cifar_jpeg, batch_size=16, workers=0)
    files = build_loaders("imagefolder", cifar_jpeg, batch_size=16, workers=0, image_size=32)
    assert files.info.class_names == CIFAR10_CLASSES and files.info.test_size == 100
    x_mem, y_mem = map(torch.cat, zip(*mem.test))
    x_files, y_files = map(torch.cat, zip(*files.test))
    assert torch.equal(y_mem, y_files)
    # Same pixels; only the normalisation constants differ (CIFAR-10's vs ImageNet's).
    def pixels(x, info):
        return x * torch.tensor(info.std)[:, None, None] + torch.tensor(info.mean)[:, None, None]
    torch.testing.assert_close(pixels(x_mem, mem.info), pixels(x_files, files.info),
                               rtol=0, atol=1e-5)


def test_image_folder_batches_do_not_depend_on_workers(cifar_jpeg):
    """set_epoch fixes order and augmentation, also across worker processes."""
    results = []
    for workers in (0, 2):
        for size in (32, 72):  # CIFAR-style and ImageNet-style augmentation
            dl = build_loaders("imagefolder", cifar_jpeg, batch_size=16, workers=workers,
                               image_size=size, seed=5)
            assert len(dl.train) == 200 // 16
            first = epoch_batches(dl.train, 2, limit=3)
            again = epoch_batches(dl.train, 2, limit=3)
            other = epoch_batches(dl.train, 3, limit=3)
            assert same_batches(first, again) and not same_batches(first, other)
            assert all(x.shape == (16, 3, size, size) for x, _ in first)
            results.append(first)
    assert same_batches(results[0], results[2]) and same_batches(results[1], results[3])


@pytest.mark.parametrize("source", ["memory", "files"])
def test_a_pass_can_start_mid_epoch_without_reading_the_batches_before(source, cifar_jpeg,
                                                                       monkeypatch):
    """set_epoch(e, start=k), what a resumed run asks for: batches k .. len-1 of epoch e, equal to
    a whole pass's (order and augmentation), and the files of batches 0 .. k-1 are not read (a
    resume late in an ImageNet epoch would otherwise decode most of the epoch first). The same
    for the evaluation split; a start outside [0, len] is refused."""
    import fastsd.data.torch_data as torch_data

    dl = (small_synthetic() if source == "memory" else
          build_loaders("imagefolder", cifar_jpeg, batch_size=16, eval_batch_size=30, workers=0,
                        image_size=32, seed=5))
    for loader, k in ((dl.train, 4), (dl.test, 2)):
        whole = epoch_batches(loader, 3)
        reads = []
        if source == "files":
            read = torch_data.read_rgb_image
            monkeypatch.setattr(torch_data, "read_rgb_image", lambda p: reads.append(p) or read(p))
        loader.set_epoch(3, start=k)
        tail = [(x.clone(), y.clone()) for x, y in loader]
        monkeypatch.undo()
        assert same_batches(tail, whole[k:])
        if source == "files":
            assert len(reads) == sum(y.shape[0] for _, y in whole[k:])
        assert same_batches(epoch_batches(loader, 3), whole)  # set_epoch(e) starts at 0 again
        loader.set_epoch(3, start=len(loader))
        assert list(loader) == []
        with pytest.raises(ValueError,
                           match=f"start must be a batch index in \\[0, {len(loader)}\\]"):
            loader.set_epoch(3, start=len(loader) + 1)


def test_worker_loaders_shut_down_fast_when_garbage_collected(tmp_path):
    """A loader freed by the cycle collector (mid-epoch too) must not wait for its workers:
    with persistent DataLoader workers this took 5 s per worker."""
    import gc
    import time

    make_folder(tmp_path, ["a", "b"], per_class=8, size=(8, 8))
    dl = build_loaders("imagefolder", tmp_path, batch_size=2, workers=2, image_size=8)
    list(dl.test)
    for i, _ in enumerate(dl.train):
        if i == 1:
            break
    dl.cycle = dl
    del dl
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 4.0


# the shorter side before the 96-pixel centre crop: 96 / 0.875 by default, as the fraction says
@pytest.mark.parametrize("fraction,resize", [(None, 110), (1.0, 96), (0.8, 120), (224 / 232, 99)])
def test_imagenet_style_eval_is_resize_and_center_crop(tmp_path, fraction, resize):
    root = make_folder(tmp_path, ["a", "b"], per_class=1, size=(40, 30))
    dl = build_loaders("imagefolder", root, batch_size=2, workers=0, image_size=96,
                       eval_crop_fraction=fraction)
    x, y = next(iter(dl.test))
    assert x.shape == (2, 3, 96, 96) and y.tolist() == [0, 1]
    img = Image.open(root / "val" / "b" / "0.png").convert("RGB")
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize(resize),
                                         torchvision.transforms.CenterCrop(96),
                                         torchvision.transforms.ToTensor(),
                                         torchvision.transforms.Normalize(dl.info.mean,
                                                                          dl.info.std)])
    torch.testing.assert_close(x[1], tf(img), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01, "0.9", True, float("nan")])
def test_eval_crop_fraction_out_of_range_is_refused(tmp_path, fraction):
    root = make_folder(tmp_path, ["a", "b"], per_class=1)
    with pytest.raises(ValueError, match=r"eval_crop_fraction must be a number in \(0, 1\]"):
        build_loaders("imagefolder", root, batch_size=1, workers=0, eval_crop_fraction=fraction)


@pytest.mark.parametrize("size", [16, 72], ids=["cifar-style", "imagenet-style"])
def test_image_folder_training_batches_are_the_drawn_augmentation(tmp_path, size):
    """The torch path's training images, pixel by pixel: each sample's crop and flip drawn from
    its augmentation seed (the sampler's key) and applied with torchvision's functions, as
    torchvision's RandomCrop(padding=4) + flip (small images) or RandomResizedCrop + flip do.
    The epoch must hold both flips and more than one crop window."""
    import random

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from fastsd.data.torch_data import _random_resized_crop_params

    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(6):
            pixels = rng.integers(0, 256, (size + 7, size + 3, 3), dtype=np.uint8)
            for split in ("train", "val"):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    dl = build_loaders("imagefolder", tmp_path, batch_size=4, workers=0, image_size=size, seed=2)
    loader = dl.train
    loader.set_epoch(1)
    keys = [key for batch in loader.sampler for key in batch]
    got = torch.cat([x for x, _ in loader])
    flips, windows, expected = set(), set(), []
    for i, aug_seed in keys:
        img = Image.open(loader.dataset.path(i)).convert("RGB")
        draw = random.Random(aug_seed)
        if size <= 64:  # CIFAR style: resized to the size, then pad-4 crop and flip
            img = img.resize((size, size), Image.BILINEAR)
            oy, ox = draw.randint(0, 8), draw.randint(0, 8)
            window = (oy, ox)
            img = TF.crop(TF.pad(img, 4), oy, ox, size, size)
        else:
            top, left, h, w = _random_resized_crop_params(img.width, img.height, draw)
            window = (top, left, h, w)
            img = TF.resized_crop(img, top, left, h, w, [size, size],
                                  interpolation=InterpolationMode.BILINEAR)
        flip = draw.random() < 0.5
        flips.add(flip)
        windows.add(window)
        expected.append(TF.normalize(TF.to_tensor(TF.hflip(img) if flip else img),
                                     dl.info.mean, dl.info.std))
    assert flips == {True, False} and len(windows) > 1
    diff = (got - torch.stack(expected)).abs() * torch.tensor(dl.info.std).view(3, 1, 1) * 255
    if size <= 64:
        assert diff.max() < 1e-3          # the same pixels
    else:  # PIL resizes the box of the whole image, torchvision the cut-out crop: edges differ
        assert diff.mean() < 2.0 and diff.median() < 0.5


# ------------------------------------------------------------------------------------------
# Epoch semantics on the in-memory path.

def test_set_epoch_is_deterministic_and_new_each_epoch():
    a = small_synthetic()
    e0, e0_again, e1 = (epoch_batches(a.train, 0), epoch_batches(a.train, 0),
                        epoch_batches(a.train, 1))
    assert same_batches(e0, e0_again)
    assert not same_batches(e0, e1)
    # A fresh loader jumping straight to epoch 1 (a resumed run) sees the very same batches.
    b = small_synthetic()
    assert same_batches(epoch_batches(b.train, 1), e1)
    # Another seed gives another order and augmentation over the same images.
    c = small_synthetic(seed=4)
    assert not same_batches(epoch_batches(c.train, 1), e1)
    # The global RNG plays no part.
    torch.manual_seed(123)
    assert same_batches(epoch_batches(small_synthetic().train, 1), e1)


def test_train_drops_the_last_partial_batch_and_visits_distinct_samples():
    dl = small_synthetic(batch_size=30)          # 100 samples -> 3 batches of 30
    assert len(dl.train) == 3
    batches = epoch_batches(dl.train, 0)
    assert [len(y) for _, y in batches] == [30, 30, 30]
    idx = dl.train.epoch_plan(0)[0]
    assert len(idx) == 90 and len(set(idx.tolist())) == 90


def test_train_augmentation_is_pad4_crop_and_flip():
    dl = small_synthetic()
    raw, labels, _, _ = make_synthetic(10, 32, 100, 37)
    dl.train.set_epoch(7)
    x, y = next(iter(dl.train))
    idx, oy, ox, flip = dl.train.epoch_plan(7)
    assert flip[:16].any() and not flip[:16].all()
    # the crop's corner in the padded image takes every value 0..8 on both axes over the epoch
    assert set(oy.tolist()) == set(ox.tolist()) == set(range(9))
    assert torch.equal(y.cpu(), labels[idx[:16]])  # each image with its own label
    mean = torch.tensor(dl.info.mean)[:, None, None]
    std = torch.tensor(dl.info.std)[:, None, None]
    for k in range(16):
        img = F.pad(raw[idx[k]].permute(2, 0, 1).float() / 255, (4, 4, 4, 4))
        img = img[:, oy[k]:oy[k] + 32, ox[k]:ox[k] + 32]
        if flip[k]:
            img = img.flip(-1)
        torch.testing.assert_close(x[k], (img - mean) / std, rtol=0, atol=1e-5)


def test_test_split_yields_every_sample_once_in_order_also_over_two_ranks():
    whole = small_synthetic(eval_batch_size=10)
    assert len(whole.test) == 4                                   # 37 samples: 10+10+10+7
    x, y = map(torch.cat, zip(*whole.test))
    assert len(y) == 37
    x2, y2 = map(torch.cat, zip(*whole.test))
    assert torch.equal(x, x2) and torch.equal(y, y2)              # fixed order, no augmentation
    _, _, _, test_labels = make_synthetic(10, 32, 100, 37)
    assert torch.equal(y, test_labels)
    parts = [small_synthetic(eval_batch_size=10, rank=r, world_size=2) for r in range(2)]
    shards = [tuple(map(torch.cat, zip(*p.test))) for p in parts]
    assert [len(s[1]) for s in shards] == [18, 19]                # no padding, no duplicates
    assert torch.equal(torch.cat([s[0] for s in shards]), x)
    assert torch.equal(torch.cat([s[1] for s in shards]), y)


def test_train_shards_are_disjoint_and_reshuffled_each_epoch():
    ranks = [small_synthetic(batch_size=8, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0].train) == len(ranks[1].train) == 50 // 8
    plans = {e: [set(r.train.epoch_plan(e)[0].tolist()) for r in ranks] for e in (0, 1)}
    for e in (0, 1):
        assert not plans[e][0] & plans[e][1]
        assert len(plans[e][0]) == len(plans[e][1]) == 48
    assert plans[0][0] != plans[1][0]
    # Each shard is a slice of the single-process permutation (the same in every process).
    # (batch size 1: the whole permutation of the 100 samples)
    perm = small_synthetic(batch_size=1).train.epoch_plan(1)[0].tolist()
    assert plans[1][0] == set(perm[:48]) and plans[1][1] == set(perm[50:98])


@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_shapes_dtypes_device_and_memory_format(channels_last, tmp_path):
    root = make_folder(tmp_path, ["x", "y"], per_class=4, size=(12, 12))
    loaders = [small_synthetic(channels_last=channels_last),
               build_loaders("imagefolder", root, batch_size=4, workers=0, image_size=16,
                             channels_last=channels_last)]
    for dl in loaders:
        assert isinstance(dl, DataLoaders)
        for loader in (dl.train, dl.test):
            loader.set_epoch(0)
            x, y = next(iter(loader))
            size = dl.info.image_size
            assert x.shape == (len(y), 3, size, size) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and y.dim() == 1
            assert x.device.type == y.device.type == "cpu"
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.is_contiguous(memory_format=fmt)
            assert 0 <= int(y.min()) and int(y.max()) < dl.info.num_classes


def test_synthetic_is_deterministic_sized_and_balanced():
    a = make_synthetic(5, 16, 50, 20, seed=1)
    b = make_synthetic(5, 16, 50, 20, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], make_synthetic(5, 16, 50, 20, seed=2)[0])
    assert (a[0].shape == (50, 16, 16, 3) and a[0].dtype == torch.uint8
            and a[2].shape == (20, 16, 16, 3))
    assert torch.bincount(a[1]).tolist() == [10] * 5
    dl = build_loaders("synthetic", batch_size=8, num_classes=5, image_size=16, synthetic_size=64)
    assert ((dl.info.num_classes, dl.info.image_size, dl.info.train_size, dl.info.test_size)
            == (5, 16, 64, 12))
    # [64]: config.yaml's spelling of --synthetic-size 64 (fastsd.evaluate passes it on)
    one = build_loaders("synthetic", batch_size=8, num_classes=5, image_size=16,
                        synthetic_size=[64])
    assert (one.info.train_size, one.info.test_size) == (64, 12)


def test_synthetic_data_is_learnable_but_not_trivial():
    torch.manual_seed(0)
    dl = build_loaders("synthetic", batch_size=100, seed=0, synthetic_size=(1000, 500))
    model = torch.nn.Linear(3 * 32 * 32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    accs = []
    for epoch in range(2):
        dl.train.set_epoch(epoch)
        for x, y in dl.train:
            loss = F.cross_entropy(model(x.flatten(1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            correct = sum(int((model(x.flatten(1)).argmax(1) == y).sum()) for x, y in dl.test)
        accs.append(correct / dl.info.test_size)
    assert accs[-1] > 0.4, accs          # chance is 0.1
    assert accs[0] < 0.95, accs          # 10 steps are not enough for a perfect score


# ------------------------------------------------------------------------------------------
# Layouts: class order, CIFAR binary.

def test_class_order_equals_torchvision_imagefolder(tmp_path):
    classes = ["b", "A", "a10", "a2", "_x", "Z z", "n01440764"]
    root = make_folder(tmp_path, classes, per_class=2)
    (root / "train" / "a2" / "sub").mkdir()
    write_image(root / "train" / "a2" / "sub" / "deep.JPG")
    # torchvision sorts folders by their whole path: "a-b" comes before "a/sub" ("-" < "/")
    for folder in ("a", "a/sub", "a-b"):
        (root / "train" / "b" / folder).mkdir()
        write_image(root / "train" / "b" / folder / "x.png")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    ours = scan_image_folder(root / "train")
    theirs = torchvision.datasets.ImageFolder(str(root / "train"))
    assert list(ours.classes) == theirs.classes
    assert [(os.path.normpath(p), c) for p, c in ours.samples] == \
        [(os.path.normpath(p), c) for p, c in theirs.samples]
    dl = build_loaders("imagefolder", root, batch_size=4, workers=0, image_size=8)
    assert list(dl.info.class_names) == theirs.classes
    y = torch.cat([y for _, y in dl.test])
    assert y.tolist() == [c for _, c in torchvision.datasets.ImageFolder(str(root / "val")).samples]


def test_hidden_folders_inside_a_class_are_skipped(tmp_path):
    """.AppleDouble/, .thumbnails/: neither trained on under the class's label nor decoded."""
    root = make_folder(tmp_path, ["a", "b"], per_class=2)
    for hidden in (".AppleDouble", ".thumbnails/deep", "sub/.cache"):
        write_image(root / "train" / "a" / hidden / "x.jpg")
    write_image(root / "train" / "a" / "sub" / "kept.png")
    samples = scan_image_folder(root / "train").samples
    found = [os.path.relpath(p, root / "train") for p, _ in samples]
    assert found == ["a/0.png", "a/1.png", os.path.join("a", "sub", "kept.png"), "b/0.png",
                     "b/1.png"]


def test_16_bit_grayscale_keeps_its_top_8_bits(tmp_path):
    """PIL's convert("RGB") clips a 16-bit value above 255 to white; the image decodes as DALI's
    decoder does, each pixel's top 8 bits. 32-bit pixels are refused with the file's name."""
    from fastsd.data.folders import read_rgb_image

    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0 ... 65535
    for suffix in ("png", "tif"):
        Image.fromarray(values).save(tmp_path / f"g16.{suffix}")
        rgb = np.asarray(read_rgb_image(str(tmp_path / f"g16.{suffix}")))
        assert rgb.shape == (16, 16, 3)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], (values >> 8).astype(np.uint8))
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(UnreadableImageError, match="f32.tif.* 32-bit float pixels"):
        read_rgb_image(str(tmp_path / "f32.tif"))


def test_an_image_over_pils_size_limit_is_named_by_the_header_check(tmp_path, monkeypatch):
    """PIL refuses a decompression bomb in Image.open: the header check (--check-images header,
    the trainer's choice above 50 000 images) names the file and both ways on."""
    from PIL import Image as PILImage

    from fastsd.data.folders import read_image_size, read_rgb_image

    write_image(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 2x over it: an error
    for read in (read_image_size, read_rgb_image):
        with pytest.raises(UnreadableImageError,
                           match="big.png.* larger than PIL's limit.*MAX_IMAGE_PIXELS"):
            read(str(tmp_path / "big.png"))


def test_file_names_need_not_be_utf8(tmp_path):
    """A file name that is not valid UTF-8 (Latin-1 from an old archive, say) is read like any
    other, as torchvision and DALI read it."""
    root = make_folder(tmp_path, ["a", "b"], per_class=2)
    odd = os.fsdecode(os.path.join(os.fsencode(str(root / "val" / "a")), b"caf\xe9.png"))
    shutil.copy(next((root / "val" / "a").iterdir()), odd)
    dl = build_loaders("imagefolder", root, batch_size=2, eval_batch_size=5, workers=0,
                       image_size=8)
    assert sum(y.shape[0] for _, y in dl.test) == 5


def _write_fake_cifar10_binary(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return batches


def test_cifar10_binary_layout(tmp_path, monkeypatch):
    batches = _write_fake_cifar10_binary(tmp_path)
    # The fake files cannot have torchvision's MD5 sums.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        dl = build_loaders("cifar10", data_dir, batch_size=4, eval_batch_size=3)
        assert dl.info.class_names == CIFAR10_CLASSES and dl.info.train_size == 20
        x, y = map(torch.cat, zip(*dl.test))
        data, labels = batches["test_batch"]
        assert y.tolist() == labels
        pixels = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
        expected = ((pixels - torch.tensor(CIFAR10_MEAN)[:, None, None])
                    / torch.tensor(CIFAR10_STD)[:, None, None])
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    resized = build_loaders("cifar10", tmp_path, batch_size=4, image_size=40, channels_last=True)
    resized.train.set_epoch(0)
    for loader in (resized.train, resized.test):
        x, _ = next(iter(loader))
        assert x.shape[1:] == (3, 40, 40) and x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="100 classes but num_classes is 10"):
        build_loaders("cifar100", tmp_path, batch_size=4, num_classes=10)


@pytest.mark.parametrize("source", ["imagefolder", "cifar-folder", "cifar-binary", "synthetic"])
def test_eval_only_reads_the_evaluation_split_alone(tmp_path, monkeypatch, source):
    """eval_only (fastsd.evaluate): no training loader, the same evaluation batches as a whole
    build; image folders need no train/, and a training split that would be refused for being
    smaller than a batch is not read, so not refused."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    if source == "imagefolder":
        args = ("imagefolder", make_folder(tmp_path, ["a", "b"], per_class=3, size=(20, 20)))
    elif source == "cifar-folder":
        args = ("cifar10", make_folder(tmp_path, CIFAR10_CLASSES, per_class=1, size=(32, 32),
                                       splits=("train", "test")))
    elif source == "cifar-binary":
        _write_fake_cifar10_binary(tmp_path)
        args = ("cifar10", tmp_path)
    else:
        args = ("synthetic", None)
    kw = dict(batch_size=4, eval_batch_size=5, workers=0, image_size=16,
              synthetic_size=(40, 12) if source == "synthetic" else None)
    whole = build_loaders(*args, **kw)
    alone = build_loaders(*args, **dict(kw, batch_size=1000), eval_only=True)
    assert alone.train is None and alone.info.train_size == 0 and whole.info.train_size > 0
    assert alone.info.class_names == whole.info.class_names
    assert alone.info.test_size == whole.info.test_size and len(alone.test) == len(whole.test)
    for (x, y), (x_ref, y_ref) in zip(alone.test, whole.test, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    if source in ("imagefolder", "cifar-folder"):
        shutil.rmtree(args[1] / "train")
        assert build_loaders(*args, **kw, eval_only=True).info.test_size == whole.info.test_size
        with pytest.raises(FileNotFoundError, match="no train/ folder"):
            build_loaders(*args, **kw)


# ------------------------------------------------------------------------------------------
# Bad input: each a clear error when the loaders are built.

def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*cifar10.*imagefolder"):
        build_loaders("cifar11", batch_size=8)
    assert set(list_datasets()) == {"synthetic", "cifar10", "cifar100", "imagefolder"}


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_missing_data_dir(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="no data directory given"):
        build_loaders(dataset, None, batch_size=8)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}.*does not exist"):
        build_loaders(dataset, tmp_path / "nope", batch_size=8)


def test_cifar_folder_without_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*--download"):
        build_loaders("cifar10", tmp_path, batch_size=8)


def test_missing_train_or_eval_folder(tmp_path):
    make_folder(tmp_path / "a", ["c0", "c1"], splits=("val",))
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        build_loaders("imagefolder", tmp_path / "a", batch_size=1)
    make_folder(tmp_path / "b", ["c0", "c1"], splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"no val/ or test/ folder"):
        build_loaders("imagefolder", tmp_path / "b", batch_size=1)
    make_folder(tmp_path / "c", ["c0", "c1"], splits=("train", "test"))
    assert build_loaders("imagefolder", tmp_path / "c", batch_size=1, workers=0).info.test_size == 4


def test_empty_folders(tmp_path):
    make_folder(tmp_path, ["c0", "c1"], splits=("val",))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"train.*holds no class folders"):
        build_loaders("imagefolder", tmp_path, batch_size=1)
    make_folder(tmp_path, ["c0", "c1"], splits=("train",))
    (tmp_path / "val" / "c1" / "0.png").unlink()
    (tmp_path / "val" / "c1" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"class folder .*c1.* holds no images"):
        build_loaders("imagefolder", tmp_path, batch_size=1)


def test_class_count_must_match_num_classes(tmp_path):
    make_folder(tmp_path, ["c0", "c1", "c2"])
    with pytest.raises(ValueError,
                       match=r"has 3 class folders but num_classes is 5.*--num-classes 3"):
        build_loaders("imagefolder", tmp_path, batch_size=1, num_classes=5)
    assert build_loaders("imagefolder", tmp_path, batch_size=1, num_classes=3,
                         workers=0).info.num_classes == 3


def test_train_and_eval_classes_must_agree(tmp_path):
    make_folder(tmp_path, ["cat", "dog"], splits=("train",))
    make_folder(tmp_path, ["cat", "fox"], splits=("val",))
    with pytest.raises(ValueError, match=r"differ \(only in train: dog; only in val: fox\)"):
        build_loaders("imagefolder", tmp_path, batch_size=1)


def test_cifar_folder_with_wrong_class_count(tmp_path):
    make_folder(tmp_path, ["c0", "c1"], splits=("train", "test"), size=(32, 32))
    with pytest.raises(ValueError, match="has 2 class folders but num_classes is 10"):
        build_loaders("cifar10", tmp_path, batch_size=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named_when_read(tmp_path, workers):
    make_folder(tmp_path, ["c0", "c1"], per_class=2, size=(16, 16))
    bad = tmp_path / "train" / "c1" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    dl = build_loaders("imagefolder", tmp_path, batch_size=4, workers=workers, image_size=16)
    dl.train.set_epoch(0)
    with pytest.raises(UnreadableImageError, match=str(bad)):
        for _ in dl.train:
            pass


def test_corrupt_image_in_cifar_folder_fails_at_build(tmp_path):
    make_folder(tmp_path, [f"c{i}" for i in range(10)], per_class=1, splits=("train", "test"),
                size=(32, 32))
    bad = tmp_path / "test" / "c3" / "0.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(UnreadableImageError, match=str(bad)):
        build_loaders("cifar10", tmp_path, batch_size=1, workers=2)
    write_image(bad, size=(20, 20))
    with pytest.raises(ValueError, match=f"{bad}.* is 20x20, expected 32x32"):
        build_loaders("cifar10", tmp_path, batch_size=1, workers=0)


def test_truncated_jpeg_is_named(tmp_path):
    make_folder(tmp_path, ["c0", "c1"], per_class=1, size=(16, 16))
    bad = tmp_path / "val" / "c0" / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[:200])
    dl = build_loaders("imagefolder", tmp_path, batch_size=1, workers=0, image_size=16)
    with pytest.raises(UnreadableImageError, match=str(bad)):
        list(dl.test)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        build_loaders("synthetic", batch_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size = 2\)"):
        build_loaders("synthetic", batch_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loaders("synthetic", batch_size=64, synthetic_size=(100, 10), world_size=2)
    with pytest.raises(ValueError, match="synthetic_size only applies"):
        build_loaders("imagefolder", tmp_path, batch_size=8, synthetic_size=10)
    with pytest.raises(ValueError, match="download is only possible"):
        build_loaders("imagefolder", tmp_path, batch_size=8, download=True)
    with pytest.raises(ValueError, match="epoch"):
        small_synthetic().train.set_epoch(-1)
    with pytest.raises(ValueError, match="synthetic, which reads no files"):
        build_loaders("synthetic", tmp_path, batch_size=8)


@pytest.mark.gpu
def test_cuda_batches_equal_cpu_batches(tmp_path):
    make_folder(tmp_path, ["a", "b"], per_class=4, size=(12, 12))
    for dataset, data_dir, kw in (("synthetic", None, dict(synthetic_size=(100, 37))),
                                  ("imagefolder", tmp_path, dict(image_size=16, workers=2))):
        cpu = build_loaders(dataset, data_dir, batch_size=4, seed=1, **kw)
        gpu = build_loaders(dataset, data_dir, batch_size=4, seed=1, device="cuda",
                            channels_last=True, **kw)
        for a, b in ((cpu.train, gpu.train), (cpu.test, gpu.test)):
            for (xa, ya), (xb, yb) in zip(epoch_batches(a, 3), epoch_batches(b, 3)):
                assert xb.is_cuda and yb.is_cuda
                assert xb.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(ya, yb.cpu())
                torch.testing.assert_close(xb.cpu(), xa, rtol=0, atol=1e-5)
