"""The embedded dataset: real Fashion-MNIST, held as tensors; missing or corrupt files are one
clear line."""
import shutil
from pathlib import Path

import pytest
import torch

from emq.config import DataConfig
from emq.data.datasets import FASHION_FILES, DataError, fetch_fashion_mnist, load_fashion_mnist
from emq.data.load import load_data

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
RAW = DATA_ROOT / "FashionMNIST" / "raw"
pytestmark = pytest.mark.skipif(not all((RAW / f).is_file() for f in FASHION_FILES),
                                reason="Fashion-MNIST not fetched (python -m emq data fetch)")


def test_the_real_dataset_has_its_published_sizes_and_classes():
    ds = load_fashion_mnist(DATA_ROOT)
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.num_classes == 10 and ds.in_channels == 1
    assert torch.equal(torch.bincount(ds.train.y), torch.full((10,), 6000))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_a_subset_is_an_index_fixed_by_its_seed():
    a = load_data(DataConfig(root=str(DATA_ROOT), train_size=1000, test_size=100))
    b = load_data(DataConfig(root=str(DATA_ROOT), train_size=1000, test_size=100))
    assert len(a.train) == 1000 and len(a.test) == 100
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)


def test_normalised_batches_have_about_zero_mean_and_unit_spread():
    ds = load_data(DataConfig(root=str(DATA_ROOT), train_size=4096))
    x, _, _ = next(ds.train.batches(4096))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def copy_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(RAW, raw)
    return raw


def test_a_missing_file_is_one_line_naming_it_and_the_fetch_command(tmp_path):
    raw = copy_raw(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "t10k-labels-idx1-ubyte" in msg and "python -m emq data fetch" in msg


def test_a_truncated_file_is_one_line_saying_corrupt(tmp_path):
    raw = copy_raw(tmp_path)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[: 1000])
    with pytest.raises(DataError) as e:
        load_fashion_mnist(tmp_path)
    assert "\n" not in str(e.value) and "corrupt" in str(e.value)


def test_a_missing_data_root_is_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(root=str(tmp_path / "nowhere")))


def test_fetch_leaves_files_already_there_alone(tmp_path):
    raw = copy_raw(tmp_path)
    before = {f: (raw / f).stat().st_mtime_ns for f in FASHION_FILES}
    assert fetch_fashion_mnist(tmp_path, log=lambda _: None) == raw
    assert before == {f: (raw / f).stat().st_mtime_ns for f in FASHION_FILES}
