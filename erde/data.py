"""Datasets as in-memory uint8 tensors with batch-level augmentation.

Why in memory: the supported sets are small (Fashion-MNIST is 47 MB as uint8), and augmenting a
whole batch with tensor ops is several times faster on a 2-core CPU than per-image PIL
transforms in DataLoader workers.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from erde.artifact import InputSpec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

NOISE = 70  # noise amplitude of the synthetic set (the pattern's is 150)
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic")


@dataclass
class TensorData:
    """Images (N, C, H, W) uint8 and labels (N,) int64, with the class names and input spec."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    spec: InputSpec
    hflip: bool = True  # whether horizontal flips keep the label (not for digits)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> TensorData:
        return TensorData(self.images[index], self.labels[index], self.classes, self.spec, self.hflip)


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path.name} is not an idx file (too short)")
    _, _, dtype_code, ndim = raw[:4]
    if dtype_code != 0x08:
        raise ValueError(f"{path.name}: only unsigned-byte idx files are supported")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path.name} is truncated: expected {int(np.prod(dims))} bytes of data, found {data.size}")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {root}; install it with 'apt-get install -y dataset-fashion-mnist' "
        "or pass --data-dir")


def load_fashion_mnist(split: str, root: Path | None = None) -> TensorData:
    root = root or FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
    spec = InputSpec("L", 28, (0.2860,), (0.3530,))
    return TensorData(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                      list(FASHION_MNIST_CLASSES), spec)


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> TensorData:
    from torchvision import datasets

    train = split == "train"
    if name == "svhn":
        ds = datasets.SVHN(str(root), split="train" if train else "test", download=download)
        images, labels, classes = np.asarray(ds.data), np.asarray(ds.labels), [str(d) for d in range(10)]
        spec, hflip = InputSpec("RGB", 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)), False
    else:
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = cls(str(root), train=train, download=download)
        images = np.asarray(ds.data).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        labels, classes = np.asarray(ds.targets), list(ds.classes)
        mean = (0.4914, 0.4822, 0.4465) if name == "cifar10" else (0.5071, 0.4865, 0.4409)
        std = (0.2470, 0.2435, 0.2616) if name == "cifar10" else (0.2673, 0.2564, 0.2762)
        spec, hflip = InputSpec("RGB", 32, mean, std), True
    return TensorData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                      classes, spec, hflip)


def load_image_folder(root: Path, size: int, mode: str) -> TensorData:
    """An ImageFolder tree (root/<class>/<image>), decoded once and held in memory at `size`."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    images = np.empty((len(folder), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
        images[i] = arr[None] if mode == "L" else arr.transpose(2, 0, 1)
    flat = images.reshape(len(images), images.shape[1], -1).astype(np.float64) / 255
    spec = InputSpec(mode, size, tuple(flat.mean(axis=(0, 2)).tolist()), tuple(flat.std(axis=(0, 2)).tolist()))
    return TensorData(torch.from_numpy(images), torch.tensor(folder.targets, dtype=torch.int64),
                      list(folder.classes), spec)


def make_synthetic(n: int, num_classes: int = 4, size: int = 16, seed: int = 0) -> TensorData:
    """A learnable toy set of textures: class k is a stripe pattern with period 2 + k // 3 in one of
    three orientations (horizontal, vertical, checkerboard), at a random phase, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    period = (2 + labels // 3).view(n, 1, 1)
    phase = torch.randint(0, 4, (n, 1, 1), generator=g)
    r = torch.arange(size).view(1, size, 1)
    c = torch.arange(size).view(1, 1, size)
    rows, cols = ((r + phase) // period).expand(n, size, size), ((c + phase) // period).expand(n, size, size)
    stripes = torch.stack([rows % 2, cols % 2, (rows + cols) % 2])  # (3, n, size, size)
    pattern = stripes[labels % 3, torch.arange(n)]
    noise = torch.randint(0, NOISE, (n, size, size), generator=g)
    images = (pattern * 150 + noise).clamp(0, 255).to(torch.uint8).unsqueeze(1)
    spec = InputSpec("L", size, (0.35,), (0.3,))
    return TensorData(images, labels, [f"class{k}" for k in range(num_classes)], spec, hflip=False)


def load_dataset(name: str, split: str, data_dir: Path | None = None, download: bool = False,
                 image_size: int = 32, image_mode: str = "RGB") -> TensorData:
    """Load `split` ('train' or 'test') of a supported dataset into memory."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name in ("cifar10", "cifar100", "svhn"):
        return _load_torchvision(name, split, data_dir or Path("data") / name, download)
    if name == "imagefolder":
        if data_dir is None:
            raise ValueError("imagefolder needs --data-dir pointing at a folder with train/ and test/ inside")
        return load_image_folder(data_dir / split, image_size, image_mode)
    if name == "synthetic":
        return make_synthetic(512 if split == "train" else 256, seed=0 if split == "train" else 1)
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def train_val_split(data: TensorData, val_fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """A deterministic split carved from the training set: same seed, same split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(data) * val_fraction))
    return data.subset(perm[n_val:]), data.subset(perm[:n_val])


def normalize(images: Tensor, spec: InputSpec) -> Tensor:
    """uint8 (B, C, H, W) -> normalised float32."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: Tensor, generator: torch.Generator, hflip: bool) -> Tensor:
    """Random crop with zero padding (size/8 pixels: 4 at 32, 3 at 28) and random horizontal flip, per image."""
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = _crop(padded, dy, dx, h, w)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(3)
    return out


def _crop(padded: Tensor, dy: Tensor, dx: Tensor, h: int, w: int) -> Tensor:
    n = padded.shape[0]
    ys = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)
    xs = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w)
    idx = torch.arange(n).view(n, 1, 1, 1)
    ch = torch.arange(padded.shape[1]).view(1, -1, 1, 1)
    return padded[idx, ch, ys, xs]


def iterate_batches(data: TensorData, batch_size: int, *, shuffle: bool, augmented: bool = False,
                    generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (normalised images, labels) batches; the generator makes order and augmentation reproducible."""
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        images = data.images[index]
        if augmented:
            assert generator is not None, "augmentation needs a seeded generator"
            images = augment(images, generator, data.hflip)
        yield normalize(images, data.spec), data.labels[index]
