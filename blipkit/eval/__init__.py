"""Evaluation metrics: VQA v2 accuracy, COCO caption metrics, retrieval recall@K and shapes caption scoring.

Importing this package is cheap: pycocoevalcap is imported only when caption metrics are computed.
"""

from blipkit.eval.captions import caption_scores, tokenize_caption
from blipkit.eval.retrieval import rerank_topk, retrieval_recall
from blipkit.eval.shapes import shapes_caption_accuracy, shapes_caption_correct
from blipkit.eval.vqa import normalize_answer, vqa_accuracy, vqa_scores

__all__ = [
    "caption_scores",
    "normalize_answer",
    "rerank_topk",
    "retrieval_recall",
    "shapes_caption_accuracy",
    "shapes_caption_correct",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_scores",
]
