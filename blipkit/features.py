"""Frozen-encoder features of datasets: the feature cache filled for a dataset or a whole recipe, and the
dataset viewed through it (samples that carry encoder tokens instead of images)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from blipkit.config import DatasetConfig, Recipe
from blipkit.data.dataset import open_dataset
from blipkit.data.feature_cache import CachedFeatureDataset, FeatureCache
from blipkit.distributed import Ranks
from blipkit.model.build import build_model
from blipkit.model.vlm import VisionLanguageModel
from blipkit.train.feedback import CountProgress

__all__ = ["cached_features", "recipe_features"]


def cached_features(
    model: VisionLanguageModel, dataset: Any, quiet: bool = False, batch_size: int = 32, ranks: Ranks | None = None,
    report: Callable[[str], None] | None = None,
) -> CachedFeatureDataset:
    """Encode every image of ``dataset`` not yet in the feature cache, and view the dataset through it;
    ``report`` hears how many images the fill encodes and the disk space they take.

    Under several processes every process calls this with ``ranks``: each encodes its share."""
    encoder = model.encoder
    cache = FeatureCache(encoder.cache_key)

    def encode(images: list[Any]) -> torch.Tensor:
        return model.image_tokens(torch.stack([encoder.preprocess(image) for image in images]))

    ranks = ranks or Ranks()

    def plan(images: int, size: int) -> None:
        if report is not None:
            report(f"feature cache: encoding {images} images, {size / 2**20:.1f} MiB, into {cache.path}")
        bar.restart(f"encoding {images} images ({size / 2**20:.1f} MiB of features)", math.ceil(images / ranks.world))

    with CountProgress("checking the feature cache", None, quiet=quiet) as bar:
        keys = cache.fill(dataset.records, encode, batch_size=batch_size, progress=bar.advance, ranks=ranks, on_plan=plan)
    return CachedFeatureDataset(dataset, cache, keys)


def recipe_features(recipe: Recipe, quiet: bool = False) -> list[tuple[DatasetConfig, CachedFeatureDataset]]:
    """Fill the feature cache for the recipe's training and validation splits with its encoder (no LLM is
    loaded); each split with its cached view."""
    model = build_model(recipe, with_llm=False)
    splits = [split for split in (recipe.data.train, recipe.data.validation) if split is not None]
    return [(split, cached_features(model, open_dataset(split.name, split.split, split.options), quiet=quiet)) for split in splits]
