"""Export to transformers: ``blipkit export RUN --to transformers DIR`` writes a Blip2ForConditionalGeneration
directory (config.json, generation_config.json, safetensors weights, Blip2Processor files) that
``Blip2ForConditionalGeneration.from_pretrained`` and ``Blip2Processor.from_pretrained`` load, and vLLM's
Blip2 loader serves.

It holds the models whose parts transformers' Blip2 has: a BLIP-2 vision tower (``hf:<blip2 checkpoint>``,
read back from that checkpoint, cut where the encoder cuts it), a Q-Former that offers the
"transformers-blip2" layout (``Bridge.export_state``; its ln_vision becomes the tower's post_layernorm),
a ``linear`` projection (``language_projection``), and a transformers language model that
AutoModelForCausalLM / AutoModelForSeq2SeqLM rebuild from its config. LoRA adapters are merged.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.hookspecs import Register
from blipkit.interfaces import Exporter
from blipkit.io import load_safetensors_prefixed, read_json

from .blip2 import BLIP2

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["Blip2Exporter"]

IMAGE_TOKEN = "<image>"
_LAYOUT = "transformers-blip2"
_VISION = "vision_model."
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _registries() -> Any:
    from blipkit.plugin_manager import registries

    return registries()


def _vision_source(model: VisionLanguageModel) -> tuple[Path, dict[str, Any], int] | str:
    """(BLIP-2 checkpoint directory, its vision config cut to the encoder's blocks, block count), or why not."""
    name = model.recipe.encoder.name
    resolved = _registries().encoders.resolve(name)
    located = BLIP2.locate(resolved.argument) if resolved.entry.name == "hf:" and resolved.argument else None
    if located is None:
        return (
            f"its encoder '{name}' is not a BLIP-2 vision tower; Blip2ForConditionalGeneration holds one "
            "(train over --encoder hf:<a BLIP-2 checkpoint> to export to transformers)"
        )
    directory = located[1]
    vision = dict(read_json(directory / "config.json").get("vision_config") or {})
    depth = int(vision.get("num_hidden_layers", 39))
    layer = model.recipe.encoder.options.get("layer")
    blocks = depth if layer is None else (layer + 1 if layer >= 0 else depth + layer + 1)
    return directory, {**vision, "num_hidden_layers": blocks}, blocks


def _language_model(model: VisionLanguageModel) -> Any | str:
    """The transformers model inside the LLM wrapper (LoRA wrapper removed), or why there is none."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

    name = model.recipe.llm.name
    inner = getattr(model.llm, "model", None)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not isinstance(base, PreTrainedModel) or getattr(model.llm, "tokenizer", None) is None:
        return f"its language model '{name}' is not a transformers model with a tokenizer"
    auto = AutoModelForSeq2SeqLM if base.config.is_encoder_decoder else AutoModelForCausalLM
    try:
        rebuilt = auto._model_mapping[type(base.config)]
    except (KeyError, ValueError):
        rebuilt = None
    if rebuilt is not type(base):
        return (
            f"its language model '{name}' is a {type(base).__name__}, which transformers' Blip2 would not rebuild "
            f"from its config ({auto.__name__})"
        )
    tokenizer = model.llm.tokenizer
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if not base.config.is_encoder_decoder and full[len(full) - len(plain) :] != plain:
        return "its language model's tokenizer appends tokens to a prompt, which Blip2Processor would keep and blipkit drops"
    return base


def _inference_stage_reason(model: VisionLanguageModel) -> str | None:
    """Why the prefix at inference is not BLIP-2's (the image alone through the bridge), or None."""
    objectives = _registries().objectives
    for stage in reversed(model.recipe.stages):
        resolved = objectives.resolve(stage.objective)
        if resolved.create(**stage.options).uses_language_model:
            if resolved.entry.name != "lm":
                return (
                    f"its stage '{stage.name}' trains objective '{stage.objective}', whose visual prefix is not "
                    "BLIP-2's image-only one"
                )
            return None
    return None


def _bridge_fields(model: VisionLanguageModel, vision: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str:
    exported = model.bridge.export_state(_LAYOUT)
    if exported is None:
        return f"its bridge '{model.recipe.bridge.name}' has no Blip2 Q-Former form"
    state, fields = exported
    eps = float(vision.get("layer_norm_eps", 1e-6))
    if abs(fields["vision_layer_norm_eps"] - eps) > 1e-12:
        return (
            f"its Q-Former's ln_vision eps {fields['vision_layer_norm_eps']:g} differs from the vision tower's "
            f"layer_norm_eps {eps:g}, and transformers' Blip2 has one eps for both (train with "
            f"bridge.options.vision_norm_eps={eps:g})"
        )
    return state, fields


def _projection_state(model: VisionLanguageModel) -> dict[str, torch.Tensor] | str:
    name = model.recipe.projection.name
    state = model.projection.state_dict() if model.projection is not None else {}
    if _registries().bridges.resolve(name).entry.name != "linear" or set(state) != {"proj.weight", "proj.bias"}:
        return f"its projection '{name}' is not one Linear layer, as Blip2's language_projection is"
    return {"language_projection." + key[len("proj.") :]: value for key, value in state.items()}


def _image_processor(directory: Path, image_size: int) -> Any:
    """The BLIP-2 checkpoint's own image processor settings, else BlipImageProcessor's defaults at its size."""
    from transformers import BlipImageProcessor

    for name in _PROCESSOR_FILES:
        if (directory / name).is_file():
            saved = read_json(directory / name)
            saved = saved.get("image_processor", saved) if isinstance(saved, dict) else None
            if isinstance(saved, dict):
                return BlipImageProcessor.from_dict(saved)
    return BlipImageProcessor(size={"height": image_size, "width": image_size})


def _grow_vocabulary(llm_state: dict[str, torch.Tensor], base: Any, rows: int) -> None:
    """Give the embedding and output matrices zero rows up to ``rows`` (in place in ``llm_state``): the
    ``<image>`` row's input embedding is always replaced by a query output, and its logit stays 0."""
    shared = {base.get_input_embeddings().weight.data_ptr()}
    output = base.get_output_embeddings()
    if output is not None:
        shared.add(output.weight.data_ptr())
    grown: dict[int, torch.Tensor] = {}
    for key, tensor in llm_state.items():
        if tensor.data_ptr() in shared and tensor.dim() == 2 and tensor.shape[0] < rows:
            if tensor.data_ptr() not in grown:
                grown[tensor.data_ptr()] = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])])
            llm_state[key] = grown[tensor.data_ptr()]


class Blip2Exporter(Exporter):
    """Blip2ForConditionalGeneration + Blip2Processor, for transformers and vLLM."""

    library_name = "transformers"

    def unsupported(self, model: VisionLanguageModel) -> str | None:
        """Why ``model`` has no Blip2ForConditionalGeneration form (the first part that does not fit), or None."""
        if model.llm is None or model.projection is None:
            return "it has no language model (stage 1 only)"
        vision = _vision_source(model)
        if isinstance(vision, str):
            return vision
        for reason in (
            _bridge_fields(model, vision[1]),
            _projection_state(model),
            _language_model(model),
            _inference_stage_reason(model),
        ):
            if isinstance(reason, str):
                return reason
        return None

    def write(self, model: VisionLanguageModel, directory: Path, dtype: torch.dtype | None = None) -> None:
        """Write config, generation config, weights and processor; LoRA adapters are merged into ``model``."""
        from transformers import Blip2Config, Blip2Processor

        from blipkit.model.lora import has_lora, merge_bridge_lora, merge_llm_lora

        reason = self.unsupported(model)
        if reason is not None:
            raise ConfigError(f"cannot export to transformers' Blip2: {reason}")
        if has_lora(model.bridge):
            merge_bridge_lora(model.bridge)
        if has_lora(model.llm.model):
            merge_llm_lora(model.llm)
        source, vision, blocks = _vision_source(model)
        bridge_state, fields = _bridge_fields(model, vision)
        base = _language_model(model)

        tokenizer = copy.deepcopy(model.llm.tokenizer)
        image_processor = _image_processor(source, int(vision.get("image_size", 224)))
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=fields["num_query_tokens"])
        image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        llm_state = dict(base.state_dict())
        text_config = base.config.to_dict()
        rows = base.get_input_embeddings().weight.shape[0]
        if image_token >= rows:
            _grow_vocabulary(llm_state, base, image_token + 1)
            text_config["vocab_size"] = image_token + 1

        state = {k: v for k, v in load_safetensors_prefixed(source, (_VISION,)).items() if _keeps(k, blocks)}
        state.update(bridge_state)
        state.update(_projection_state(model))
        state.update({"language_model." + key: value for key, value in llm_state.items()})
        if dtype is not None:
            state = _cast(state, dtype)

        config = Blip2Config(
            vision_config=vision, qformer_config=fields["qformer_config"], text_config=text_config,
            num_query_tokens=fields["num_query_tokens"], image_text_hidden_size=fields["image_text_hidden_size"],
            image_token_index=image_token,
        )
        config.architectures = ["Blip2ForConditionalGeneration"]
        config.dtype = dtype or next(iter(llm_state.values())).dtype
        config.to_json_file(str(directory / "config.json"))
        _generation_config(model, base).save_pretrained(str(directory))
        _save_weights(state, directory)
        processor.save_pretrained(str(directory))

    def usage(self, location: str) -> str:
        """How to caption with transformers (and serve with vLLM) from ``location``."""
        return f"""```python
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

processor = Blip2Processor.from_pretrained("{location}")
model = Blip2ForConditionalGeneration.from_pretrained("{location}")
inputs = processor(images=Image.open("photo.jpg"), text="", return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=30)
print(processor.batch_decode(ids, skip_special_tokens=True))
```

blipkit reads it too: `blipkit.load("{location}")`."""


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype``; tensors that shared storage still share it."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            if tensor.data_ptr() not in cast:
                cast[tensor.data_ptr()] = tensor.to(dtype)
            tensor = cast[tensor.data_ptr()]
        out[key] = tensor
    return out


def _keeps(key: str, blocks: int) -> bool:
    """Whether a vision tensor belongs to the exported tower: not post_layernorm (the Q-Former's ln_vision
    takes its place) and not a block past the encoder's cut."""
    if key.startswith(_VISION + "post_layernorm."):
        return False
    prefix = _VISION + "encoder.layers."
    return not key.startswith(prefix) or int(key[len(prefix) :].split(".", 1)[0]) < blocks


def _generation_config(model: VisionLanguageModel, base: Any) -> Any:
    """The special tokens blipkit generates with (its EOS first, then any other the model stops at)."""
    from transformers import GenerationConfig

    stops = [model.llm.tokenizer.eos_token_id]
    extra = getattr(base.generation_config, "eos_token_id", None)
    stops += [i for i in (extra if isinstance(extra, list) else [extra]) if i is not None and i not in stops]
    settings: dict[str, Any] = {
        "bos_token_id": getattr(base.config, "bos_token_id", None), "eos_token_id": stops if len(stops) > 1 else stops[0],
        "pad_token_id": model.llm.tokenizer.pad_token_id,
    }
    if base.config.is_encoder_decoder:
        start = base.generation_config.decoder_start_token_id
        settings["decoder_start_token_id"] = start if start is not None else base.config.decoder_start_token_id
    return GenerationConfig(**settings)


def _save_weights(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Safetensors shards (one file up to 5 GB) with an index when there are several. Tensors that share
    storage (tied embeddings) are written once, under their first name (the input embedding, as transformers
    writes them: vLLM reads that name for a tied output layer)."""
    from huggingface_hub import save_torch_state_dict

    first: dict[int, str] = {}
    repeated = [key for key, tensor in state.items() if first.setdefault(tensor.data_ptr(), key) != key]
    save_torch_state_dict(
        state, str(directory), max_shard_size="5GB", metadata={"format": "pt"}, shared_tensors_to_discard=repeated
    )


@hookimpl
def register_exporters(register: Register) -> None:
    """Register ``transformers``: Blip2ForConditionalGeneration directories."""
    register(
        "transformers",
        Blip2Exporter,
        aliases=("hf", "blip2"),
        description="a Blip2ForConditionalGeneration + Blip2Processor directory (transformers, vLLM)",
        kind="exporter",
    )
