"""The model card (README.md) of an exported model: its parts, recipe, data, the run's metrics, how to use
it, and what is known of its parts' licenses; everything read from the model and the run's own files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit.errors import BlipkitError
from blipkit.io import read_json

if TYPE_CHECKING:
    from blipkit.config import Recipe
    from blipkit.interfaces import Exporter
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["model_card", "run_metrics"]

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LICENSE = re.compile(r"^license:\s*(\S+)\s*$", re.MULTILINE)
_NOT_METRICS = {"stage", "step", "split", "lr", "samples_per_s", "skipped_steps"}


def _registries() -> Any:
    from blipkit.plugin_manager import registries

    return registries()


def _count(module: Any) -> str:
    total = sum(p.numel() for p in module.parameters()) if module is not None else 0
    return f"{total / 1e6:.2f}M" if total >= 1e5 else f"{total:,}"


def _describe(registry: str, name: str) -> str:
    try:
        return _registries().by_name(registry).resolve(name).entry.description
    except BlipkitError:
        return ""


def _parts(model: VisionLanguageModel) -> str:
    recipe = model.recipe
    encoder, bridge, llm = model.encoder, model.bridge, model.llm
    seen = f"{encoder.token_layout}, width {encoder.feature_dim}, {encoder.image_size} px" if encoder is not None else ""
    rows = [
        ("encoder (frozen)", recipe.encoder.name, seen, _count(encoder)),
        ("bridge (trained)", recipe.bridge.name, f"{type(bridge).__name__}, {bridge.num_queries} queries of width {bridge.output_dim}", _count(bridge)),
    ]
    if model.projection is not None and llm is not None:
        kind = "encoder-decoder" if llm.is_encoder_decoder else "decoder-only"
        lora = ", with trained LoRA adapters" if recipe.llm.lora else ""
        projection = f"{type(model.projection).__name__}, {bridge.output_dim} -> {llm.hidden_size}"
        rows.append(("projection (trained)", recipe.projection.name, projection, _count(model.projection)))
        rows.append(("language model (frozen)", recipe.llm.name, f"{kind}, width {llm.hidden_size}{lora}", _count(llm)))
    table = ["| part | name | what it is | parameters |", "|---|---|---|---|"]
    table += [f"| {slot} | `{name}` | {what} | {count} |" for slot, name, what, count in rows]
    return "\n".join(table)


def _recipe(recipe: Recipe, question: str) -> str:
    lines = [f"Recipe `{recipe.name}`" + (f": {recipe.description}" if recipe.description else "") + f" (seed {recipe.seed})."]
    if recipe.stages:
        lines += ["", "| stage | objective | steps | lr | tasks |", "|---|---|---|---|---|"]
        lines += [
            f"| {s.name} | `{s.objective}` | {s.steps} | {s.lr:g} | {', '.join(s.tasks)} |" for s in recipe.stages
        ]
    gen = recipe.generation
    lines += [
        "",
        f"Captions are generated with beam {gen.num_beams}, at most {gen.max_new_tokens} new tokens (at least "
        f"{gen.min_new_tokens}), repetition penalty {gen.repetition_penalty:g}; questions are asked as `{question}`.",
    ]
    return "\n".join(lines)


def _dataset(config: Any) -> str:
    options = ", ".join(f"{k}={v}" for k, v in config.options.items())
    return f"`{config.name}` (split {config.split}{', ' + options if options else ''})"


def _data(recipe: Recipe) -> str:
    data = recipe.data
    lines = [f"- training: {_dataset(data.train)}, global batch {data.batch_size}"]
    if data.validation is not None:
        lines.append(f"- validation: {_dataset(data.validation)}")
    return "\n".join(lines)


def run_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """A run's recorded numbers: the last training row of each stage and the validation rows from
    metrics.jsonl, and the scores of each ``eval-*/<task>_scores.json`` (by file, relative to the run)."""
    last: dict[str, dict[str, Any]] = {}
    validation: list[dict[str, Any]] = []
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "stage" not in row:
            continue
        if "split" in row:
            validation.append(row)
        else:
            last[str(row["stage"])] = row
    scores: dict[str, dict[str, Any]] = {}
    for file in sorted(run_dir.glob("eval-*/*_scores.json")):
        try:
            value = read_json(file)
        except BlipkitError:
            continue
        if isinstance(value, dict):
            scores[str(file.relative_to(run_dir))] = value
    return list(last.values()), validation, scores


def _numbers(row: dict[str, Any]) -> str:
    values = [(k, v) for k, v in row.items() if k not in _NOT_METRICS and isinstance(v, (int, float))]
    return ", ".join(f"{k} {v:.4g}" for k, v in values)


def _metrics(run_dir: Path) -> str:
    training, validation, scores = run_metrics(run_dir)
    if not (training or validation or scores):
        return "No metrics were recorded with this model (it was not trained by `blipkit train`, or its files are gone)."
    lines = []
    lines += [f"- {row['stage']}, last logged step {row.get('step', '?')}: {_numbers(row)}" for row in training]
    lines += [f"- {row['stage']} validation on {row['split']}: {_numbers(row)}" for row in validation]
    lines += [f"- `{name}`: {_numbers(value)}" for name, value in scores.items()]
    return "\n".join(lines)


def _blipkit_usage(location: str, hub: bool) -> str:
    fetch = f"hf download {location} --local-dir {location.rsplit('/', 1)[-1]}\n" if hub else ""
    path = location.rsplit("/", 1)[-1] if hub else location
    return f"""```bash
{fetch}blipkit caption photo.jpg --model {path}
blipkit ask photo.jpg "what colour is the square?" --model {path}
```

```python
import blipkit

model = blipkit.load("{path}")
print(model.caption(["photo.jpg"]))
print(model.ask(["photo.jpg"], ["what colour is the square?"]))
```"""


def _cached_license(name: str) -> str | None:
    """The license in a hub model's cached model card, when ``name`` (or its ``prefix:`` argument) is one."""
    from huggingface_hub import try_to_load_from_cache

    repo = name.split(":", 1)[1] if ":" in name else name
    if not _HUB_ID.match(repo) or Path(repo).exists():
        return None
    cached = try_to_load_from_cache(repo, "README.md")
    if not isinstance(cached, str):
        return None
    match = _LICENSE.search(Path(cached).read_text(errors="replace").split("\n---", 1)[0])
    return match.group(1) if match else None


def _licenses(model: VisionLanguageModel) -> tuple[str, str | None]:
    """The licenses section, and the one license every frozen part shares when all are known."""
    lines = []
    known: list[str | None] = []
    parts = [("encoder", "encoders", model.recipe.encoder.name)]
    if model.llm is not None:
        parts.append(("language model", "llms", model.recipe.llm.name))
    for slot, registry, name in parts:
        license_name = _cached_license(name)
        known.append(license_name)
        if license_name:
            lines.append(f"- {slot} `{name}`: {license_name} (from its model card)")
        else:
            description = _describe(registry, name)
            lines.append(f"- {slot} `{name}`: not recorded here; see its source's terms" + (f" ({description})" if description else ""))
    lines.append(
        "- bridge and projection: trained in this run; the weights are yours to license (add a `license:` line "
        "above), within the terms of the data and the frozen parts."
    )
    shared = known[0] if len(set(known)) == 1 else None
    return "\n".join(lines), shared


def model_card(
    model: VisionLanguageModel, run_dir: Path, fmt: str, exporter: Exporter | None, location: str, hub: bool = False
) -> str:
    """README.md for the export of ``model`` (from ``run_dir``) in format ``fmt`` at ``location``: a directory,
    or with ``hub`` the Hub repository it is pushed to."""
    recipe = model.recipe
    licenses, shared_license = _licenses(model)
    library = exporter.library_name if exporter is not None else "blipkit"
    front = ["---", f"library_name: {library}", "pipeline_tag: image-to-text", "tags: [blipkit, vision-language, image-captioning, visual-question-answering]"]
    if shared_license:
        front.append(f"license: {shared_license}")
    front.append("---")
    usage = exporter.usage(location) if exporter is not None else _blipkit_usage(location, hub)
    sections = [
        "\n".join(front),
        f"# {Path(location).name or recipe.name}",
        f"A vision-language model built with blipkit: a frozen image encoder and a frozen language model, bridged by "
        f"a trained `{recipe.bridge.name}` (BLIP-2's recipe, in blipkit's terms). Format: {fmt}.",
        "## Parts\n\n" + _parts(model),
        "## Recipe\n\n" + _recipe(recipe, model.vqa_prompt("{}")),
        "## Data\n\n" + _data(recipe),
        "## Metrics\n\n" + _metrics(run_dir),
        "## How to use it\n\n" + usage,
        "## Licenses\n\n" + licenses,
    ]
    return "\n\n".join(sections) + "\n"
