"""Recipes shipped with blipkit: each YAML file here is registered under its file name."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from blipkit import hookimpl

RECIPE_DIR = Path(__file__).parent


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# ") and not line.startswith("# Launch:"):
            return line[2:].strip()
    return ""


@hookimpl
def register_recipes(register) -> None:
    """Register every shipped YAML recipe."""
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        register(path.stem, partial(Path, path), description=_description(path), kind="builtin", available=True)
