"""ImageNet-layout folders streamed from disk.

Full-size ImageNet does not fit in memory as tensors, so with ``data.image_size > 0`` it is
read image by image through torchvision's ``ImageNet`` dataset (an ``ImageFolder``) with the
standard augmentations: ``RandomResizedCrop`` + horizontal flip for training,
``Resize`` (to size/0.875) + ``CenterCrop`` for evaluation. Decoding runs in DataLoader
workers with pinned memory on a GPU; the batches are uint8 and are normalised on the device.

An :class:`ImageFolderSplit` draws batches exactly as :class:`emq.data.datasets.TensorSplit` does: the
order from a generator seeded by (seed, epoch), and each image's augmentation from a
generator seeded by (seed, epoch, image index), so the batches do not depend on the number
of workers or of processes, and a resumed run sees the batches an uninterrupted one would.

Where ImageNet is not available, chapter 05 builds such a folder from real Fashion-MNIST
images (:func:`emq.book.full_scale.make_imagenet_folder`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emq.data.datasets import Dataset, _brief, index_imagenet
from emq.data.sampling import _mix, shard_of
from emq.errors import DataError

# ImageNet's per-channel mean and std (torchvision's reference training scripts).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 0.875  # evaluation: resize the shorter side to size / 0.875, then center-crop size


def default_workers(device: str | torch.device = "cpu", processes: int = 1) -> int:
    """DataLoader workers per process: none on the CPU (the cores train), else up to 8 per GPU."""
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(1, processes) - 1))


def _transform(image_size: int, augment: bool):
    from torchvision import transforms as T

    if augment:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    return T.Compose([T.Resize(round(image_size / RESIZE_RATIO)), T.CenterCrop(image_size), T.PILToTensor()])


class _Images(torch.utils.data.Dataset):
    """Sample ``k`` of a split as (uint8 3 x S x S, label, k), augmented from seed (seed, epoch, k)."""

    def __init__(self, split: ImageFolderSplit, augment: bool, seed: int, epoch: int):
        self.split, self.transform, self.seed, self.epoch = split, _transform(split.image_size, augment), seed, epoch
        self.augment = augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int):
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

    def subset(self, index: torch.Tensor) -> ImageFolderSplit:
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
    tr, te = index_imagenet(root)
    train = ImageFolderSplit(tr.samples, tr.loader, image_size, workers)
    test = ImageFolderSplit(te.samples, te.loader, image_size, workers)
    classes = [c[0] for c in tr.classes]
    return Dataset("imagenet", train, test, len(classes), classes)
