"""Images per second delivered by the input pipelines: DALI vs the torch DataLoader.

    pytest bench/bench_data.py --benchmark-only            # CPU: DALI's CPU mode vs DataLoader
    pytest bench/bench_data.py --benchmark-only -m gpu     # GPU: mixed pipeline vs a ResNet-50 step

Providers, all delivering normalised float32 NCHW training batches (random crop + flip), on the CPU
with the same number of worker processes / threads (WORKERS = 2; the GPU pipeline gets GPU_WORKERS
CPU threads, as a real GPU run would give it):

* ``torch-dataloader``: torchvision ImageFolder + the usual transforms in a DataLoader (the plain
  baseline the issue names);
* ``fastsd-torch``: fastsd's own torch path for image folders (ImageNet-like data only: for CIFAR it
  decodes the whole set into memory once, which is not a loader throughput);
* ``dali-cpu`` / ``dali-gpu``: fastsd.data.dali in DALI's CPU mode / with "mixed" decoding.

Data: 10 240 of the CIFAR-10 training JPEGs (../shared/datasets/cifar10-jpeg.tar.gz, extracted to
a temporary folder; 40 batches of 256) and a few hundred generated JPEGs of ImageNet-like size
(RandomResizedCrop to 224). A round is one whole epoch: every provider delivers every image once,
and none has batches in flight that the next round would have to decode and throw away (a
DataLoader stopped after N batches still decodes its workers' prefetched ones).
``extra_info`` holds provider, data set, batch shape, device, images/s (of the best round) and,
for the providers after the baseline, the ratio of images/s to ``torch-dataloader`` measured in
the same run.
"""

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from devices import device_label

WORKERS = 2                     # DataLoader worker processes = DALI CPU threads (CPU comparison)
GPU_WORKERS = min(8, os.cpu_count() or 1)   # DALI CPU threads feeding the GPU pipeline
CIFAR = dict(batch_size=256, per_class=1024)       # 10 240 training images: 40 batches
# On a GPU machine: enough ImageNet-like files for batches of 256, as a ResNet-50 step takes them.
IMAGENET = dict(batch_size=64, images=2048 if torch.cuda.is_available() else 768)
IMAGENET_GPU = dict(batch_size=256)
_RESULTS = {}                                        # (data, provider) -> images/s, this run


@pytest.fixture(scope="session")
def cifar_dir(cifar_jpeg_tar, tmp_path_factory):
    """The first CIFAR['per_class'] training JPEGs of each class (and 100 test ones), linked."""
    full = tmp_path_factory.mktemp("cifar10_jpeg_full")
    with tarfile.open(cifar_jpeg_tar, "r:gz") as tar:
        tar.extractall(full, filter="data")
    root = tmp_path_factory.mktemp("cifar10_jpeg_bench")
    for split, n in (("train", CIFAR["per_class"]), ("test", 100)):
        for class_dir in sorted((full / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:n]:
                os.symlink(f, root / split / class_dir.name / f.name)
    return root


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """IMAGENET['images'] training JPEGs of typical ImageNet sizes in 4 classes (+ a small val/)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet_like_bench")
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (500, 333), (400, 400), (640, 480), (333, 500)]
    for split, n in (("train", IMAGENET["images"]), ("val", 8)):
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
            noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255)
            path = root / split / f"class{i % 4}" / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)
    return root


def _torch_dataloader(root, style, batch_size):
    from torchvision import datasets, transforms

    from fastsd.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

    if style == "cifar":
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        augment = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    tf = transforms.Compose(augment + [transforms.ToTensor(), transforms.Normalize(mean, std)])
    ds = datasets.ImageFolder(Path(root) / "train", transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=WORKERS, persistent_workers=True,
                                       prefetch_factor=4)


def _loader(provider, data, root, batch_size):
    dataset = "cifar10" if data == "cifar10-jpeg" else "imagefolder"
    if provider == "torch-dataloader":
        return _torch_dataloader(root, "cifar" if data == "cifar10-jpeg" else "imagenet",
                                 batch_size)
    if provider == "fastsd-torch":
        from fastsd.data import build_loaders

        return build_loaders(dataset, root, batch_size=batch_size, workers=WORKERS).train
    from fastsd.data.dali import build_dali_loaders, dali_available

    if not dali_available():
        pytest.skip('NVIDIA DALI is not installed (pip install "fastsd[dali]")')
    where = provider.split("-")[1]
    # On the GPU as the trainer feeds its step, in channels_last (the ResNet-50 step's layout)
    return build_dali_loaders(dataset, root, batch_size=batch_size,
                              workers=GPU_WORKERS if where == "gpu" else WORKERS,
                              device="cuda" if where == "gpu" else "cpu", dali_device=where,
                              channels_last=where == "gpu").train


def _consume(loader, epoch):
    """One whole epoch (every batch): ``(images, batch shape, device)``."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n, tuple(x.shape), x.device


def _run(benchmark, provider, data, root, batch_size):
    loader = _loader(provider, data, root, batch_size)
    epochs = iter(range(1_000_000))
    out = {}

    def once():
        out["n"], out["shape"], out["device"] = _consume(loader, next(epochs))

    benchmark.pedantic(once, rounds=3, warmup_rounds=1, iterations=1)
    rate = out["n"] / benchmark.stats.stats.min
    _RESULTS[(data, provider)] = rate
    info = dict(provider=provider, data=data, shape=list(out["shape"]),
                device=device_label(out["device"]),
                workers=GPU_WORKERS if provider == "dali-gpu" else WORKERS,
                images_per_s=round(rate, 1))
    base = _RESULTS.get((data, "torch-dataloader"))
    if base and provider != "torch-dataloader":
        info["ratio_vs_torch_dataloader"] = round(rate / base, 2)
    benchmark.extra_info.update(info)
    return rate


# Baseline first: the ratios of the later providers are taken against it, in the same run.
@pytest.mark.parametrize("provider", ["torch-dataloader", "dali-cpu",
                                      pytest.param("dali-gpu", marks=pytest.mark.gpu)])
def test_cifar10_jpeg(benchmark, cifar_dir, provider):
    benchmark.group = "cifar10-jpeg train 32px"
    _run(benchmark, provider, "cifar10-jpeg", cifar_dir, CIFAR["batch_size"])


@pytest.mark.parametrize("provider", ["torch-dataloader", "fastsd-torch", "dali-cpu",
                                      pytest.param("dali-gpu", marks=pytest.mark.gpu)])
def test_imagenet_like_224(benchmark, imagenet_dir, provider):
    benchmark.group = "imagenet-like train 224px"
    sizes = IMAGENET_GPU if provider == "dali-gpu" else IMAGENET
    _run(benchmark, provider, "imagenet-like", imagenet_dir, sizes["batch_size"])


@pytest.mark.gpu
def test_resnet50_train_step(benchmark):
    """Images/s a ResNet-50 training step consumes (fp16 autocast, channels_last, batch 256): what
    the dali-gpu pipeline above has to beat."""
    import torchvision

    batch = 256
    model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def steps():
        for _ in range(5):
            step()
        torch.cuda.synchronize()

    benchmark.group = "imagenet-like train 224px"
    benchmark.pedantic(steps, rounds=3, warmup_rounds=1, iterations=1)
    rate = 5 * batch / benchmark.stats.stats.min
    benchmark.extra_info.update(provider="resnet50-train-step (consumer)", data="random",
                                compare=False,  # a step, not a loader: its own ratio below
                                shape=[batch, 3, 224, 224], device=device_label("cuda"),
                                images_per_s=round(rate, 1))
    dali = _RESULTS.get(("imagenet-like", "dali-gpu"))
    if dali:
        benchmark.extra_info["dali_gpu_over_resnet50"] = round(dali / rate, 2)
