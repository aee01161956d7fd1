"""pluggy hook specifications: what a blipkit plugin may implement.

Every ``register_*`` hook receives a ``register`` callback::

    register(name, factory, aliases=(), description="", kind="", available=None, matches=None)

See docs/plugins.md for each hook's factory signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("blipkit")
hookimpl = pluggy.HookimplMarker("blipkit")

Register = Callable[..., None]


@hookspec
def register_encoders(register: Register) -> None:
    """Register image encoders: ``factory(**kwargs) -> blipkit.interfaces.Encoder``."""


@hookspec
def register_bridges(register: Register) -> None:
    """Register bridges/projections: ``factory(input_dim, output_dim=None, **kwargs) -> Bridge``."""


@hookspec
def register_language_models(register: Register) -> None:
    """Register language models: ``factory(**kwargs) -> blipkit.interfaces.LanguageModel``."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset formats: ``factory(path_or_name, **kwargs) -> dataset``."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register training objectives a recipe's stage can name: ``factory(**options) -> Objective``."""


@hookspec
def register_exporters(register: Register) -> None:
    """Register export formats for ``blipkit export --to NAME``: ``factory() -> blipkit.interfaces.Exporter``."""


@hookspec
def register_recipes(register: Register) -> None:
    """Register YAML recipes: ``register(name, path_to_yaml, description=...)``."""


@hookspec(firstresult=True)
def load_model(path: str) -> Any:
    """Load a checkpoint that is not a blipkit run directory (e.g. a transformers BLIP-2 model) as a
    ``blipkit.model.vlm.VisionLanguageModel``; return None when ``path`` is not yours."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``blipkit`` command group ``cli``."""
