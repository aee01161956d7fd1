"""The ``blipkit export`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import click


@click.command()
@click.argument("run")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--to", "to", default="blipkit", show_default=True,
              help="Format: blipkit (a self-contained run directory) or transformers (Blip2ForConditionalGeneration).")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY when it exists and is not empty.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Store the weights of a transformers export in this precision (default: as loaded, float32).")
@click.option("--push-to-hub", "hub_repo", metavar="REPO_ID", default=None,
              help="Also upload the export to this Hugging Face Hub model repository (created when missing).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository as private.")
def export(run: str, directory: str, to: str, overwrite: bool, dtype: str | None, hub_repo: str | None, private: bool) -> None:
    """Export the model at RUN into DIRECTORY, with a model card (README.md), to share or serve it.

    --to transformers writes a Blip2ForConditionalGeneration directory for transformers and vLLM when the
    model has BLIP-2's parts; any other model is written in blipkit's format, and the reason is shown.
    """
    from blipkit.model.export import export_model

    result = export_model(run, directory, to=to, overwrite=overwrite, dtype=dtype, hub_repo=hub_repo, private=private)
    if result.fallback is not None:
        click.echo(f"Note: the {to} format cannot hold this model: {result.fallback}; wrote blipkit's format instead.", err=True)
    for note in result.notes:
        click.echo(f"Note: {note}.", err=True)
    click.echo(f"Exported {run} to {result.directory} ({result.format} format, model card in README.md).")
    if result.url is not None:
        click.echo(f"Pushed to {result.url}")
    click.echo(f"Caption with: blipkit caption IMAGE --model {result.directory}")


COMMANDS: list[click.Command] = [export]
