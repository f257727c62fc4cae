"""The paper's dataset loaders, on tiny copies fabricated in the real on-disk formats.

CIFAR batches are protocol-2 pickles checked by torchvision against md5s; the tests point
those md5 lists at the fabricated files (as torchvision's own tests do), so a file changed
afterwards still fails the check. Tiny ImageNet and ImageNet are folders of small JPEGs;
each image is a solid colour unique to it, so a loaded image is matched to the one written
(JPEG is lossy by a few levels) and its label compared.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from emq.config import DataConfig
from emq.data.datasets import DATASETS, IMAGENET_TENSOR_SIZE, DataError, load_imagenet
from emq.data.load import load_data

N = 10  # images per split
WNIDS = ["n01443537", "n01629819", "n01641577"]
NAMES = {"n01443537": ("goldfish", "Carassius auratus"), "n01629819": ("European fire salamander",),
         "n01641577": ("bullfrog", "Rana catesbeiana")}


# ---- fabrication ---------------------------------------------------------------------------
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int, fine: bool) -> dict:
    """One batch as the official pickles hold it: uint8 N x 3072 (R, G, B planes), labels, names."""
    labels = rng.integers(0, num_classes, n).tolist()
    batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"img_{i}.png" for i in range(n)]}
    if fine:
        batch.update(fine_labels=labels, coarse_labels=[y % 20 for y in labels])
    else:
        batch["labels"] = labels
    return batch


def _merge(batches: list[dict], key: str) -> tuple[np.ndarray, list[int]]:
    return np.concatenate([b["data"] for b in batches]), sum((b[key] for b in batches), [])


def make_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> dict:
    """Write tiny CIFAR-10 or CIFAR-100 files under ``root`` and point torchvision's md5s at them."""
    rng = np.random.default_rng(0 if name == "cifar10" else 1)
    cls, fine = (CIFAR10, False) if name == "cifar10" else (CIFAR100, True)
    num_classes = 10 if name == "cifar10" else 100
    base = root / cls.base_folder
    base.mkdir(parents=True)
    train_files = [f for f, _ in cls.train_list]
    per = N // len(train_files)
    train = [_cifar_batch(rng, per, num_classes, fine) for _ in train_files]
    test = _cifar_batch(rng, N, num_classes, fine)
    for f, batch in zip(train_files, train):
        _pickle(base / f, batch)
    _pickle(base / cls.test_list[0][0], test)
    classes = [f"class_{i}" for i in range(num_classes)]
    meta = ({"label_names": classes, "num_cases_per_batch": per, "num_vis": 3072} if not fine else
            {"fine_label_names": classes, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    _pickle(base / cls.meta["filename"], meta)
    monkeypatch.setattr(cls, "train_list", [[f, _md5(base / f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[cls.test_list[0][0], _md5(base / cls.test_list[0][0])]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(base / cls.meta["filename"])})
    key = "fine_labels" if fine else "labels"
    return {"train": _merge(train, key), "test": _merge([test], key), "classes": classes, "base": base}


def _colour(k: int) -> tuple[int, int, int]:
    """A solid colour unique to image ``k`` and far (in JPEG terms) from every other one."""
    return (20 + 40 * (k % 6), 30 + 40 * (k // 6 % 6), 200 - 30 * (k // 36))


def _jpeg(path: Path, k: int, size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, _colour(k)).save(path, "JPEG", quality=95)


def _identify(x: torch.Tensor, ks: list[int]) -> list[int]:
    """For each loaded image, the index k (among ``ks``) of the written image it matches."""
    means = x.float().mean(dim=(2, 3))
    cols = torch.tensor([_colour(k) for k in ks], dtype=torch.float)
    dist = (means[:, None, :] - cols[None]).abs().amax(-1)
    assert dist.min(1).values.max() < 6, "a decoded image matches no written colour"
    return [ks[i] for i in dist.argmin(1).tolist()]


def make_tiny(root: Path) -> dict:
    """Write a 3-class Tiny ImageNet: train/<wnid>/images/*.JPEG, flat val/images + annotations."""
    base = root / "tiny-imagenet-200"
    (base / "wnids.txt").parent.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")  # the real file is not sorted
    words = [f"{w}\t{', '.join(NAMES[w])}" for w in WNIDS] + ["n00001740\tentity"]
    (base / "words.txt").write_text("\n".join(words) + "\n")
    train_wnid = [WNIDS[i % 3] for i in range(N)]
    for k, w in enumerate(train_wnid):
        _jpeg(base / "train" / w / "images" / f"{w}_{k}.JPEG", k)
    for w in WNIDS:
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    val_wnid = [WNIDS[(2 * i + 1) % 3] for i in range(N)]
    lines = []
    for i, w in enumerate(val_wnid):
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG", N + i)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"base": base, "train": train_wnid, "val": val_wnid}


def make_imagenet(root: Path) -> dict:
    """Write a 3-class ImageNet: meta.bin as torchvision saves it, train/ and val/ wnid folders."""
    root.mkdir(parents=True, exist_ok=True)
    train_wnid = [WNIDS[i % 3] for i in range(N)]
    val_wnid = [WNIDS[(i + 2) % 3] for i in range(N)]
    torch.save(({w: NAMES[w] for w in reversed(WNIDS)}, val_wnid), root / "meta.bin")
    for k, w in enumerate(train_wnid):  # not square, not 64: resized and center-cropped
        _jpeg(root / "train" / w / f"{w}_{k}.JPEG", k, size=(96, 80))
    for i, w in enumerate(val_wnid):
        _jpeg(root / "val" / w / f"ILSVRC2012_val_{i:08d}.JPEG", N + i, size=(72, 90))
    return {"base": root, "train": train_wnid, "val": val_wnid}


# ---- CIFAR ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    made = make_cifar(tmp_path, monkeypatch, name)
    ds = DATASETS[name](tmp_path)
    assert ds.name == name and ds.classes == made["classes"] and ds.num_classes == len(made["classes"])
    assert ds.in_channels == 3 and ds.train.pad == 4
    for split, (data, labels) in ((ds.train, made["train"]), (ds.test, made["test"])):
        assert split.x.shape == (N, 3, 32, 32) and split.x.dtype == torch.uint8
        assert split.y.dtype == torch.int64 and split.y.tolist() == labels
        assert torch.equal(split.x, torch.from_numpy(data).view(N, 3, 32, 32))  # R, G, B planes, exactly


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tampered_file_fails_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    made = make_cifar(tmp_path, monkeypatch, name)
    victim = made["base"] / (CIFAR10 if name == "cifar10" else CIFAR100).test_list[0][0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a changed pixel: still a valid pickle, only the md5 notices
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        DATASETS[name](tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}:") and str(victim) in msg and "md5" in msg


def test_cifar_truncated_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = make_cifar(tmp_path, monkeypatch, "cifar10")
    victim = made["base"] / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:500])
    monkeypatch.setattr(CIFAR10, "train_list", [[f, _md5(made["base"] / f)] for f, _ in CIFAR10.train_list])
    with pytest.raises(DataError) as err:  # md5 matches the truncated file: the unpickling fails
        DATASETS["cifar10"](tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cifar10:") and "corrupt" in msg


def test_cifar_missing_batch_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = make_cifar(tmp_path, monkeypatch, "cifar10")
    (made["base"] / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 not found") as err:
        DATASETS["cifar10"](tmp_path)
    assert "\n" not in str(err.value)


# ---- Tiny ImageNet and ImageNet ------------------------------------------------------------
def _check_folder_split(split, wnids: list[str], first_k: int, classes: list[str], size: int) -> None:
    assert split.x.shape == (len(wnids), 3, size, size) and split.x.dtype == torch.uint8
    assert split.y.dtype == torch.int64
    ks = list(range(first_k, first_k + len(wnids)))
    found = _identify(split.x, ks)
    assert sorted(found) == ks  # every written image loaded once
    names = {w: NAMES[w][0] for w in WNIDS}
    for k, y in zip(found, split.y.tolist()):  # the label written for image k is the label loaded
        assert classes[y] == names[wnids[k - first_k]]


def test_tinyimagenet_round_trip(tmp_path: Path) -> None:
    made = make_tiny(tmp_path)
    ds = DATASETS["tinyimagenet"](tmp_path)
    assert ds.classes == [NAMES[w][0] for w in sorted(WNIDS)] and ds.num_classes == 3 and ds.train.pad == 8
    _check_folder_split(ds.train, made["train"], 0, ds.classes, 64)
    _check_folder_split(ds.test, made["val"], N, ds.classes, 64)


def test_tinyimagenet_names_fall_back_to_wnids(tmp_path: Path) -> None:
    made = make_tiny(tmp_path)
    (made["base"] / "words.txt").unlink()
    assert DATASETS["tinyimagenet"](tmp_path).classes == sorted(WNIDS)


def test_tinyimagenet_unreadable_image(tmp_path: Path) -> None:
    made = make_tiny(tmp_path)
    victim = made["base"] / "val" / "images" / "val_3.JPEG"
    victim.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as err:
        DATASETS["tinyimagenet"](tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("tinyimagenet:") and str(victim) in msg


def test_imagenet_round_trip(tmp_path: Path) -> None:
    made = make_imagenet(tmp_path)
    ds = DATASETS["imagenet"](tmp_path)
    assert ds.classes == [NAMES[w][0] for w in sorted(WNIDS)] and ds.num_classes == 3
    _check_folder_split(ds.train, made["train"], 0, ds.classes, IMAGENET_TENSOR_SIZE)
    _check_folder_split(ds.test, made["val"], N, ds.classes, IMAGENET_TENSOR_SIZE)
    assert load_imagenet(tmp_path, image_size=32).train.x.shape == (N, 3, 32, 32)


def test_imagenet_truncated_jpeg(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    victim = tmp_path / "train" / WNIDS[1] / f"{WNIDS[1]}_1.JPEG"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        DATASETS["imagenet"](tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("imagenet:") and str(victim) in msg


def test_imagenet_corrupt_meta(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    (tmp_path / "meta.bin").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        DATASETS["imagenet"](tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("imagenet:") and str(tmp_path / "meta.bin") in msg


# ---- shared behaviour ----------------------------------------------------------------------
@pytest.mark.parametrize("name, missing", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                           ("tinyimagenet", "tiny-imagenet-200"), ("imagenet", "meta.bin")])
def test_missing_folder_is_one_line_naming_the_path(tmp_path: Path, name: str, missing: str) -> None:
    with pytest.raises(DataError) as err:
        DATASETS[name](tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}:") and str(tmp_path / missing) in msg


def test_imagenet_missing_val_folder(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    for f in (tmp_path / "val").rglob("*.JPEG"):
        f.unlink()
    for d in sorted((tmp_path / "val").rglob("*"), reverse=True):
        d.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(DataError, match="val not found") as err:
        DATASETS["imagenet"](tmp_path)
    assert str(tmp_path / "val") in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tinyimagenet", "imagenet"])
def test_load_data_cuts_subsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    if name.startswith("cifar"):
        make_cifar(tmp_path, monkeypatch, name)
    else:
        (make_tiny if name == "tinyimagenet" else make_imagenet)(tmp_path)
    full = DATASETS[name](tmp_path)
    ds = load_data(DataConfig(name=name, root=str(tmp_path), train_size=4, test_size=3))
    assert len(ds.train) == 4 and len(ds.test) == 3
    for sub, whole in ((ds.train, full.train), (ds.test, full.test)):  # each kept image keeps its label
        for x, y in zip(sub.x, sub.y):
            match = (whole.x == x).flatten(1).all(1).nonzero().flatten()
            assert len(match) >= 1 and y in whole.y[match]
    again = load_data(DataConfig(name=name, root=str(tmp_path), train_size=4, test_size=3))
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)  # fixed subsets
