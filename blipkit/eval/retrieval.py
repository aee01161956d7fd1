"""Image-text retrieval: recall@K in both directions, and ITM re-ranking of the ITC top-k (BLIP-2 style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from blipkit.errors import DataError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["rerank_topk", "retrieval_recall"]


def _check_matrix(name: str, matrix: Tensor, rows: int, cols: int) -> None:
    if matrix.dim() != 2 or tuple(matrix.shape) != (rows, cols):
        raise DataError(f"retrieval_recall: {name} must have shape [{rows}, {cols}], not {list(matrix.shape)}")


def _ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """Per row, how many non-positive candidates score at least as high as the row's best positive.

    Ties count against the query, so a constant score matrix retrieves nothing rather than everything.
    """
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positives).sum(dim=1)


def retrieval_recall(
    similarity: Tensor,
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    similarity_t2i: Tensor | None = None,
) -> dict[str, float]:
    """Recall@K for image-to-text and text-to-image retrieval, as fractions in [0, 1].

    ``similarity`` is [n_images, n_texts]; ``text_to_image[j]`` is the index of the image that text j
    describes. An image is retrieved at K when any of its texts ranks in its top K; a text when its image
    ranks in its top K. ``similarity_t2i`` ([n_texts, n_images]) scores the text-to-image direction when it
    differs from ``similarity.T``, as after re-ranking each direction separately with :func:`rerank_topk`.
    Returns ``i2t_r{K}`` and ``t2i_r{K}`` for each K, their means ``i2t_mean`` / ``t2i_mean`` and ``mean``.
    """
    if similarity.dim() != 2:
        raise DataError(f"retrieval_recall: similarity must be [n_images, n_texts], not {list(similarity.shape)}")
    import torch

    n_images, n_texts = similarity.shape
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=similarity.device).flatten()
    if owner.numel() != n_texts:
        raise DataError(
            f"retrieval_recall: {n_texts} texts in the similarity matrix but {owner.numel()} text_to_image entries"
        )
    if n_texts and (owner.min() < 0 or owner.max() >= n_images):
        raise DataError(f"retrieval_recall: text_to_image holds image indices outside 0..{n_images - 1}")
    if not ks or min(ks) < 1:
        raise DataError(f"retrieval_recall: ks must be positive integers, not {tuple(ks)}")
    t2i = similarity.T if similarity_t2i is None else similarity_t2i
    _check_matrix("similarity_t2i", t2i, n_texts, n_images)
    # positives[i, j]: text j describes image i.
    positives = owner.unsqueeze(0) == torch.arange(n_images, device=owner.device).unsqueeze(1)
    described = positives.any(dim=1)
    if not described.all():
        missing = int((~described).sum())
        raise DataError(f"retrieval_recall: {missing} images have no text; every image needs at least one")
    i2t_ranks = _ranks(similarity.float(), positives)
    t2i_ranks = _ranks(t2i.float(), positives.T)
    result: dict[str, float] = {}
    for k in ks:
        result[f"i2t_r{k}"] = float((i2t_ranks < k).float().mean())
    for k in ks:
        result[f"t2i_r{k}"] = float((t2i_ranks < k).float().mean())
    result["i2t_mean"] = sum(result[f"i2t_r{k}"] for k in ks) / len(ks)
    result["t2i_mean"] = sum(result[f"t2i_r{k}"] for k in ks) / len(ks)
    result["mean"] = (result["i2t_mean"] + result["t2i_mean"]) / 2
    return result


def rerank_topk(
    similarity: Tensor,
    score_fn: Callable[[int, Tensor], Tensor],
    k: int = 128,
    add_similarity: bool = True,
) -> Tensor:
    """Re-score each row's top-k candidates with ``score_fn``; every other entry becomes -inf.

    ``similarity`` is [n_queries, n_candidates] (an ITC matrix, or its transpose for the other direction).
    ``score_fn(row, candidate_indices)`` returns one score per candidate (typically the ITM match
    probability). As LAVIS's BLIP-2 retrieval evaluation does, the new score is the ITM score plus the ITC
    similarity (``add_similarity=False`` keeps the ITM score alone). k is capped at the number of candidates.
    """
    if similarity.dim() != 2:
        raise DataError(f"rerank_topk: similarity must be [n_queries, n_candidates], not {list(similarity.shape)}")
    if k < 1:
        raise DataError(f"rerank_topk: k must be at least 1, not {k}")
    import torch

    k = min(k, similarity.shape[1])
    reranked = torch.full(similarity.shape, float("-inf"), dtype=torch.float32, device=similarity.device)
    top_scores, top_indices = similarity.float().topk(k, dim=1)
    for row in range(similarity.shape[0]):
        scores = torch.as_tensor(score_fn(row, top_indices[row]), device=similarity.device).detach().float().flatten()
        if scores.numel() != k:
            raise DataError(f"rerank_topk: score_fn returned {scores.numel()} scores for {k} candidates of row {row}")
        reranked[row, top_indices[row]] = scores + top_scores[row] if add_similarity else scores
    return reranked
