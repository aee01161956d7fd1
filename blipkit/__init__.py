"""blipkit: turn any frozen image encoder and any frozen language model into a vision-language model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit.hookspecs import hookimpl
from blipkit.version import __version__

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["__version__", "hookimpl", "load"]


def load(path: str | Path, device: Any = None) -> VisionLanguageModel:
    """Load a trained blipkit model from its run directory."""
    from blipkit.model.build import load_model

    return load_model(path, device=device)
