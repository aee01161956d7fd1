"""Training-time image augmentation (opt-in, ``data.augment``), as LAVIS's BLIP-2 training processor does
it: a random resized crop (scale 0.5 to 1 of the area) and a horizontal flip. Each sample's draw is
seeded by (seed, epoch, index), so a resumed run and any number of DataLoader workers crop alike."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from blipkit.data.sample import Sample

__all__ = ["AUGMENTATIONS", "AugmentedDataset", "augment_image"]

AUGMENTATIONS = ("crop", "flip")
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def augment_image(image: Image.Image, augmentations: Sequence[str], rng: random.Random) -> Image.Image:
    """``image`` randomly cropped (area ``CROP_SCALE``, aspect ``CROP_RATIO``) and/or flipped left-right."""
    if "crop" in augmentations:
        width, height = image.size
        for _ in range(10):
            area = width * height * rng.uniform(*CROP_SCALE)
            ratio = rng.uniform(*CROP_RATIO)
            w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                image = image.crop((left, top, left + w, top + h))
                break
    if "flip" in augmentations and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class AugmentedDataset(Dataset):
    """A training view of an image dataset whose samples come augmented; keys are (index, epoch) pairs."""

    def __init__(self, dataset: Any, augmentations: Sequence[str], seed: int) -> None:
        self.dataset = dataset
        self.augmentations = tuple(augmentations)
        self.seed = seed
        self.records, self.name, self.split = dataset.records, dataset.name, dataset.split
        self.tasks, self.skipped = dataset.tasks, dataset.skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample | None:
        index, epoch = key
        sample = self.dataset[index]
        if sample is None or sample.image is None:
            return sample
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        sample.image = augment_image(sample.image, self.augmentations, rng)
        return sample
