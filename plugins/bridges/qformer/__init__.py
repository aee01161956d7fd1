"""The BLIP-2 Q-Former bridge: registers ``qformer`` (LAVIS-faithful, with the stage-1 heads).

The model lives in ``model``; stage-1 losses in ``objectives``, and the training objective that runs them
(``blip2-stage1``) in ``pretraining``; BERT init and tokenizers in ``init``; imports of transformers/LAVIS
checkpoints in ``weights``. BERT weights and tokenizers load when a Q-Former is built.
"""

from __future__ import annotations

import inspect
from typing import Any

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.hookspecs import Register

from .model import QFormer


def qformer(input_dim: int, output_dim: int | None = None, **options: Any) -> QFormer:
    """Build a Q-Former over ``input_dim``-wide encoder tokens, with ``QFormer``'s options (BLIP-2's defaults,
    and MiniLM weights unless ``init`` says otherwise). Its output width is ``hidden_size`` (or the init
    BERT's), so ``output_dim``, when given, must match it."""
    bridge = QFormer(input_dim=input_dim, **{"init": "minilm", **options})
    if output_dim is not None and output_dim != bridge.output_dim:
        raise ConfigError(
            f"bridge.output_dim: the Q-Former outputs {bridge.output_dim} (its hidden size), not {output_dim}; "
            "drop output_dim and let the projection map to the LLM"
        )
    return bridge


def _factory_signature() -> inspect.Signature:
    """``QFormer``'s constructor signature with ``output_dim`` added and MiniLM as the default ``init``, so that
    recipes' option names are checked against the model's own list."""
    own = list(inspect.signature(QFormer.__init__).parameters.values())[1:]
    output_dim = inspect.Parameter("output_dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation="int | None")
    params = [p.replace(default="minilm") if p.name == "init" else p for p in own]
    return inspect.Signature([params[0], output_dim, *params[1:]], return_annotation="QFormer")


qformer.__signature__ = _factory_signature()  # type: ignore[attr-defined]


def _from_pretrained(path: str) -> QFormer:
    """Load a Q-Former saved with ``save_pretrained``, or import one from a transformers BLIP-2 or InstructBLIP
    directory."""
    import json
    from pathlib import Path

    from .weights import from_transformers_blip2

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") in ("blip-2", "instructblip"):
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
