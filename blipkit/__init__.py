"""blipkit: turn any frozen image encoder and any frozen language model into a vision-language model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from blipkit.hookspecs import hookimpl  # noqa: E402

if TYPE_CHECKING:
    from blipkit.pipeline import VisionLanguageModel

__all__ = ["__version__", "hookimpl", "load"]


def load(path: str | Path, device: Any = None) -> VisionLanguageModel:
    """Load a trained blipkit model from its run directory."""
    from blipkit.pipeline import load_model

    return load_model(path, device=device)
