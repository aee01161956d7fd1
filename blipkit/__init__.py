"""blipkit: turn any frozen image encoder and any frozen language model into a vision-language model."""

from __future__ import annotations

__version__ = "0.1.0"

from blipkit.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl"]
