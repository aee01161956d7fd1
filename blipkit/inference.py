"""Inference helpers beyond generation: text-to-image retrieval and cross-attention heatmaps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from blipkit.data.images import load_image
from blipkit.errors import BlipkitError, DataError

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["attention_heatmap", "retrieve_images"]


def retrieve_images(
    model: VisionLanguageModel,
    paths: Sequence[Path],
    text: str,
    top_k: int = 5,
    rerank_k: int = 128,
    batch_size: int = 32,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[tuple[Path, float]]:
    """The ``top_k`` images for ``text``: ITC similarity picks ``rerank_k`` candidates, ITM re-ranks them.

    Final scores are ITM logit + ITC similarity, as BLIP-2 (LAVIS) ranks; a Q-Former trained without ITM
    ranks by ITC similarity alone. Unreadable images are skipped.
    """
    kept: list[Path] = []
    tokens: list[torch.Tensor] = []
    for start in range(0, len(paths), batch_size):
        images, names = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path))
                names.append(path)
            except DataError as err:
                if on_skip is not None:
                    on_skip(path, str(err))
        if images:
            tokens.append(model.image_tokens(model.pixel_values(images)).float().cpu())
            kept += names
    if not kept:
        raise BlipkitError("none of the images could be read; nothing to search")
    all_tokens = torch.cat(tokens)
    bridge = model.retrieval_bridge()
    with torch.no_grad():
        image_embeds = torch.cat([bridge.image_embeds(chunk.to(model.device)) for chunk in all_tokens.split(batch_size)])
        similarity = model.similarity(image_embeds, model.embed_texts([text]))[:, 0].cpu()
        if not bridge.has_itm:
            ranked = similarity.argsort(descending=True)[:top_k]
            return [(kept[int(i)], float(similarity[i])) for i in ranked]
        candidates = similarity.topk(min(rerank_k, len(kept))).indices
        itm = torch.cat([
            model.itm_score_tokens(all_tokens[chunk].to(model.device), [text] * len(chunk)).cpu()
            for chunk in candidates.split(batch_size)
        ])
    scores = itm + similarity[candidates]
    order = scores.argsort(descending=True)[:top_k]
    return [(kept[int(candidates[i])], float(scores[i])) for i in order]


def attention_heatmap(
    model: VisionLanguageModel, image: Image.Image, per_query: bool = False, columns: int = 8
) -> Image.Image:
    """The Q-Former's cross-attention over ``image`` drawn as heatmaps over it: averaged, or one per query."""
    import numpy as np
    from matplotlib import colormaps

    encoder = model.encoder
    if encoder is None or encoder.patch_grid is None:
        raise BlipkitError("this model's encoder does not say how its tokens map onto the image (no patch grid)")
    attention = model.cross_attention([image])[0].cpu()
    rows, cols = encoder.patch_grid
    patches = attention[:, encoder.num_prefix_tokens : encoder.num_prefix_tokens + rows * cols]
    maps = patches.reshape(-1, rows, cols) if per_query else patches.mean(dim=0, keepdim=True).reshape(1, rows, cols)
    side = encoder.image_size
    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    colormap = colormaps["inferno"]
    tiles = []
    for heat in maps:
        heat = heat - heat.min()
        heat = heat / heat.max() if float(heat.max()) > 0 else heat
        up = torch.nn.functional.interpolate(heat[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        colored = Image.fromarray((colormap(up.numpy())[..., :3] * 255).astype(np.uint8))
        tiles.append(Image.blend(base, colored, alpha=0.55))
    if len(tiles) == 1:
        return tiles[0]
    columns = min(columns, len(tiles))
    grid = Image.new("RGB", (columns * side, -(-len(tiles) // columns) * side), "white")
    for number, tile in enumerate(tiles):
        grid.paste(tile, ((number % columns) * side, (number // columns) * side))
    return grid
