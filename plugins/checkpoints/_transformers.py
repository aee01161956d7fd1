"""What the BLIP-2 and InstructBLIP importers share: finding a transformers checkpoint (a local
``save_pretrained`` directory or a hub id in the local cache) and assembling its parts into a model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit.errors import ConfigError, ModelUnavailableError, one_line
from blipkit.io import load_safetensors_prefixed

if TYPE_CHECKING:
    from blipkit.config import Recipe
    from blipkit.model.vlm import VisionLanguageModel

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_PROJECTION_PREFIX = "language_projection."


def read_config(file: Path) -> dict[str, Any] | None:
    """A config.json's contents, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class CheckpointKind:
    """One transformers architecture that blipkit imports whole."""

    label: str
    """How messages name it ("BLIP-2")."""
    model_type: str
    """config.json's ``model_type``."""
    architecture: str
    """The class whose checkpoints hold a language model."""
    hub_names: re.Pattern[str]
    """Hub ids taken for this kind even before their config is cached."""
    example: str
    """A hub id for messages."""

    def locate(self, path: str) -> tuple[str, Path] | None:
        """(name for the recipe, local directory) of such a checkpoint, or None when ``path`` is not one.

        A local directory counts when its config.json says this model_type; a hub id when its cached
        config.json does, or, uncached, when it matches ``hub_names``.
        """
        local = Path(path).expanduser()
        if local.is_dir():
            config = read_config(local / "config.json")
            if config is None or config.get("model_type") != self.model_type:
                return None
            directory = local.resolve()
            return str(directory), directory
        if not _HUB_ID.match(path):
            return None
        from huggingface_hub import try_to_load_from_cache

        cached_file = try_to_load_from_cache(path, "config.json")
        cached = read_config(Path(cached_file)) if isinstance(cached_file, str) else None
        if cached is None and not self.hub_names.match(path):
            return None
        if cached is not None and cached.get("model_type") != self.model_type:
            return None
        return path, self._snapshot(path)

    def _snapshot(self, repo_id: str) -> Path:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except OSError as err:
            raise ModelUnavailableError(
                f"{self.label} model '{repo_id}' is not in the local Hugging Face cache and no model hub is "
                f"reachable ({type(err).__name__}): download it where one is (hf download {repo_id}) or pass a "
                f"local directory written by {self.architecture}.save_pretrained"
            ) from None

    def build(
        self, name: str, directory: Path, recipe: Callable[[str, dict[str, Any]], Recipe]
    ) -> VisionLanguageModel:
        """The model in eval mode, its parts built through the registries from the checkpoint ``directory``;
        ``recipe(name, bridge_config)`` names them."""
        from blipkit.model.build import load_bridge
        from blipkit.model.vlm import VisionLanguageModel
        from blipkit.plugin_manager import registries

        architectures = (read_config(directory / "config.json") or {}).get("architectures") or []
        if self.architecture not in architectures:
            raise ConfigError(
                f"{name} is a {'/'.join(architectures) or self.label} checkpoint without a language model; "
                f"blipkit.load takes {self.architecture} checkpoints such as {self.example}"
            )
        regs = registries()
        encoder = regs.encoders.create(f"hf:{name}")
        llm = regs.llms.create(f"hf:{name}")
        # The qformer plugin's loader imports transformers directories of both kinds (post_layernorm ->
        # ln_vision; InstructBLIP's word embeddings and qformer_tokenizer/ too).
        bridge = load_bridge("qformer", directory)
        projection = regs.bridges.create("linear", input_dim=bridge.output_dim, output_dim=llm.hidden_size)
        weights = load_safetensors_prefixed(directory, (_PROJECTION_PREFIX,), strip=_PROJECTION_PREFIX)
        try:
            projection.load_state_dict({f"proj.{k}": v for k, v in weights.items()}, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"{name}: its language_projection does not fit ({one_line(err)[:200]})") from None
        return VisionLanguageModel(encoder, bridge, projection, llm, recipe(name, bridge.config)).eval()
