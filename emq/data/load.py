"""``load_data(cfg)``: the dataset a config names, held as tensors or streamed from disk, cut to its fixed subsets."""
from __future__ import annotations

from pathlib import Path

import torch

from emq.config import DataConfig
from emq.data.datasets import DATASETS, Dataset, TensorSplit
from emq.data.imagefolder import load_imagenet_stream
from emq.errors import DataError


def _fixed_subset(split: TensorSplit, size: int, seed: int) -> TensorSplit:
    if size == 0 or size >= len(split):
        return split
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size]
    return split.subset(index.sort().values)


def load_data(cfg: DataConfig) -> Dataset:
    """Load the dataset named by ``cfg.name`` and cut the fixed train/test subsets."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}: use one of {', '.join(DATASETS)}")
    if not Path(cfg.root).is_dir():
        raise DataError(f"data root {cfg.root!r} does not exist")
    if cfg.image_size and cfg.name != "imagenet":
        raise DataError(f"data.image_size streams ImageNet-layout folders only; data.name is {cfg.name!r}: "
                        f"leave data.image_size at 0")
    if cfg.image_size:  # streamed from disk at full size
        ds = load_imagenet_stream(cfg.root, cfg.image_size)
    else:
        ds = DATASETS[cfg.name](cfg.root)
    ds.train = _fixed_subset(ds.train, cfg.train_size, cfg.subset_seed)
    ds.test = _fixed_subset(ds.test, cfg.test_size, cfg.subset_seed + 1)
    return ds
