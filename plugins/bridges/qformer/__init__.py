"""The BLIP-2 Q-Former bridge: registers ``qformer`` (LAVIS-faithful, with the stage-1 heads).

The model lives in ``model``; stage-1 losses in ``objectives``, and the training objective that runs them
(``blip2-stage1``) in ``pretraining``; BERT init and tokenizers in ``init``;
imports of transformers/LAVIS checkpoints in ``weights``. Heavy modules load on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.hookspecs import Register

if TYPE_CHECKING:
    from .model import QFormer


def qformer(
    input_dim: int,
    output_dim: int | None = None,
    num_queries: int = 32,
    num_layers: int = 12,
    hidden_size: int = 768,
    num_heads: int = 12,
    intermediate_size: int = 3072,
    cross_attention_freq: int = 2,
    dropout: float = 0.1,
    init: str | None = "minilm",
    tokenizer: str | None = None,
    embed_dim: int = 256,
    max_position_embeddings: int = 512,
    layer_norm_eps: float = 1e-12,
    vision_norm_eps: float = 1e-5,
    objectives: Sequence[str] | None = None,
) -> QFormer:
    """Build a Q-Former over ``input_dim``-wide encoder tokens; its output width is ``hidden_size``
    (or the init BERT's), so ``output_dim``, when given, must match it. ``objectives`` picks the stage-1
    losses among itc, itm and itg (default: all three, as BLIP-2)."""
    from .model import QFormer

    bridge = QFormer(
        input_dim=input_dim,
        num_queries=num_queries,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        cross_attention_freq=cross_attention_freq,
        dropout=dropout,
        init=init,
        tokenizer=tokenizer,
        embed_dim=embed_dim,
        max_position_embeddings=max_position_embeddings,
        layer_norm_eps=layer_norm_eps,
        vision_norm_eps=vision_norm_eps,
        objectives=objectives,
    )
    if output_dim is not None and output_dim != bridge.output_dim:
        raise ConfigError(
            f"bridge.output_dim: the Q-Former outputs {bridge.output_dim} (its hidden size), not {output_dim}; "
            "drop output_dim and let the projection map to the LLM"
        )
    return bridge


def _from_pretrained(path: str) -> QFormer:
    """Load a Q-Former saved with ``save_pretrained``, or import one from a transformers BLIP-2 directory."""
    import json
    from pathlib import Path

    from .model import QFormer
    from .weights import from_transformers_blip2

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") == "blip-2":
        return from_transformers_blip2(path)
    return QFormer.from_pretrained(path)


qformer.from_pretrained = _from_pretrained


@hookimpl
def register_objectives(register: Register) -> None:
    """Register ``blip2-stage1``, the Q-Former's stage-1 objective."""
    from .pretraining import QFormerPretraining

    register(
        "blip2-stage1",
        QFormerPretraining,
        aliases=("qformer-stage1", "image-text"),
        description="BLIP-2 stage 1: the Q-Former alone on image-text pairs, ITC + ITM + ITG (bridge.options.objectives picks)",
        kind="objective",
    )


@hookimpl
def register_bridges(register: Register) -> None:
    """Register the ``qformer`` bridge."""
    register(
        "qformer",
        qformer,
        aliases=("q-former", "blip2-qformer"),
        description=(
            "BLIP-2 Q-Former: learned queries + cross-attention, ITC/ITM/ITG stage 1; "
            "init=minilm|bert-base-uncased|DIR|random"
        ),
        kind="bridge",
    )
