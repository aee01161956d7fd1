"""The ``blipkit`` command line: parses arguments, calls the library, prints."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from blipkit import __version__
from blipkit.errors import BlipkitError, one_line


class BlipkitGroup(click.Group):
    """A command group that turns user mistakes into one line on stderr (BLIPKIT_DEBUG=1: traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BlipkitError as err:
            if os.environ.get("BLIPKIT_DEBUG"):
                raise
            click.echo(f"Error: {one_line(err)}", err=True)
            ctx.exit(err.exit_code)


@click.group(cls=BlipkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blipkit")
def cli() -> None:
    """blipkit: train a bridge between a frozen image encoder and a frozen LLM, the BLIP-2 way.

    \b
    Parts are picked by name; list them with:
      blipkit encoders      image encoders (siglip, clip, eva, efficientnet-lite0, hf:..., open_clip:...)
      blipkit llms          language models (smollm2-135m, llama-3.2-1b, flan-t5-base, hf:..., gguf:...)
      blipkit bridges       Q-Former, MoE and MLP projectors
      blipkit plugins       installed plugins and what each registered

    Set BLIPKIT_DEBUG=1 to see full tracebacks.
    """


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _print_entries(attr: str, as_json: bool) -> None:
    from blipkit.plugin_manager import registries

    entries = [entry.to_dict() for entry in registries().by_name(attr)]
    if as_json:
        _print_json(entries)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"blipkit {attr}", show_lines=False)
    for column in ("name", "aliases", "kind", "offline", "description", "plugin"):
        table.add_column(column, overflow="fold")
    offline_text = {True: "yes", False: "no", None: "?"}
    for entry in entries:
        table.add_row(
            entry["name"],
            ", ".join(entry["aliases"]),
            entry["kind"],
            offline_text[entry["offline"]],
            entry["description"],
            entry["plugin"].removeprefix("blipkit.plugins."),
        )
    Console(soft_wrap=False).print(table)


def _describe(attr: str, name: str, load: bool, as_json: bool) -> None:
    from blipkit.plugin_manager import registries

    resolved = registries().by_name(attr).resolve(name)
    info = resolved.entry.to_dict()
    info["requested"] = name
    if load:
        obj = resolved.create()
        info["loaded"] = {
            key: getattr(obj, key)
            for key in ("feature_dim", "num_tokens", "image_size", "token_layout", "hidden_size",
                        "is_encoder_decoder", "output_dim", "num_queries")
            if isinstance(getattr(obj, key, None), (int, str, bool))
        }
        if hasattr(obj, "parameters"):
            info["loaded"]["parameters"] = sum(p.numel() for p in obj.parameters())
    if as_json:
        _print_json(info)
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")


def _listing_command(attr: str, what: str) -> click.Command:
    @click.command(name=attr, help=f"List the {what} that plugins registered, or describe NAME.\n\n"
                   "'offline' says whether it loads on this machine without a model hub. With NAME and "
                   "--load, build it here and print its sizes: a quick check that it works on this machine.")
    @click.argument("name", required=False)
    @click.option("--load", is_flag=True, help="With NAME: build the model (downloads where a hub is reachable).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def command(name: str | None, load: bool, as_json: bool) -> None:
        if name is None:
            if load:
                raise click.UsageError("--load needs a NAME")
            _print_entries(attr, as_json)
        else:
            _describe(attr, name, load, as_json)

    return command


cli.add_command(_listing_command("encoders", "image encoders"))
cli.add_command(_listing_command("llms", "language models"))
cli.add_command(_listing_command("bridges", "bridges and projections"))
cli.add_command(_listing_command("datasets", "dataset formats"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List plugins (built-in and installed), their versions and what each registered.

    Third-party plugins come from the 'blipkit' entry-point group. BLIPKIT_LOAD_PLUGINS=a,b loads only
    those; BLIPKIT_DISABLE_PLUGINS=a,b skips them.
    """
    from blipkit.plugin_manager import plugin_report

    report = plugin_report()
    if as_json:
        _print_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="blipkit plugins")
    for column in ("plugin", "version", "registered", "status"):
        table.add_column(column, overflow="fold")
    for item in report:
        registered = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in item["registered"].items())
        status = f"[red]failed: {item['error']}[/red]" if item["error"] else "ok"
        table.add_row(item["name"].removeprefix("blipkit.plugins."), item["version"] or "-", registered or "-", status)
    Console(soft_wrap=False).print(table)


def _add_plugin_commands() -> None:
    from blipkit.plugin_manager import get_plugin_manager

    try:
        get_plugin_manager().hook.register_commands(cli=cli)
    except Exception as err:  # a broken plugin must not take the CLI down
        click.echo(f"Warning: a plugin's register_commands failed: {one_line(err)}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _add_plugin_commands()
    cli.main(args=argv, prog_name="blipkit")


if __name__ == "__main__":
    main(sys.argv[1:])
