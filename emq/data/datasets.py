"""Datasets, held as tensors so that a subset is an index.

``load_data(cfg)`` returns a :class:`Dataset` of two :class:`TensorSplit` (train, test).
Fashion-MNIST is the embedded default; the paper's datasets are read by the real
torchvision loaders from ``cfg.root`` (see :data:`DATASETS`). Batches are drawn from
generators seeded by (seed, epoch) and (seed, step), so a run resumed at any step sees
exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from emq.data.sampling import _mix, shard_of
from emq.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image
    from torchvision.datasets import CIFAR10


@dataclass
class TensorSplit:
    """Images ``x`` (uint8, N x C x H x W) and labels ``y`` of one split, normalised on the fly."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor  # per channel, in [0, 1] units
    std: torch.Tensor
    pad: int = 2  # random-crop padding of the augmentation

    def __len__(self) -> int:
        return len(self.y)

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.x.shape[-1]

    def subset(self, index: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.x[index], self.y[index], self.mean, self.std, self.pad)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding and random horizontal flip, batched."""
        b, c, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        flip = torch.rand(b, generator=gen) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
        return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                epoch: int = 0, start: int = 0, device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1),
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y, index)`` batches; ``start`` skips the first batches of the epoch.

        The order comes from a generator seeded by (seed, epoch); the augmentation of batch
        ``i`` from one seeded by (seed, epoch, i). Training drops the last partial batch.
        ``shard = (rank, world)`` keeps process ``rank``'s contiguous part of every batch
        (augmented as part of the whole batch, so the union over ranks is the 1-process batch).
        """
        n = len(self)
        order = torch.arange(n)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
        steps = n // batch_size if shuffle else -(-n // batch_size)
        for i in range(start, steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = self.x[idx]
            if augment:
                x = self.augment(x, torch.Generator().manual_seed(_mix(seed, epoch, i + 1)))
            if shard[1] > 1:
                part = shard_of(len(idx), *shard)
                x, idx = x[part], idx[part]
            yield self.normalise(x.to(device)), self.y[idx].to(device), idx


@dataclass
class Dataset:
    name: str
    train: TensorSplit
    test: TensorSplit
    num_classes: int
    classes: list[str]

    @property
    def in_channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> int:
        return self.train.image_size


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float().div_(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    return xf.mean(1), xf.std(1)


def tensor_dataset(name: str, train: tuple, test: tuple, classes: list[str], pad: int) -> Dataset:
    """Wrap uint8 image tensors (N x C x H x W) and labels as a Dataset; stats from train."""
    mean, std = _channel_stats(train[0])
    return Dataset(name, TensorSplit(train[0], train[1], mean, std, pad),
                   TensorSplit(test[0], test[1], mean, std, pad), len(classes), list(classes))


# ---- Fashion-MNIST: the embedded default -------------------------------------------------
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def fetch_fashion_mnist(root: str | Path, log: Callable[[str], None] = print) -> Path:
    """Put Fashion-MNIST's raw IDX files under ``root/FashionMNIST/raw``.

    Tries, in order: files already there; Debian's ``dataset-fashion-mnist`` (installing it
    with apt-get when running as root); torchvision's download. Raises DataError otherwise.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FASHION_FILES):
        log(f"Fashion-MNIST already in {raw}")
        return raw
    # a file where a folder must go (the root or one below it): say so before anything is written
    for folder in (raw, *raw.parents):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"cannot put Fashion-MNIST into {raw}: {folder} is a file, not a folder")
    if not DEBIAN_DIR.is_dir() and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        log("installing Debian's dataset-fashion-mnist with apt-get")
        install = "apt-get install -y -qq dataset-fashion-mnist"
        cmd = f"{install} || (apt-get update -qq && {install})"
        subprocess.run(["bash", "-c", cmd], check=False, stdout=subprocess.DEVNULL)
    if DEBIAN_DIR.is_dir():
        try:
            raw.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create {raw} ({e.strerror or type(e).__name__})") from None
        for f in FASHION_FILES:
            with gzip.open(DEBIAN_DIR / f"{f}.gz", "rb") as src, open(raw / f"{f}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(raw / f"{f}.part", raw / f)
        log(f"Fashion-MNIST copied from {DEBIAN_DIR} to {raw}")
        return raw
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        return raw
    except Exception as e:  # no network: say both ways in one line
        raise DataError(
            f"cannot get Fashion-MNIST into {raw}: install Debian's package (apt-get install dataset-fashion-mnist, "
            f"as root) or run where torchvision can download it ({type(e).__name__})") from None


def load_fashion_mnist(root: str | Path) -> Dataset:
    from torchvision.datasets import FashionMNIST

    raw = Path(root) / "FashionMNIST" / "raw"
    missing = [f for f in FASHION_FILES if not (raw / f).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST is missing from {raw} ({', '.join(missing)}): run `python -m emq data fetch`")
    try:
        tr = FashionMNIST(str(root), train=True, download=False)
        te = FashionMNIST(str(root), train=False, download=False)
    except Exception as e:
        raise DataError(f"Fashion-MNIST under {raw} is corrupt ({type(e).__name__}: {e}): delete it and run "
                        f"`python -m emq data fetch`") from None
    if tr.data.shape != (60000, 28, 28) or te.data.shape != (10000, 28, 28) or len(tr.targets) != 60000:
        raise DataError(f"Fashion-MNIST under {raw} is corrupt (shapes {tuple(tr.data.shape)}, {tuple(te.data.shape)}):"
                        f" delete it and run `python -m emq data fetch`")
    return tensor_dataset("fashion_mnist", (tr.data[:, None], tr.targets), (te.data[:, None], te.targets),
                          tr.classes, pad=2)


# ---- the paper's datasets: read by torchvision's own loaders, never downloaded -------------
IMAGENET_TENSOR_SIZE = 64  # side of the decoded ImageNet tensors (small copies; see load_imagenet)


def _brief(e: BaseException) -> str:
    """An exception as one short line: its type and its message with newlines folded."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _require(name: str, path: Path, root: str | Path, what: str) -> None:
    """Raise a one-line DataError if ``path`` (a file or folder of dataset ``name``) is missing."""
    if not path.exists():
        raise DataError(f"{name}: {path} not found under root {root} (expected {what})")


# CIFAR-10 / CIFAR-100: pickled batches, small enough to hold as uint8 tensors
def _cifar_files(cls: type) -> list[tuple[str, str | None]]:
    """(file name, md5) of every file torchvision's CIFAR class checks: batches and meta."""
    return [(f, md5) for f, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]


def _cifar_split(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision CIFAR split (N x 32 x 32 x 3 numpy) as uint8 N x 3 x 32 x 32 and int64 labels."""
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ds.targets, dtype=torch.long)


def _load_cifar(name: str, cls: type, root: str | Path) -> Dataset:
    """Load a CIFAR dataset with torchvision's class ``cls`` (md5s checked), as tensors."""
    from torchvision.datasets.utils import check_integrity

    base = Path(root) / cls.base_folder
    _require(name, base, root, "the python-version batches")
    files = _cifar_files(cls)
    for f, _ in files:
        _require(name, base / f, root, f"the python-version batch file {f}")
    try:
        tr = cls(str(root), train=True, download=False)
        te = cls(str(root), train=False, download=False)
    except Exception as e:
        bad = next((base / f for f, md5 in files if not check_integrity(str(base / f), md5)), None)
        if bad is not None:
            raise DataError(f"{name}: {bad} fails its md5 check (corrupt or not the official file): "
                            f"replace it with the official python-version batches") from None
        raise DataError(f"{name}: files under {base} are corrupt ({_brief(e)}): replace them with the "
                        f"official python-version batches") from None
    return tensor_dataset(name, _cifar_split(tr), _cifar_split(te), list(tr.classes), pad=4)


def load_cifar10(root: str | Path) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision.datasets.CIFAR10, md5s checked)."""
    from torchvision.datasets import CIFAR10

    return _load_cifar("cifar10", CIFAR10, root)


def load_cifar100(root: str | Path) -> Dataset:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python`` (torchvision.datasets.CIFAR100)."""
    from torchvision.datasets import CIFAR100

    return _load_cifar("cifar100", CIFAR100, root)


# Image folders (Tiny ImageNet, ImageNet): decoded once into uint8 tensors
def _image_tensor(img: Image, size: int) -> torch.Tensor:
    """A PIL image as uint8 3 x size x size: shorter side resized to ``size``, then center-cropped."""
    from torchvision.transforms import functional as TF

    img = img.convert("RGB")
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(img, size), [size, size])
    return TF.pil_to_tensor(img)


def _decode(name: str, samples: list[tuple[str, int]], loader: Callable[[str], Image], size: int, where: Path,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``(path, label)`` samples into uint8 N x 3 x size x size images and int64 labels."""
    if not samples:
        raise DataError(f"{name}: no images found under {where}")
    x = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            x[i] = _image_tensor(loader(path), size)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for missing/truncated/unreadable files
            raise DataError(f"{name}: cannot read image {path} ({_brief(e)}): replace or delete it") from None
    return x, torch.tensor([label for _, label in samples], dtype=torch.long)


def _read_lines(name: str, path: Path) -> list[list[str]]:
    """The non-empty lines of a tab-separated text file, split on tabs."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: cannot read {path} ({_brief(e)})") from None
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def _tiny_names(name: str, base: Path, wnids: list[str]) -> list[str]:
    """Class names from words.txt (the first of each wnid's names), else the wnids themselves."""
    words = base / "words.txt"
    if not words.is_file():
        return list(wnids)
    table = {row[0].strip(): row[1].split(",")[0].strip() for row in _read_lines(name, words) if len(row) >= 2}
    return [table.get(w) or w for w in wnids]


def _tiny_val(name: str, base: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of the flat val/images folder, labelled by val/val_annotations.txt."""
    ann = base / "val" / "val_annotations.txt"
    samples = []
    for n, row in enumerate(_read_lines(name, ann), 1):
        if len(row) < 2 or row[1].strip() not in class_to_idx:
            raise DataError(f"{name}: {ann} line {n} is malformed or names a class not in train/: {row[:2]}")
        samples.append((str(base / "val" / "images" / row[0].strip()), class_to_idx[row[1].strip()]))
    return samples


def load_tinyimagenet(root: str | Path) -> Dataset:
    """Tiny ImageNet from ``root/tiny-imagenet-200`` as uint8 3 x 64 x 64 tensors (pad 8).

    Train is read with torchvision's ImageFolder over ``train/`` (classes are the wnid folders,
    sorted, as ImageFolder orders them; they must match ``wnids.txt``); the validation split,
    used as the test split, is the flat ``val/images`` labelled by ``val/val_annotations.txt``.
    """
    from torchvision.datasets import ImageFolder

    name, base = "tinyimagenet", Path(root) / "tiny-imagenet-200"
    _require(name, base, root, "the unzipped tiny-imagenet-200 folder")
    for rel, what in (("wnids.txt", "the class list"), ("train", "the train/<wnid>/images folders"),
                      ("val/images", "the flat validation images"), ("val/val_annotations.txt", "the val labels")):
        _require(name, base / rel, root, what)
    wnids = [row[0].strip() for row in _read_lines(name, base / "wnids.txt")]
    try:
        train = ImageFolder(str(base / "train"))
    except Exception as e:
        raise DataError(f"{name}: cannot index {base / 'train'} ({_brief(e)})") from None
    if sorted(train.classes) != sorted(wnids):
        raise DataError(f"{name}: the class folders of {base / 'train'} ({len(train.classes)}) do not match "
                        f"{base / 'wnids.txt'} ({len(wnids)} wnids)")
    tr = _decode(name, train.samples, train.loader, 64, base / "train")
    te = _decode(name, _tiny_val(name, base, train.class_to_idx), train.loader, 64, base / "val")
    return tensor_dataset(name, tr, te, _tiny_names(name, base, train.classes), pad=8)


def index_imagenet(root: str | Path):
    """torchvision's ImageNet train and val splits of ``root`` (meta.bin, train/ and val/ wnid
    folders), indexed but not read; a one-line DataError for anything missing or inconsistent."""
    from torchvision.datasets import ImageNet

    name, base = "imagenet", Path(root)
    for rel, what in (("meta.bin", "torchvision's meta.bin parsed from the devkit"),
                      ("train", "the train/<wnid>/*.JPEG folders"), ("val", "the val/<wnid>/*.JPEG folders")):
        _require(name, base / rel, root, what)
    try:
        tr = ImageNet(str(root), split="train")
        te = ImageNet(str(root), split="val")
    except Exception as e:
        raise DataError(f"{name}: cannot index {base} ({_brief(e)}): check meta.bin and the wnid folders") from None
    if te.wnids != tr.wnids:
        raise DataError(f"{name}: the class folders of {base / 'val'} ({len(te.wnids)}) differ from those of "
                        f"{base / 'train'} ({len(tr.wnids)})")
    return tr, te


def load_imagenet(root: str | Path, image_size: int = IMAGENET_TENSOR_SIZE) -> Dataset:
    """ImageNet (ILSVRC-2012) via torchvision.datasets.ImageNet, decoded to uint8 tensors.

    Needs ``root/meta.bin`` and ``root/{train,val}/<wnid>/*.JPEG`` (what torchvision leaves
    after parsing the official archives). Every image is resized (shorter side) and
    center-cropped to ``image_size`` (default :data:`IMAGENET_TENSOR_SIZE`) and held in memory,
    so the tensor-based training loop runs unchanged on small copies. Full-scale ImageNet is
    streamed from disk instead with ``data.image_size`` > 0 (:mod:`emq.data.imagefolder`). Class names are the
    first name of each wnid's names in meta.bin.
    """
    from torchvision.datasets.imagenet import load_meta_file

    name, base = "imagenet", Path(root)
    _require(name, base / "meta.bin", root, "torchvision's meta.bin parsed from the devkit")
    try:
        load_meta_file(str(root))
    except Exception as e:
        raise DataError(f"{name}: {base / 'meta.bin'} is corrupt ({type(e).__name__}): delete it and let "
                        f"torchvision.datasets.ImageNet rebuild it from the devkit archive") from None
    tr, te = index_imagenet(root)
    x_tr = _decode(name, tr.samples, tr.loader, image_size, base / "train")
    x_te = _decode(name, te.samples, te.loader, image_size, base / "val")
    return tensor_dataset(name, x_tr, x_te, [c[0] for c in tr.classes], pad=max(1, image_size // 8))


# name -> loader(root) returning a Dataset; the paper's datasets register here too.
DATASETS: dict[str, Callable[[str | Path], Dataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "tinyimagenet": load_tinyimagenet,
    "imagenet": load_imagenet,
}
