"""The profiles (smoke, cpu, gpu), in one place: what each sets in a run's config, the seeds and
BatchNorm re-estimation batches of the chapters, and chapter 05's full-scale setting.

smoke: seconds, for tests. cpu: the default of `make book`; chapters 01-03 run their grids at the
longer scale chosen by the scale study (``emq.book.grids.CPU_SCALE``) with three seeds.
gpu: full data, long schedules.
"""
from __future__ import annotations

from dataclasses import dataclass

# Config overrides of every chapter and config (``--profile``, ``load_config(profile=...)``).
SCALES: dict[str, dict] = {
    "smoke": {"data.train_size": 512, "data.test_size": 256, "data.augment": False, "model.depth": 8,
              "model.width": 0.25, "train.epochs": 1, "train.batch_size": 64},
    # ResNet-8 at half width on 6144 images for 4 epochs: about a minute per 4-bit-width run on 2 cores (the
    # chapters' grids train longer on fewer images: emq.book.grids.CPU_SCALE).
    "cpu": {"data.train_size": 6144, "data.test_size": 2000, "data.augment": False, "model.depth": 8,
            "model.width": 0.5, "train.epochs": 4, "train.batch_size": 128},
    "gpu": {"data.train_size": 0, "data.test_size": 0, "data.augment": True, "model.depth": 20,
            "model.width": 1.0, "train.epochs": 60, "train.batch_size": 128},
}

# The seeds a chapter trains each method with, and the batches of BatchNorm re-estimation.
SEEDS = {"smoke": (0, 1), "cpu": (0, 1, 2), "gpu": (0, 1, 2)}
RECALIBRATION_BATCHES = {"smoke": 2, "cpu": 20, "gpu": 200}


@dataclass(frozen=True)
class FullScale:
    """One profile of chapter 05."""

    image_size: int  # training crop side
    epochs: int
    batch_size: int  # global batch over all processes
    folder: tuple[int, int, int] | None  # Fashion-MNIST folder: (train, val) images per class, side; None: ImageNet
    augment: bool = True  # RandomResizedCrop + flip (off at cpu, as in every chapter's cpu profile)
    weight_decay: float = 5e-4


FULL_SCALE = {
    "smoke": FullScale(image_size=16, epochs=1, batch_size=16, folder=(8, 4, 32)),
    # 62 steps of 32 crops of 32 px: about 3 minutes on 2 busy cores
    "cpu": FullScale(image_size=32, epochs=2, batch_size=32, folder=(100, 30, 64), augment=False),
    # ImageNet: 60 epochs as the gpu profile of the other chapters, weight decay 1e-4 as is usual there
    "gpu": FullScale(image_size=224, epochs=60, batch_size=256, folder=None, weight_decay=1e-4),
}
