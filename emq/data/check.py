"""``python -m emq data check NAME ROOT``: what of a dataset is missing, one line per piece.

:func:`missing_pieces` lists the files and folders that the loader of ``NAME`` needs and
does not find under ``ROOT`` (for image folders also a wrong layout: class folders without
images, validation classes that differ from the training ones). An empty list means all
is present.
"""
from __future__ import annotations

from pathlib import Path

from emq.data.datasets import DATASETS, FASHION_FILES, DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _has_image(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir() if f.is_file())


def _class_folders(name: str, split: Path, images_in: str = "") -> tuple[list[str], list[str]]:
    """(class folder names, missing-piece lines) of an ImageFolder-style ``split`` folder."""
    classes = sorted(d.name for d in split.iterdir() if d.is_dir())
    if not classes:
        return [], [f"{split}: no class folders (expected {split}/<wnid>/)"]
    empty = [c for c in classes if not (split / c / images_in).is_dir() or not _has_image(split / c / images_in)]
    return classes, [f"{split / c / images_in}: no images" for c in empty]


def _files(base: Path, names, what: str) -> list[str]:
    return [f"{base / n}: missing ({what})" for n in names if not (base / n).exists()]


def missing_pieces(name: str, root: str | Path) -> list[str]:
    """One line per missing file, folder or layout problem of dataset ``name`` under ``root``."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: data root does not exist"]
    if name == "fashion_mnist":
        return _files(root / "FashionMNIST" / "raw", FASHION_FILES, "run `python -m emq data fetch`")
    if name in ("cifar10", "cifar100"):
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if name == "cifar10" else CIFAR100
        base = root / cls.base_folder
        if not base.is_dir():
            return [f"{base}: missing (the python-version batches)"]
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return _files(base, names, "a python-version batch file")
    if name == "tinyimagenet":
        base = root / "tiny-imagenet-200"
        if not base.is_dir():
            return [f"{base}: missing (the unzipped tiny-imagenet-200 folder)"]
        out = _files(base, ("wnids.txt", "train", "val/images", "val/val_annotations.txt"), "part of tiny-imagenet-200")
        if (base / "wnids.txt").is_file() and (base / "train").is_dir():
            wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
            out += [f"{base / 'train' / w / 'images'}: missing (class {w} of wnids.txt)"
                    for w in wnids if not (base / "train" / w / "images").is_dir()]
        return out
    # imagenet
    out = _files(root, ("meta.bin",), "torchvision's meta.bin parsed from the devkit")
    out += _files(root, ("train", "val"), "the <split>/<wnid>/*.JPEG folders")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, bad_train = _class_folders(name, root / "train")
        val, bad_val = _class_folders(name, root / "val")
        out += bad_train + bad_val
        if train and val:
            out += [f"{root / 'val' / c}: missing (class of train/ not in val/)"
                    for c in sorted(set(train) - set(val))]
            out += [f"{root / 'train' / c}: missing (class of val/ not in train/)"
                    for c in sorted(set(val) - set(train))]
    return out
