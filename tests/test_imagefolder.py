"""The ImageNet code path on real pictures: an ImageNet-layout folder built from Fashion-MNIST,
streamed through torchvision's ImageNet/ImageFolder with the standard augmentations, and
``python -m emq data check`` on complete and broken folders."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emq.book.full_scale import make_imagenet_folder
from emq.cli import main
from emq.config import DataConfig
from emq.data.check import missing_pieces
from emq.data.datasets import DataError, load_fashion_mnist
from emq.data.imagefolder import ImageFolderSplit
from emq.data.load import load_data

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
pytestmark = pytest.mark.skipif(not (DATA_ROOT / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
                                reason=f"Fashion-MNIST not under {DATA_ROOT} (python -m emq data fetch)")
TRAIN, VAL, SIDE, CROP = 6, 3, 40, 32  # images per class, stored side, training crop


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), DATA_ROOT, TRAIN, VAL, SIDE)


@pytest.fixture(scope="module")
def data(folder):
    return load_data(DataConfig(name="imagenet", root=str(folder), image_size=CROP))


def test_the_folder_has_the_imagenet_layout(folder):
    wnids = sorted(p.name for p in (folder / "train").iterdir())
    assert len(wnids) == 10 and wnids == sorted(p.name for p in (folder / "val").iterdir())
    assert all(len(list((folder / "train" / w).glob("*.JPEG"))) == TRAIN for w in wnids)
    assert (folder / "meta.bin").is_file()
    assert missing_pieces("imagenet", folder) == []


def test_streamed_split_reads_real_fashion_images_with_their_labels(folder, data):
    fashion = load_fashion_mnist(DATA_ROOT)
    assert isinstance(data.train, ImageFolderSplit) and data.classes == fashion.classes
    assert len(data.train) == 10 * TRAIN and len(data.test) == 10 * VAL and data.in_channels == 3
    x, y, idx = next(data.test.batches(10 * VAL))  # evaluation: Resize(32/0.875) + CenterCrop(32)
    assert x.shape == (10 * VAL, 3, CROP, CROP) and x.dtype == torch.float32
    assert y.tolist() == sorted(y.tolist())  # val folders in wnid order: the labels of the wnid folders
    for k in range(10):  # the val images of class k are the first test images of class k, resized
        src = fashion.test.x[(fashion.test.y == k).nonzero().flatten()[:VAL]].float()
        src = F.interpolate(src, size=round(CROP / 0.875), mode="bilinear")[..., 2:2 + CROP, 2:2 + CROP]
        got = x[y == k].mean(1, keepdim=True)
        for a, b in zip(got, src):
            assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9


def test_training_batches_are_seeded_augmented_and_independent_of_workers(data):
    kw = dict(shuffle=True, augment=True, seed=3, epoch=1)
    a = list(data.train.batches(16, **kw))
    b = list(data.train.batches(16, **kw))
    assert len(a) == 10 * TRAIN // 16 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    plain = next(data.train.batches(16, shuffle=True, seed=3, epoch=1))
    assert torch.equal(plain[2], a[0][2]) and not torch.equal(plain[0], a[0][0])  # same images, cropped+flipped
    workers = ImageFolderSplit(data.train.samples, data.train.loader, CROP, workers=2)
    c = list(workers.batches(16, **kw))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, c))
    resumed = list(data.train.batches(16, **kw, start=2))
    assert torch.equal(resumed[0][0], a[2][0])


def test_shards_of_a_batch_are_its_parts(data):
    whole = next(data.train.batches(16, shuffle=True, augment=True, seed=0))
    parts = [next(data.train.batches(16, shuffle=True, augment=True, seed=0, shard=(r, 2))) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[2] for p in parts]), whole[2])
    with pytest.raises(ValueError, match="does not split evenly"):
        next(data.train.batches(15, shuffle=True, shard=(0, 2)))


def test_image_size_is_for_imagenet_folders_only(folder):
    with pytest.raises(DataError, match="ImageNet-layout folders only"):
        load_data(DataConfig(name="fashion_mnist", root=str(DATA_ROOT), image_size=32))


def test_data_check_says_all_present(folder, capsys):
    assert main(["data", "check", "imagenet", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"imagenet: all present under {folder}"


def test_data_check_lists_each_missing_piece_and_fails(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "meta.bin").unlink()
    shutil.rmtree(broken / "val" / "n00000003")
    for f in (broken / "train" / "n00000005").iterdir():
        f.unlink()
    assert main(["data", "check", "imagenet", str(broken)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"missing: {broken / 'meta.bin'}: missing (torchvision's meta.bin parsed from the devkit)",
                     f"missing: {broken / 'train' / 'n00000005'}: no images",
                     f"missing: {broken / 'val' / 'n00000003'}: missing (class of train/ not in val/)"]


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet"])
def test_data_check_of_an_empty_root_names_what_is_needed(name, tmp_path, capsys):
    assert main(["data", "check", name, str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out and all(line.startswith(f"missing: {tmp_path}") for line in out)
    assert main(["data", "check", name, str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().out.strip() == f"missing: {tmp_path / 'nowhere'}: data root does not exist"


def test_data_check_unknown_dataset_is_one_line(capsys, tmp_path):
    assert main(["data", "check", "mnist9", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown dataset 'mnist9'")
