"""Evaluation metrics: VQA v2 accuracy, COCO caption metrics and retrieval recall@K.

Importing this package is cheap: pycocoevalcap is imported only when caption metrics are computed.
"""

from blipkit.eval.captions import caption_scores, tokenize_caption
from blipkit.eval.retrieval import rerank_topk, retrieval_recall
from blipkit.eval.vqa import normalize_answer, vqa_accuracy, vqa_scores

__all__ = [
    "caption_scores",
    "normalize_answer",
    "rerank_topk",
    "retrieval_recall",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_scores",
]
