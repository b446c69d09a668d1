"""DALI input pipelines (fastsd.data.dali), in DALI's CPU mode; GPU ("mixed") variants need a GPU.

Data: a small subset of the real CIFAR-10 JPEGs (../shared/datasets/cifar10-jpeg.tar.gz), the same
subset as torchvision's binary layout, and a few generated JPEGs of ImageNet-like size. Every check
compares numbers: against torchvision's transforms of the same files, or against a numpy reference
that applies the augmentation parameters the loader drew.
"""

import dataclasses
import json
import math
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali",
                    reason="NVIDIA DALI is not installed (pip install \"fastsd[dali]\")")

from PIL import Image  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from fastsd.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fastsd.data.dali import build_dali_loaders  # noqa: E402
from fastsd.data.folders import UnreadableImageError  # noqa: E402

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


def _device(where):
    return "cuda" if where == "gpu" else "cpu"


# Image folder splits are read every epoch (cache_bytes=0) or held in memory encoded (the default
# for splits as small as these): both feeds of the pipeline get the numeric tests.
CACHING = [pytest.param(0, id="files"), pytest.param(None, id="cached")]


def _caching(cache_bytes):
    return {} if cache_bytes is None else dict(cache_bytes=cache_bytes)


def _assert_source(loader, cache_bytes):
    assert loader._spec_args["source"] == ("files" if cache_bytes == 0 else "encoded")


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def cifar_binary(cifar_jpeg, tmp_path_factory):
    """The same images in torchvision's CIFAR-10 python layout (cifar-10-batches-py)."""
    root = tmp_path_factory.mktemp("cifar10_binary")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    arrays = {}
    for split in ("train", "test"):
        ds = datasets.ImageFolder(cifar_jpeg / split)
        x = np.stack([np.asarray(ds.loader(p)) for p, _ in ds.samples])     # [N, 32, 32, 3]
        arrays[split] = (x, np.array(ds.targets))
    classes = datasets.ImageFolder(cifar_jpeg / "train").classes

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)                 # planar CHW rows
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [int(v) for v in y]}, f)

    x, y = arrays["train"]
    for b, part in enumerate(np.array_split(np.arange(len(x)), 5)):
        dump(f"data_batch_{b + 1}", x[part], y[part])
    dump("test_batch", *arrays["test"])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(classes)}, f)
    return root, arrays


@pytest.fixture
def trust_cifar_files(monkeypatch):
    """torchvision checks the md5 of the official files; ours are a re-encoded subset."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


def _write_jpeg(path, w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / (7 + seed % 5) + rng.uniform(0, 6)) * np.cos(y / 11),
                    128 + 100 * np.cos((x + y) / (13 + seed % 3)),
                    128 + 60 * np.sin(y / 5) + rng.normal(0, 20, size=(h, w))], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory):
    """train/ and val/ with 3 classes of JPEGs of ImageNet-like sizes
    (odd sides, both orientations)."""
    root = tmp_path_factory.mktemp("imagenet_like")
    sizes = [(400, 300), (300, 400), (500, 333), (375, 500), (257, 257), (224, 300), (641, 481),
             (300, 225), (333, 500)]
    for i, (w, h) in enumerate(sizes):
        _write_jpeg(root / "train" / "abc"[i % 3] / f"{i:03d}.jpg", w, h, i)
    for i, (w, h) in enumerate(sizes[:6]):
        _write_jpeg(root / "val" / "abc"[i % 3] / f"v{i:03d}.jpg", w, h, 100 + i)
    return root


# ------------------------------------------------------------------------------------- helpers

def _collect(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.float().cpu())
        ys.append(y.cpu())
    return torch.cat(xs), torch.cat(ys)


def _normalize(u8_hwc, mean, std):
    x = torch.from_numpy(np.array(u8_hwc)).permute(2, 0, 1).float() / 255.0
    return TF.normalize(x, mean, std)


def _pixel_diff(a, b, std):
    """|a - b| in 0..255 pixel levels, for tensors normalised with ``std``."""
    scale = torch.tensor(std).view(-1, 1, 1) * 255.0
    return (a - b).abs() * scale


def _cifar_reference(u8, anchor, flip, mean, std, pad=4):
    """torchvision RandomCrop(32, padding=pad) + flip with the loader's parameters."""
    x, y = int(anchor[0]), int(anchor[1])
    padded = np.pad(u8, ((pad, pad), (pad, pad), (0, 0)))
    out = padded[y + pad:y + pad + 32, x + pad:x + pad + 32]
    if flip:
        out = out[:, ::-1]
    return _normalize(out, mean, std)


def _rrc_reference(width, height, area, ratio, uv):
    """torchvision's RandomResizedCrop.get_params, fed with the loader's random numbers."""
    for a, r in zip(area.astype(np.float64), ratio.astype(np.float64)):
        target = width * height * a
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            return int(uv[0] * (width - w + 1)), int(uv[1] * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * 4 / 3))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# ------------------------------------------------------------------------------------- import

def test_missing_dali_gives_install_command(monkeypatch, imagenet_like):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)     # what `import nvidia.dali` sees
    with pytest.raises(ImportError, match=r'pip install "fastsd\[dali\]"'):
        build_dali_loaders("imagefolder", imagenet_like, batch_size=2)


def test_importing_the_module_does_not_import_dali():
    code = ("import sys, fastsd.data, fastsd.data.dali; "
            "assert 'nvidia.dali' not in sys.modules, 'DALI imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("cache_bytes", CACHING)
def test_cifar_jpeg_eval_matches_torchvision(cifar_jpeg, where, cache_bytes):
    dl = build_dali_loaders("cifar10", cifar_jpeg, batch_size=40, eval_batch_size=30, workers=2,
                            device=_device(where), dali_device=where, **_caching(cache_bytes))
    _assert_source(dl.test, cache_bytes)
    ref = datasets.ImageFolder(cifar_jpeg / "test")
    assert dl.info.class_names == tuple(ref.classes)
    assert (dl.info.num_classes, dl.info.image_size, dl.info.test_size) == (10, 32, 100)
    assert len(dl.test) == 4                                   # 30 + 30 + 30 + 10
    x, y = _collect(dl.test)
    assert y.tolist() == ref.targets                           # every image once, in order
    expected = torch.stack([_normalize(np.asarray(ref.loader(p)), CIFAR10_MEAN, CIFAR10_STD)
                            for p, _ in ref.samples])
    d = _pixel_diff(x, expected, CIFAR10_STD)
    # same libjpeg-turbo decoder on the CPU: equal up to float rounding; nvJPEG: a few levels
    assert d.max() <= (0.01 if where == "cpu" else 8.0)
    assert d.mean() <= (0.001 if where == "cpu" else 1.0)


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("cache_bytes", CACHING)
def test_imagenet_eval_matches_torchvision(imagenet_like, where, cache_bytes):
    dl = build_dali_loaders("imagenet", imagenet_like, batch_size=4, eval_batch_size=4,
                            workers=2, device=_device(where), dali_device=where,
                            **_caching(cache_bytes))
    _assert_source(dl.test, cache_bytes)
    ref = datasets.ImageFolder(imagenet_like / "val")
    assert dl.info.class_names == tuple(ref.classes) and dl.info.image_size == 224
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                             transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x, y = _collect(dl.test)
    assert y.tolist() == ref.targets
    expected = torch.stack([tf(ref.loader(p)) for p, _ in ref.samples])
    assert x.shape == expected.shape == (6, 3, 224, 224)
    d = _pixel_diff(x, expected, IMAGENET_STD)
    # resizing rounds to uint8 in both; a centre crop one pixel off would give tens of levels
    assert d.max() <= (1.5 if where == "cpu" else 10.0)
    assert d.mean() <= (0.3 if where == "cpu" else 1.5)


@pytest.mark.parametrize("data,image_size,fraction", [
    ("cifar", None, None), ("imagenet", None, None), ("imagenet", 48, None), ("imagenet", 96, 1.0)])
def test_eval_matches_the_torch_path(cifar_jpeg, imagenet_like, data, image_size, fraction):
    from fastsd.data import build_loaders

    dataset, root = ("cifar10", cifar_jpeg) if data == "cifar" else ("imagefolder", imagenet_like)
    kw = dict(batch_size=4, eval_batch_size=7, workers=0 if data == "imagenet" else 1,
              image_size=image_size, eval_crop_fraction=fraction)
    torch_dl = build_loaders(dataset, root, **kw)
    dali_dl = build_dali_loaders(dataset, root, **dict(kw, workers=2))
    assert dali_dl.info == torch_dl.info
    assert len(dali_dl.test) == len(torch_dl.test) and len(dali_dl.train) == len(torch_dl.train)
    x, y = _collect(dali_dl.test)
    x_ref, y_ref = _collect(torch_dl.test)
    assert torch.equal(y, y_ref) and x.shape == x_ref.shape
    d = _pixel_diff(x, x_ref, dali_dl.info.std)
    inner = d[..., 1:-1, 1:-1]
    assert inner.mean() <= 0.3 and inner.max() <= 2.0, (inner.mean().item(), inner.max().item())
    # a strong downscale (48 px) shows that PIL's and DALI's antialiasing filters treat the image
    # edge differently: a few levels in the outermost pixel row, nowhere else
    assert d.mean() <= 0.5 and d.max() <= 10.0, (d.mean().item(), d.max().item())
    x_train, _ = next(iter(dali_dl.train))
    assert x_train.shape[-2:] == x_ref.shape[-2:]


@pytest.mark.parametrize("source", ["cifar-folder", "cifar-binary", "imagenet"])
def test_eval_only_builds_the_evaluation_pipeline_alone(cifar_jpeg, cifar_binary, imagenet_like,
                                                        trust_cifar_files, source):
    """As the torch path's eval_only: no training loader, the whole build's evaluation output."""
    dataset, root = {"cifar-folder": ("cifar10", cifar_jpeg),
                     "cifar-binary": ("cifar10", cifar_binary[0]),
                     "imagenet": ("imagefolder", imagenet_like)}[source]
    kw = dict(batch_size=4, eval_batch_size=5, workers=2, image_size=48)
    whole = build_dali_loaders(dataset, root, **kw)
    alone = build_dali_loaders(dataset, root, **dict(kw, batch_size=10 ** 6), eval_only=True)
    assert alone.train is None and alone.info.train_size == 0
    assert alone.info == dataclasses.replace(whole.info, train_size=0)
    x, y = _collect(alone.test)
    x_ref, y_ref = _collect(whole.test)
    assert torch.equal(y, y_ref) and torch.equal(x, x_ref)


# ------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("cache_bytes", CACHING)
def test_cifar_jpeg_train_epoch_is_the_drawn_augmentation(cifar_jpeg, where, cache_bytes):
    """The GPU graph too: nvJPEG decoding, then the padded crop and flip on the GPU."""
    dl = build_dali_loaders("cifar10", cifar_jpeg, batch_size=40, workers=2, seed=7,
                            device=_device(where), dali_device=where, **_caching(cache_bytes))
    _assert_source(dl.train, cache_bytes)
    train = dl.train
    ref = datasets.ImageFolder(cifar_jpeg / "train")
    images = [np.asarray(ref.loader(p)) for p, _ in ref.samples]
    train.set_epoch(2)
    batches = train.epoch_batches()
    assert len(train) == len(batches) == 5
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(200))          # one epoch: every sample once
    anchors = np.concatenate([train.augmentation(2, k, len(b))[0] for k, b in enumerate(batches)])
    for axis in (0, 1):  # the pad-4 crop takes every offset -4..4 on both axes over the epoch
        assert set(anchors[:, axis].tolist()) == set(range(-4, 5))
    for k, (x, y) in enumerate(train):
        assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        idx = batches[k]
        assert y.tolist() == [ref.targets[i] for i in idx]
        anchor, flip = train.augmentation(2, k, len(idx))
        assert np.abs(anchor).max() <= 4 and set(np.unique(flip)) <= {0, 1}
        expected = torch.stack([_cifar_reference(images[i], anchor[j], flip[j], CIFAR10_MEAN,
                                                 CIFAR10_STD) for j, i in enumerate(idx)])
        d = _pixel_diff(x.cpu(), expected, CIFAR10_STD)
        # as in evaluation: libjpeg-turbo on the CPU is exact, nvJPEG a few levels off
        assert d.max() <= (0.01 if where == "cpu" else 8.0)
        assert d.mean() <= (0.001 if where == "cpu" else 1.0)
    assert k == 4


@pytest.mark.parametrize("where", DEVICES)
def test_cifar_binary_in_memory_is_exact(cifar_binary, trust_cifar_files, where):
    root, arrays = cifar_binary
    dl = build_dali_loaders("cifar10", root, batch_size=50, eval_batch_size=64, workers=2, seed=1,
                            device=_device(where), dali_device=where)
    assert dl.train.images is not None                         # held in memory, not decoded
    assert (dl.info.train_size, dl.info.test_size, len(dl.train), len(dl.test)) == (200, 100, 4, 2)
    x_test, y_test = _collect(dl.test)
    ref = torch.stack([_normalize(u8, CIFAR10_MEAN, CIFAR10_STD) for u8 in arrays["test"][0]])
    assert torch.allclose(x_test, ref, atol=1e-5) and y_test.tolist() == arrays["test"][1].tolist()
    x_train, _ = arrays["train"]
    dl.train.set_epoch(5)
    for k, (x, y) in enumerate(dl.train):
        idx = dl.train.epoch_batches()[k]
        anchor, flip = dl.train.augmentation(5, k, len(idx))
        expected = torch.stack([_cifar_reference(x_train[i], anchor[j], flip[j], CIFAR10_MEAN,
                                                 CIFAR10_STD) for j, i in enumerate(idx)])
        assert torch.allclose(x.float().cpu(), expected, atol=1e-5)
        assert y.cpu().tolist() == arrays["train"][1][idx].tolist()


def _node_inputs(node):
    """The nodes feeding ``node``: its data first, then parameter (argument) inputs."""
    return [i for inp in node.source.inputs for i in (inp if isinstance(inp, list) else [inp])]


def _graph_nodes(output):
    """Every node of the DALI graph that ends in ``output``."""
    nodes, todo = {}, [output]
    while todo:
        node = todo.pop()
        if node.name not in nodes:
            nodes[node.name] = node
            todo.extend(_node_inputs(node))
    return list(nodes.values())


def _graph_devices(nodes):
    """{operator kind: the devices of its outputs}."""
    devices = {}
    for node in nodes:
        kind = node.name.rsplit("_", 1)[0].strip("_")        # "__Resize_90" -> "Resize"
        devices.setdefault(kind, set()).add(node.device)
    return devices


@pytest.mark.parametrize("source,augment,pre_resize", [
    ("memory", "cifar", False), ("memory", "none", False), ("files", "cifar", False),
    ("files", "cifar", True), ("files", "none", False), ("files", "imagenet", False),
    ("files", "center", False), ("encoded", "cifar", False), ("encoded", "none", False),
    ("encoded", "imagenet", False), ("encoded", "center", False)])
def test_gpu_graphs_pass_dalis_checks_without_a_gpu(source, augment, pre_resize):
    """Every GPU ("mixed") graph the loaders can ask for is defined and serialised with DALI's
    checks of argument names and of the device of every operator input, which need no GPU: the
    image work (decode, crop, resize, normalise) is on the GPU, its parameters on the CPU."""
    from fastsd.data.dali_graph import GraphSpec, define_pipeline

    for half, channels_last in ((True, True), (False, False)):
        spec = GraphSpec(source=source, augment=augment, image_size=48 if pre_resize else 32,
                         resize_size=64, native_size=32, pre_resize=pre_resize,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, device="gpu", half=half,
                         channels_last=channels_last, path_prefix=b"/data/")
        pipe = define_pipeline(spec, lambda: None, batch_size=4, num_threads=1, device_id=None,
                               prefetch=2, seed=0)
        serialized = pipe.serialize()
        (out,) = pipe._graph_out
        graph = _graph_nodes(out)
        nodes = _graph_devices(graph)
        assert out.device == "gpu" and nodes["CropMirrorNormalize"] == {"gpu"}
        # Parameters (crop windows, shapes, flips, sizes) stay on the CPU, constants included:
        # a GPU one would be read back to the host every batch, where DALI accepts it at all.
        gpu_params = [(node.name, i.name) for node in graph for i in _node_inputs(node)[1:]
                      if i.device != "cpu"]
        assert not gpu_params
        if source != "memory":
            decoder = "ImageSlice" if augment == "imagenet" else "Image"
            assert nodes[decoder] == {"gpu"}, nodes             # device="mixed": GPU output
            assert b"jpeg_fancy_upsampling" in serialized          # PIL's chroma upsampling
            assert nodes["ExternalSource"] == {"cpu"}
            assert nodes.get("Read") == ({"cpu"} if source == "files" else None)
        if augment in ("imagenet", "center") or pre_resize:
            assert nodes["Resize"] == {"gpu"}
        if augment == "cifar":
            assert "gpu" in nodes["Slice"]                    # the pad crop of the images
        if augment == "imagenet":
            assert nodes["PeekImageShape"] == {"cpu"}         # the crop window: CPU arithmetic


def test_random_resized_crop_window_is_torchvisions_rule():
    from nvidia.dali import fn, pipeline_def

    from fastsd.data.dali_graph import RRC_ATTEMPTS, random_resized_crop_window

    rng = np.random.default_rng(0)
    shapes = [(300, 400), (400, 300), (257, 257), (100, 1000), (1000, 90), (33, 35), (2, 3)]
    n = len(shapes)
    hw = np.array([[h, w, 3] for h, w in shapes], dtype=np.float32)
    area = rng.uniform(0.08, 1.0, size=(n, RRC_ATTEMPTS)).astype(np.float32)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3),
                               size=(n, RRC_ATTEMPTS))).astype(np.float32)
    area[-3:] = 1.0          # the whole area: (1000, 90) and (33, 35) fall back to the central crop
    uv = rng.random((n, 2), dtype=np.float32)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        s, a, r, u = fn.external_source(source=lambda: (hw, area, ratio, uv), num_outputs=4,
                                        batch=True)
        return random_resized_crop_window(s, a, r, u)

    p = pipe()
    p.build()
    start, size = p.run()
    for i, (h, w) in enumerate(shapes):
        x, y = np.array(start[i]).tolist()
        cw, ch = np.array(size[i]).tolist()
        assert (x, y, cw, ch) == _rrc_reference(w, h, area[i], ratio[i], uv[i]), shapes[i]
        assert 0 <= x <= w - cw and 0 <= y <= h - ch


@pytest.mark.parametrize("cache_bytes", CACHING)
def test_imagenet_train_is_resized_crop_of_the_drawn_window(imagenet_like, cache_bytes):
    dl = build_dali_loaders("imagefolder", imagenet_like, batch_size=3, workers=2, seed=11,
                            **_caching(cache_bytes))
    _assert_source(dl.train, cache_bytes)
    ref = datasets.ImageFolder(imagenet_like / "train")
    train = dl.train
    assert len(train) == 3
    for k, (x, y) in enumerate(train):
        assert x.shape == (3, 3, 224, 224)
        idx = train.epoch_batches()[k]
        assert y.tolist() == [ref.targets[i] for i in idx]
        area, ratio, uv, flip = train.augmentation(0, k, len(idx))
        for j, i in enumerate(idx):
            img = ref.loader(ref.samples[i][0])
            left, top, w, h = _rrc_reference(img.width, img.height, area[j], ratio[j], uv[j])
            out = TF.resized_crop(img, top, left, h, w, [224, 224],
                                  interpolation=transforms.InterpolationMode.BILINEAR)
            if flip[j]:
                out = TF.hflip(out)
            expected = _normalize(np.asarray(out), IMAGENET_MEAN, IMAGENET_STD)
            d = _pixel_diff(x[j], expected, IMAGENET_STD)
            # DALI decodes only the window (ROI decoding), PIL the whole image: same pixels up to
            # rounding (measured: mean 0.2, max 1-2 levels); a window one pixel off moves the
            # noisy content by a fraction of a pixel, several levels on average
            assert d.mean() <= 0.35 and d.max() <= 3.0, (k, j, d.mean().item(), d.max().item())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shapes_dtype_and_layout(imagenet_like, channels_last, dtype):
    dl = build_dali_loaders("imagefolder", imagenet_like, batch_size=4, eval_batch_size=5,
                            workers=2, channels_last=channels_last, dtype=dtype)
    ref = build_dali_loaders("imagefolder", imagenet_like, batch_size=4, eval_batch_size=5,
                             workers=2)
    for loader, ref_loader, shapes in ((dl.train, ref.train, [(4, 3, 224, 224)] * 2),
                                       (dl.test, ref.test, [(5, 3, 224, 224), (1, 3, 224, 224)])):
        got = list(loader)
        expected = list(ref_loader)
        assert [tuple(x.shape) for x, _ in got] == shapes
        for (x, y), (x_ref, y_ref) in zip(got, expected):
            assert x.dtype == dtype and y.dtype == torch.int64 and x.device.type == "cpu"
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert x.is_contiguous() != channels_last
            assert torch.allclose(x.float(), x_ref, atol=0.02 if dtype == torch.float16 else 1e-6)
            assert torch.equal(y, y_ref)


# ------------------------------------------------------------------------------------- epochs

@pytest.mark.parametrize("data", ["files", "memory"])
def test_a_pass_can_start_mid_epoch(imagenet_like, cifar_binary, trust_cifar_files, data):
    """set_epoch(e, start=k) (a resumed run): batches k .. len-1 of epoch e with a whole pass's
    samples and augmentation draws (which are keyed by the batch's index in the epoch), fed to
    DALI from batch k on; then set_epoch(e) gives the whole epoch again."""
    dl = (build_dali_loaders("imagefolder", imagenet_like, batch_size=3, eval_batch_size=4,
                             workers=1, seed=2, dali_device="cpu") if data == "files" else
          build_dali_loaders("cifar10", cifar_binary[0], batch_size=16, eval_batch_size=40,
                             workers=1, seed=2, dali_device="cpu"))
    for loader, k in ((dl.train, 2), (dl.test, 1)):
        loader.set_epoch(5)
        whole = [(x.clone(), y.clone()) for x, y in loader]
        assert len(whole) == len(loader) > k
        loader.set_epoch(5, start=k)
        tail = [(x.clone(), y.clone()) for x, y in loader]
        assert len(tail) == len(whole) - k
        for (x1, y1), (x2, y2) in zip(tail, whole[k:]):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)
        loader.set_epoch(5)
        assert len(list(loader)) == len(whole)


def test_set_epoch_makes_the_epoch_a_function_of_seed_and_epoch(imagenet_like):
    def make(seed=3):
        return build_dali_loaders("imagefolder", imagenet_like, batch_size=3, workers=2,
                                  seed=seed).train

    a, b = make(), make()
    a.set_epoch(3)
    epoch3 = list(a)
    for e in range(3):                 # b has a history; a did not
        b.set_epoch(e)
        list(b)
    b.set_epoch(3)
    again = list(b)
    for (x1, y1), (x2, y2) in zip(epoch3, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    repeat = list(b)                   # no set_epoch: the same epoch again (torch path rule)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(epoch3, repeat))
    b.set_epoch(4)
    other = list(b)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(epoch3, other))
    c = make(seed=4)
    c.set_epoch(3)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(epoch3, c))
    a.set_epoch(3)
    assert np.array_equal(np.concatenate(a.epoch_batches(3)), np.concatenate(b.epoch_batches(3)))


@pytest.mark.parametrize("data", ["cifar", "imagenet"])
def test_same_batches_as_the_torch_path(cifar_jpeg, imagenet_like, data):
    """The order (not the augmentation) is the torch path's: --dali does not change the batches."""
    from fastsd.data import build_loaders

    dataset, root = ("cifar10", cifar_jpeg) if data == "cifar" else ("imagefolder", imagenet_like)
    for rank in (0, 1):
        kw = dict(batch_size=3 if data == "imagenet" else 16, seed=8, rank=rank, world_size=2)
        torch_train = build_loaders(dataset, root, workers=0, **kw).train
        dali_train = build_dali_loaders(dataset, root, workers=1, **kw).train
        torch_train.set_epoch(6)
        dali_train.set_epoch(6)
        expected = [y for _, y in torch_train]
        got = [y for _, y in dali_train]
        assert len(got) == len(expected) == len(dali_train) > 0
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_breaking_off_an_epoch_leaves_the_next_intact(cifar_jpeg):
    def make():
        return build_dali_loaders("cifar10", cifar_jpeg, batch_size=20, workers=2, seed=5,
                                  prefetch=3).train

    a, b = make(), make()
    for _ in a:
        break                           # prefetched batches are still in the pipeline
    it = iter(a)
    next(it)
    next(it)                            # abandoned by the next iter() call
    a.set_epoch(1)
    b.set_epoch(1)
    got, expected = list(a), list(b)
    assert len(got) == len(expected) == 10
    for (x1, y1), (x2, y2) in zip(got, expected):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_shards_are_disjoint_and_cover_the_splits(cifar_jpeg):
    world = 3
    ranks = [build_dali_loaders("cifar10", cifar_jpeg, batch_size=16, eval_batch_size=16,
                                workers=1, seed=2, rank=r, world_size=world) for r in range(world)]
    full = build_dali_loaders("cifar10", cifar_jpeg, batch_size=16, eval_batch_size=100, workers=1)
    x_all, y_all = _collect(full.test)
    parts = [_collect(dl.test) for dl in ranks]
    assert [len(y) for _, y in parts] == [33, 33, 34]           # no padding, no duplicates
    assert [len(dl.test) for dl in ranks] == [3, 3, 3]
    assert torch.equal(torch.cat([x for x, _ in parts]), x_all)   # contiguous parts, in order
    assert torch.equal(torch.cat([y for _, y in parts]), y_all)
    # training: the same permutation everywhere, cut into disjoint shards of 200 // 3 = 66
    for dl in ranks:
        dl.train.set_epoch(4)
    shards = [np.concatenate(dl.train.epoch_batches()) for dl in ranks]
    assert all(len(dl.train) == 4 for dl in ranks) and all(len(s) == 64 for s in shards)
    assert len(np.unique(np.concatenate(shards))) == 3 * 64
    labels = [torch.cat([y for _, y in dl.train]) for dl in ranks]
    targets = np.array(datasets.ImageFolder(cifar_jpeg / "train").targets)
    for s, y in zip(shards, labels):
        assert y.tolist() == targets[s].tolist()


def test_training_drops_the_last_partial_batch(cifar_jpeg):
    dl = build_dali_loaders("cifar10", cifar_jpeg, batch_size=30, workers=1)
    sizes = [len(y) for _, y in dl.train]
    assert sizes == [30] * 6 and len(dl.train) == 6            # 200 = 6 * 30 + 20


# ------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("damage,cached", [
    ("truncated", False), ("garbage", False), ("deleted", False),
    # a file deleted before a cached split is built is not in the split: nothing to report
    ("truncated", True), ("garbage", True)])
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_bad_file_is_named(imagenet_like, tmp_path, damage, split, cached):
    """Files read every epoch are damaged after the loaders are built (the error comes from the
    pipeline); a cached split is damaged before (read at build time, or decoded later)."""
    import shutil

    from fastsd.data.dali import DEFAULT_CACHE_BYTES

    root = tmp_path / "data"
    shutil.copytree(imagenet_like, root)
    victim = sorted((root / split / "b").glob("*.jpg"))[0]
    data = victim.read_bytes()

    def build():
        return build_dali_loaders("imagefolder", root, batch_size=3, eval_batch_size=3, workers=2,
                                  cache_bytes=DEFAULT_CACHE_BYTES if cached else 0)

    def damage_it():
        if damage == "truncated":
            victim.write_bytes(data[:len(data) // 3])
        elif damage == "garbage":
            victim.write_bytes(b"this is not a JPEG file " * 40)
        else:
            victim.unlink()                                  # gone after the folder was scanned

    dl = None if cached else build()
    damage_it()
    # DALI's own reason is often a codec error number: PIL's says what is wrong with the file
    why = {"truncated": r".*PIL: .*truncated", "garbage": r".*PIL: .*cannot identify image",
           "deleted": ""}[damage]
    with pytest.raises(UnreadableImageError, match=re.escape(str(victim)) + why):
        dl = dl or build()
        list(dl.train if split == "train" else dl.test)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_cifar_folder_image_of_another_size_is_named_at_build(cifar_jpeg, tmp_path, split):
    """As the torch path, which decodes such a folder up front: a 48x40 image in a CIFAR JPEG
    folder is refused when the loaders are built, by name (DALI would crop it in training and
    fail to batch it in evaluation, naming nothing)."""
    import shutil

    root = tmp_path / "cifar"
    shutil.copytree(cifar_jpeg, root)
    odd = root / split / "cat" / "odd.jpg"
    Image.new("RGB", (48, 40), (90, 20, 200)).save(odd)
    with pytest.raises(ValueError, match=f"{odd}.* is 48x40, expected 32x32"):
        build_dali_loaders("cifar10", root, batch_size=8, eval_batch_size=4, workers=1,
                           dali_device="cpu")


def test_an_unreadable_file_is_named_when_cached(tmp_path):
    from fastsd.data.dali import _read_files

    good, bad = tmp_path / "a.jpg", tmp_path / "b.jpg"
    good.write_bytes(b"123")
    bad.mkdir()                                   # open() fails, also for root
    with pytest.raises(UnreadableImageError, match="b.jpg"):
        _read_files([str(good), str(bad)])
    rows = _read_files([str(good), str(good)])
    assert rows.row(1) == b"123" and rows.batch(np.array([0]))[1].tolist() == [[3]]


def test_a_split_is_cached_when_files_times_the_largest_fit(tmp_path):
    from fastsd.data.dali import _fits_in_memory

    paths = []
    for i, size in enumerate([10, 30, 20]):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(b"x" * size)
        paths.append(str(path))
    assert _fits_in_memory(paths, 90) and not _fits_in_memory(paths, 89)
    assert not _fits_in_memory(paths + [str(tmp_path / "gone.jpg")], 10**6)


def test_bad_arguments(imagenet_like):
    with pytest.raises(ValueError, match="dali_device"):
        build_dali_loaders("imagefolder", imagenet_like, batch_size=2, dali_device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        build_dali_loaders("imagefolder", imagenet_like, batch_size=2, dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dali_loaders("mnist", imagenet_like, batch_size=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dali_loaders("imagefolder", imagenet_like / "nothing", batch_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_dali_loaders("imagefolder", imagenet_like, batch_size=64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            build_dali_loaders("imagefolder", imagenet_like, batch_size=2, dali_device="gpu")


def test_synthetic_in_memory():
    dl = build_dali_loaders("synthetic", batch_size=32, eval_batch_size=100, workers=1,
                            synthetic_size=(128, 100))
    x, y = _collect(dl.test)
    assert x.shape == (100, 3, 32, 32) and len(dl.train) == 4
    assert dl.info.name == "synthetic" and y.max() < dl.info.num_classes


# ------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_gpu_pipeline_delivers_on_the_gpu_deterministically(imagenet_like):
    def make():
        return build_dali_loaders("imagefolder", imagenet_like, batch_size=3, workers=2, seed=9,
                                  device="cuda", dali_device="auto", channels_last=True,
                                  dtype=torch.float16)

    a, b = make(), make()
    a.train.set_epoch(1)
    b.train.set_epoch(1)
    for (x1, y1), (x2, y2) in zip(a.train, b.train):
        assert x1.is_cuda and y1.is_cuda and x1.dtype == torch.float16
        assert x1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    cpu = build_dali_loaders("imagefolder", imagenet_like, batch_size=3, workers=2, seed=9,
                             dali_device="cpu")
    cpu.train.set_epoch(1)
    a.train.set_epoch(1)
    for (xg, _), (xc, _) in zip(a.train, cpu.train):
        d = _pixel_diff(xg.float().cpu(), xc, IMAGENET_STD)
        assert d.mean() <= 2.0                       # same windows and flips, other decoder


@pytest.mark.gpu
def test_cpu_pipeline_to_a_cuda_device(cifar_jpeg):
    dl = build_dali_loaders("cifar10", cifar_jpeg, batch_size=40, workers=2, device="cuda",
                            dali_device="cpu")
    x, y = next(iter(dl.train))
    assert x.is_cuda and y.is_cuda and x.shape == (40, 3, 32, 32)


def test_trainer_runs_a_short_sd_run_with_dali(cifar_jpeg, tmp_path):
    """`--dali` end to end: the trainer takes its batches from the DALI pipeline (real JPEGs)."""
    from fastsd.data.dali import DaliEpochLoader
    from fastsd.ops.distill import cpu_backend
    from fastsd.train import TrainConfig, Trainer

    cfg = TrainConfig(method="sd", dali=True, dataset="cifar10", data=str(cifar_jpeg),
                      device="cpu", epochs=2, cycles=2, batch_size=50, eval_batch_size=100,
                      workers=1, log_every=1, progress="none", tensorboard=False, seed=0,
                      out=str(tmp_path / "run"))
    trainer = Trainer(cfg, quiet=True)
    with cpu_backend("native"):
        results = trainer.run()
    assert isinstance(trainer.data.train, DaliEpochLoader)
    assert [s["index"] for s in results["snapshots"]] == [1, 2]
    for snapshot in results["snapshots"]:
        assert 0 <= snapshot["top1_error"] <= 100
    # The second cycle was taught by the first one's snapshot: its KL term was logged.
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert any(row.get("kl", 0) > 0 for row in rows)


def test_a_bad_file_of_a_cifar_folder_is_named_before_training_with_dali(cifar_jpeg, tmp_path,
                                                                         capsys):
    """DALI decodes a CIFAR JPEG folder every epoch (the torch path decodes it into memory at
    build time): the trainer's pre-flight decodes it first, so a GIF named .jpg in test/ ends the
    run before its first step, not at the first evaluation, an epoch in."""
    import shutil

    from fastsd.train.cli import main

    root = tmp_path / "cifar"
    shutil.copytree(cifar_jpeg, root)
    gif = root / "test" / "cat" / "zz.jpg"
    Image.effect_noise((32, 32), 40).convert("RGB").save(gif, format="GIF")
    args = ["--method", "bl", "--dataset", "cifar10", "--data", str(root), "--dali",
            "--epochs", "1", "--batch-size", "50", "--workers", "1", "--device", "cpu",
            "--progress", "none", "--no-tensorboard", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{str(gif)!r} holds GIF data" in err and "convert it to JPEG" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()      # no step ran


@pytest.mark.parametrize("cached", [False, True])
def test_a_gif_named_jpg_is_named_with_what_it_holds(imagenet_like, tmp_path, cached):
    """PIL (so the torch path) reads GIF data in a .jpg file, DALI does not: its own reason is
    a codec error number, so the message says what the file holds."""
    import shutil

    from fastsd.data.dali import DEFAULT_CACHE_BYTES

    root = tmp_path / "data"
    shutil.copytree(imagenet_like, root)
    gif = root / "train" / "b" / "gif.jpg"
    Image.effect_noise((90, 70), 40).convert("RGB").save(gif, format="GIF")
    dl = build_dali_loaders("imagefolder", root, batch_size=3, eval_batch_size=3, workers=1,
                            cache_bytes=DEFAULT_CACHE_BYTES if cached else 0)
    with pytest.raises(UnreadableImageError, match=f"{gif}.*it holds GIF data, which DALI does "
                                                   f"not decode: convert it to JPEG"):
        list(dl.train)
