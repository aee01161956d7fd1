"""Parameter-name mapping from BERT / LAVIS / transformers-Blip2 checkpoints to the Q-Former's own names.

Every source is first put in BERT's relative naming (``embeddings.*``, ``encoder.layer.N.*``,
``cls.predictions.*``, which LAVIS's Q-Former extends with ``crossattention`` and ``*_query``),
then mapped with one table. docs/qformer.md lists the full mapping.
"""

from __future__ import annotations

import re

import torch

State = dict[str, torch.Tensor]

_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.norm.bias",
    "cls.predictions.bias": "lm_head.bias",
}

# Inside encoder.layer.N: BERT/LAVIS module path -> Q-Former module path.
_LAYER = {
    "attention.self.query": "self_attn.query",
    "attention.self.key": "self_attn.key",
    "attention.self.value": "self_attn.value",
    "attention.output.dense": "self_attn.dense",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.query",
    "crossattention.self.key": "cross_attn.key",
    "crossattention.self.value": "cross_attn.value",
    "crossattention.output.dense": "cross_attn.dense",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate.dense": "ffn.up",
    "output.dense": "ffn.down",
    "output.LayerNorm": "ffn.norm",
    "intermediate_query.dense": "ffn_query.up",
    "output_query.dense": "ffn_query.down",
    "output_query.LayerNorm": "ffn_query.norm",
}

# Top-level LAVIS Blip2Qformer parameters that keep their meaning.
_LAVIS_TOP = ("query_tokens", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp")

_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
_OLD_NORM = {"gamma": "weight", "beta": "bias"}


def _canonical(name: str) -> str:
    """Old TF-converted BERT checkpoints call LayerNorm parameters gamma/beta."""
    head, _, last = name.rpartition(".")
    return f"{head}.{_OLD_NORM.get(last, last)}" if "LayerNorm" in head else name


def map_bert(state: State) -> tuple[State, list[str]]:
    """Map BERT-relative names to Q-Former names; returns (mapped, names left unmapped)."""
    mapped: State = {}
    unused: list[str] = []
    for raw, tensor in state.items():
        name = _canonical(raw)
        if name in _EMBEDDINGS:
            mapped[_EMBEDDINGS[name]] = tensor
            continue
        match = _LAYER_RE.match(name)
        if match and match.group(2) in _LAYER:
            index, module, kind = match.groups()
            mapped[f"layers.{index}.{_LAYER[module]}.{_OLD_NORM.get(kind, kind)}"] = tensor
            continue
        unused.append(raw)
    return mapped, unused


def strip_bert_prefix(state: State) -> State:
    """Drop the ``bert.`` prefix of BertFor* checkpoints (plain BertModel checkpoints have none)."""
    return {(k[len("bert.") :] if k.startswith("bert.") else k): v for k, v in state.items()}


def map_lavis(state: State) -> tuple[State, list[str]]:
    """Map a LAVIS Blip2Qformer/Blip2OPT/Blip2T5 state dict; returns (mapped, names left unmapped)."""
    bert: State = {}
    mapped: State = {}
    unused: list[str] = []
    for name, tensor in state.items():
        if name.startswith("Qformer.bert."):
            bert[name[len("Qformer.bert.") :]] = tensor
        elif name.startswith("Qformer.cls."):
            bert[name[len("Qformer.") :]] = tensor
        elif name.startswith(_LAVIS_TOP):
            mapped[name] = tensor
        else:
            unused.append(name)
    from_bert, rest = map_bert(bert)
    mapped.update(from_bert)
    unused += [f"Qformer.{'' if r.startswith('cls.') else 'bert.'}{r}" for r in rest]
    return mapped, unused


_HF_TOP = {
    "query_tokens": "query_tokens",
    "vision_model.post_layernorm.weight": "ln_vision.weight",
    "vision_model.post_layernorm.bias": "ln_vision.bias",
    "vision_projection.weight": "vision_proj.weight",
    "vision_projection.bias": "vision_proj.bias",
    "text_projection.weight": "text_proj.weight",
    "text_projection.bias": "text_proj.bias",
    "itm_head.weight": "itm_head.weight",
    "itm_head.bias": "itm_head.bias",
}


def map_transformers(state: State) -> tuple[State, list[str]]:
    """Map a transformers Blip2* state dict (Blip2Model, Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval, ...) or InstructBlipForConditionalGeneration's; returns (mapped, names left
    unmapped)."""
    bert: State = {}
    mapped: State = {}
    unused: list[str] = []
    for name, tensor in state.items():
        if name in _HF_TOP:
            mapped[_HF_TOP[name]] = tensor
        elif name.startswith("qformer.layernorm."):
            bert["embeddings.LayerNorm." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith("qformer.encoder."):
            rest = name[len("qformer.") :]
            rest = rest.replace(".attention.attention.", ".attention.self.")
            rest = rest.replace(".crossattention.attention.", ".crossattention.self.")
            bert[rest] = tensor
        elif name.startswith("qformer.embeddings.") and "position_ids" not in name:
            # InstructBLIP's Q-Former embeds its instruction itself (BLIP-2's has no word embeddings).
            bert[name[len("qformer.") :].replace(".layernorm.", ".LayerNorm.")] = tensor
        elif name.startswith("embeddings.") and "position_ids" not in name:
            bert[name] = tensor
        else:
            unused.append(name)
    from_bert, rest = map_bert(bert)
    mapped.update(from_bert)
    unused += rest
    return mapped, unused


_TO_HF_TOP = {
    "query_tokens": "query_tokens",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "embeddings.norm.weight": "qformer.layernorm.weight",
    "embeddings.norm.bias": "qformer.layernorm.bias",
}
# Query-branch modules only: Blip2ForConditionalGeneration's Q-Former has no text FFN.
_TO_HF_LAYER = {
    ours: theirs.replace("attention.self.", "attention.attention.")
    for theirs, ours in _LAYER.items()
    if not ours.startswith("ffn.")
}
_OUR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_transformers_generation(state: State) -> State:
    """Q-Former names -> Blip2ForConditionalGeneration's, the inverse of ``map_transformers`` for what that
    model holds: queries, ln_vision (the vision tower's post_layernorm) and the query branch. The text
    branch (word embeddings, text FFNs, LM head) and the stage-1 heads have no place there and are left out."""
    mapped: State = {}
    for name, tensor in state.items():
        if name in _TO_HF_TOP:
            mapped[_TO_HF_TOP[name]] = tensor
            continue
        match = _OUR_LAYER_RE.match(name)
        if match and match.group(2) in _TO_HF_LAYER:
            index, module, kind = match.groups()
            mapped[f"qformer.encoder.layer.{index}.{_TO_HF_LAYER[module]}.{kind}"] = tensor
    return mapped
