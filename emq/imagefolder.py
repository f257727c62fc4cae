"""ImageNet-layout folders streamed from disk, and one built from real Fashion-MNIST images.

Full-size ImageNet does not fit in memory as tensors, so with ``data.image_size > 0`` it is
read image by image through torchvision's ``ImageNet`` dataset (an ``ImageFolder``) with the
standard augmentations: ``RandomResizedCrop`` + horizontal flip for training,
``Resize`` (to size/0.875) + ``CenterCrop`` for evaluation. Decoding runs in DataLoader
workers with pinned memory on a GPU; the batches are uint8 and are normalised on the device.

An :class:`ImageFolderSplit` draws batches exactly as :class:`emq.data.TensorSplit` does: the
order from a generator seeded by (seed, epoch), and each image's augmentation from a
generator seeded by (seed, epoch, image index), so the batches do not depend on the number
of workers or of processes, and a resumed run sees the batches an uninterrupted one would.

:func:`make_imagenet_folder` writes ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` and
torchvision's ``meta.bin`` from Fashion-MNIST, so the ImageNet code path runs on real
pictures where ImageNet is not available.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ImageNet's per-channel mean and std (torchvision's reference training scripts).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 0.875  # evaluation: resize the shorter side to size / 0.875, then center-crop size


def default_workers(device: str | torch.device = "cpu", processes: int = 1) -> int:
    """DataLoader workers per process: none on the CPU (the cores train), else up to 8 per GPU."""
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(1, processes) - 1))


def shard_of(n: int, rank: int, world: int) -> slice:
    """The contiguous part of a batch of ``n`` that process ``rank`` of ``world`` takes."""
    if n % world:
        raise ValueError(f"a batch of {n} does not split evenly over {world} processes")
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def _transform(image_size: int, augment: bool):
    from torchvision import transforms as T

    if augment:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose([T.Resize(round(image_size / RESIZE_RATIO)), T.CenterCrop(image_size), T.PILToTensor()])


class _Images(torch.utils.data.Dataset):
    """Sample ``k`` of a split as (uint8 3 x S x S, label, k), augmented from seed (seed, epoch, k)."""

    def __init__(self, split: "ImageFolderSplit", augment: bool, seed: int, epoch: int):
        self.split, self.transform, self.seed, self.epoch = split, _transform(split.image_size, augment), seed, epoch
        self.augment = augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int):
        from .data import DataError, _brief, _mix

        path, label = self.split.samples[k]
        try:
            img = self.split.loader(path)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {path} ({_brief(e)}): replace or delete it") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, k) if self.augment else 0)
            x = self.transform(img)
        return x, label, k


@dataclass
class ImageFolderSplit:
    """One split of an image folder, decoded batch by batch (same interface as TensorSplit)."""

    samples: list[tuple[str, int]]
    loader: Callable
    image_size: int
    workers: int = 0  # DataLoader worker processes (0: decode in the training process)
    mean: torch.Tensor = field(default_factory=lambda: torch.tensor(IMAGENET_MEAN))
    std: torch.Tensor = field(default_factory=lambda: torch.tensor(IMAGENET_STD))

    channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def y(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def subset(self, index: torch.Tensor) -> "ImageFolderSplit":
        return ImageFolderSplit([self.samples[i] for i in index.tolist()], self.loader, self.image_size, self.workers,
                                self.mean, self.std)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return (x - self.mean.to(x.device).view(1, -1, 1, 1)) / self.std.to(x.device).view(1, -1, 1, 1)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                epoch: int = 0, start: int = 0, device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1),
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y, index)`` batches as TensorSplit.batches does; ``shard = (rank, world)``
        keeps this process's contiguous part of every batch."""
        from .data import _mix

        n = len(self)
        order = torch.arange(n)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        steps = n // batch_size if shuffle else -(-n // batch_size)
        index = [order[i * batch_size:(i + 1) * batch_size] for i in range(start, steps)]
        if shard[1] > 1:
            index = [idx[shard_of(len(idx), *shard)] for idx in index]
        index = [idx.tolist() for idx in index if len(idx)]
        if not index:
            return
        device = torch.device(device)
        loader = torch.utils.data.DataLoader(_Images(self, augment and shuffle, seed, epoch), batch_sampler=index,
                                             num_workers=self.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        for x, y, idx in loader:
            yield self.normalise(x.to(device, non_blocking=True)), y.to(device, non_blocking=True), idx


def load_imagenet_stream(root: str | Path, image_size: int, workers: int = 0):
    """ImageNet from ``root`` (meta.bin, train/ and val/ wnid folders) streamed at ``image_size``."""
    from .data import Dataset, index_imagenet

    tr, te = index_imagenet(root)
    train = ImageFolderSplit(tr.samples, tr.loader, image_size, workers)
    test = ImageFolderSplit(te.samples, te.loader, image_size, workers)
    classes = [c[0] for c in tr.classes]
    return Dataset("imagenet", train, test, len(classes), classes)


def make_imagenet_folder(out: str | Path, fashion_root: str | Path, per_class_train: int = 100,
                         per_class_val: int = 50, size: int = 64) -> Path:
    """Write an ImageNet-layout folder of real Fashion-MNIST images under ``out``.

    Each of the 10 classes becomes a wnid folder (``n0000000k``) holding the first
    ``per_class_train`` training and ``per_class_val`` test images of that class, upscaled
    from 28 to ``size`` pixels and saved as RGB JPEGs; ``meta.bin`` is what
    ``torchvision.datasets.ImageNet`` reads. Existing complete folders are kept.
    """
    from PIL import Image

    from .data import load_fashion_mnist
    from .results import write_atomic

    out = Path(out)
    done = out / ".complete"
    if done.is_file() and done.read_text().strip() == f"{per_class_train} {per_class_val} {size}":
        return out
    for stale in ("train", "val"):  # a folder of other sizes (or a partial build): start afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    done.unlink(missing_ok=True)
    ds = load_fashion_mnist(fashion_root)
    wnids = [f"n{k:08d}" for k in range(ds.num_classes)]
    val_wnids = []
    for split, folder, per in ((ds.train, "train", per_class_train), (ds.test, "val", per_class_val)):
        for k, wnid in enumerate(wnids):
            (out / folder / wnid).mkdir(parents=True, exist_ok=True)
            for j, i in enumerate((split.y == k).nonzero().flatten()[:per].tolist()):
                img = Image.fromarray(split.x[i, 0].numpy()).convert("RGB").resize((size, size), Image.BILINEAR)
                stem = f"{wnid}_{j}" if folder == "train" else f"ILSVRC2012_val_{k * per + j:08d}"
                img.save(out / folder / wnid / f"{stem}.JPEG", "JPEG", quality=90)
                if folder == "val":
                    val_wnids.append(wnid)
    torch.save(({w: (c,) for w, c in zip(wnids, ds.classes)}, val_wnids), out / "meta.bin")
    write_atomic(done, f"{per_class_train} {per_class_val} {size}\n")
    return out
