"""The ``blipkit`` command line: parses arguments, calls the library, prints."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from blipkit.version import __version__
from blipkit.errors import BlipkitError, one_line

REPORT_GRACE_S = 3.0


class BlipkitGroup(click.Group):
    """A command group that turns user mistakes into one line on stderr (BLIPKIT_DEBUG=1: traceback).

    Plugin commands are added on first need (a name that is not built in, or the full listing), so
    built-in commands start without importing every plugin.
    """

    plugins_added = False

    def _add_plugin_commands(self) -> None:
        if self.plugins_added:
            return
        type(self).plugins_added = True
        from blipkit.plugin_manager import get_plugin_manager

        for impl in get_plugin_manager().hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=self)
            except Exception as err:  # a broken plugin must not take the CLI down, nor the other plugins' commands
                click.echo(
                    f"Warning: plugin '{impl.plugin_name}' could not add its commands ({one_line(err)}); "
                    f"fix or disable it (BLIPKIT_DISABLE_PLUGINS={impl.plugin_name})",
                    err=True,
                )

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if os.environ.get("BLIPKIT_DEBUG"):
                raise
            _report(_as_user_error(err), ctx)


def _as_user_error(err: Exception) -> BlipkitError:
    """``err`` as the one line the CLI prints: a BlipkitError as it is; an OSError about a file in the
    system's words (a full disk, a folder without write access); anything else with what a bug report needs."""
    if isinstance(err, BlipkitError):
        return err
    if isinstance(err, OSError) and err.filename is not None:
        return BlipkitError(f"{err.filename}: {err.strerror or one_line(err)}")
    return BlipkitError(
        f"unexpected {type(err).__name__}: {one_line(err)[:300]}. This is a bug in blipkit or a plugin; "
        "rerun with BLIPKIT_DEBUG=1 and report the traceback"
    )


def _report(err: BlipkitError, ctx: click.Context) -> None:
    """Print ``err`` on one line and exit with its code; in a multi-process run, once for the whole run."""
    from blipkit.distributed import launched_rank

    rank, world = launched_rank()
    if world > 1:
        from blipkit.errors import PeerLostError, ReportedByMainError

        if isinstance(err, ReportedByMainError) or (isinstance(err, PeerLostError) and "TORCHELASTIC_RUN_ID" in os.environ):
            ctx.exit(err.exit_code)  # the main process, or the launcher, reports it
        if rank > 0:
            # When every process makes the same mistake the main process's report is the one shown: the
            # launcher stops this process while it waits.
            time.sleep(REPORT_GRACE_S)
            click.echo(f"Error (process {rank}): {one_line(err)}", err=True)
            ctx.exit(err.exit_code)
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
cli.add_command(_listing_command("objectives", "training objectives a recipe's stage can name"))
cli.add_command(_listing_command("recipes", "training recipes"))


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


def _split_recipe_args(args: tuple[str, ...], default: str | None = "default") -> tuple[str | None, list[str]]:
    if args and "=" not in args[0] and not args[0].startswith("~"):
        return args[0], list(args[1:])
    return default, list(args)


@cli.command(context_settings={"max_content_width": 100})
@click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE | ~KEY]...")
@click.option("--encoder", help="Image encoder name; replaces the recipe's encoder and its options.")
@click.option("--llm", help="Language model name; replaces the recipe's LLM and its options.")
@click.option("--bridge", help="Bridge name (qformer, moe, mlp); replaces the recipe's bridge and its options.")
@click.option("--data", help="Training data: a dataset name, prefix:source or path; replaces data.train and its options.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Run directory (default: the recipe's output).")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the output directory.")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop after this many optimizer steps (resume later).")
@click.option("--processes", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train on N processes (one per GPU; on CPU they share the cores) under accelerate launch.")
@click.option("--launcher-args", default="", metavar="'ARGS'",
              help="accelerate launch's own options, quoted, e.g. '--config_file fsdp.yaml' or "
                   "'--num_machines 2 --machine_rank 0 --main_process_ip HOST'.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def train(
    args: tuple[str, ...],
    encoder: str | None,
    llm: str | None,
    bridge: str | None,
    data: str | None,
    output: str | None,
    resume_dir: str | None,
    overwrite: bool,
    stop_after: int | None,
    processes: int,
    launcher_args: str,
    quiet: bool,
) -> None:
    """Train a bridge between a frozen encoder and a frozen LLM: stage 1, then stage 2.

    \b
    RECIPE is a shipped recipe name (blipkit recipes ls) or a YAML file. With none, the offline
    'default' demo runs, unless --encoder/--llm/--bridge/--data name other parts than the demo's: the
    run then builds on 'blip2' (32 queries, a frozen LLM, BLIP-2's schedule). Overrides set or remove
    recipe keys:
      blipkit train                                   the offline demo
      blipkit train tiny                              a smoke run in seconds
      blipkit train --encoder siglip --llm llama-3.2-1b --data captions.json
      blipkit train blip2 stage1.steps=1000 data.batch_size=32
      blipkit train blip2 ~stage1                     stage 2 only
      blipkit train --resume runs/default             continue an interrupted run
      blipkit train blip2 --processes 8               8 GPUs (DDP); data.batch_size is the global batch
    `accelerate launch --multi_gpu --num_processes N -m blipkit train ...` and `torchrun
    --nproc_per_node N -m blipkit train ...` work too (docs/scaling.md).
    """
    from blipkit.config import recipe_with_parts
    from blipkit.distributed import launched_rank
    from blipkit.recipe_check import validate_recipe
    from blipkit.model.persistence import run_recipe
    from blipkit.train.runner import run_dir_for
    from blipkit.train.runner import train as run_training

    parts = {"encoder": encoder, "llm": llm, "bridge": bridge, "data": data}
    if resume_dir:
        if args or any(parts.values()):
            raise click.UsageError("--resume continues a run with its own recipe; it takes no recipe or overrides")
        recipe = run_recipe(resume_dir)
        output = resume_dir
    else:
        name, overrides = _split_recipe_args(args, default=None)
        recipe = recipe_with_parts(name, parts, overrides)
    validate_recipe(recipe)
    if processes > 1:
        if launched_rank()[1] > 1:
            raise click.UsageError("this process was started by a launcher already; drop --processes")
        from blipkit.train.launch import launch_training

        params = click.get_current_context().params
        hint = f"Continue with: blipkit train --resume {run_dir_for(recipe, output)} --processes {processes}"
        launch_training(processes, _train_argv(params), launcher_args, hint)
        return
    result = run_training(recipe, output=output, resume=bool(resume_dir), overwrite=overwrite,
                          stop_after=stop_after, quiet=quiet, report=lambda text: click.echo(text, err=True))
    if result.is_main:
        _print_training(result)


def _train_argv(params: dict[str, Any]) -> list[str]:
    """``blipkit train``'s arguments again, for each launched process: all but the launcher's own."""
    argv = list(params["args"])
    for name in ("encoder", "llm", "bridge", "data", "output", "stop_after"):
        if params[name] is not None and not (name == "output" and params["resume_dir"]):
            argv.append(f"--{name.replace('_', '-')}={params[name]}")
    if params["resume_dir"]:
        argv.append(f"--resume={params['resume_dir']}")
    return argv + ["--overwrite"] * params["overwrite"] + ["--quiet"] * params["quiet"]


def _print_training(result: Any) -> None:
    for stage, metrics in result.final.items():
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("lr", "samples_per_s", "skipped_steps"))
        skipped = int(metrics.get("skipped_steps", 0))
        click.echo(f"{stage}: {summary}" + (f" ({skipped} steps skipped: loss or gradients not finite)" if skipped else ""))
    for report in result.prepared.values():
        click.echo(str(report))
    for stage, scores in result.validation.items():
        click.echo(f"{stage} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
    if result.feature_cache is not None:
        from blipkit.data.feature_cache import cache_size

        click.echo(f"feature cache: {result.feature_cache} ({cache_size(result.feature_cache) / 2**20:.1f} MiB)")
    if result.skipped:
        click.echo("skipped samples: " + ", ".join(f"{n} {reason}" for reason, n in result.skipped.items()))
    where = f" on {result.processes} processes" if result.processes > 1 else ""
    if result.completed:
        click.echo(f"Model saved in {result.run_dir}{where} (metrics.jsonl, curves.png). Caption an image with:")
        click.echo(f"  blipkit caption IMAGE --model {result.run_dir}")
    else:
        more = f" --processes {result.processes}" if result.processes > 1 else ""
        click.echo(f"Stopped early; continue with: blipkit train --resume {result.run_dir}{more}")


@cli.command()
@click.argument("args", nargs=-1, metavar="[RECIPE] [KEY=VALUE | ~KEY]...")
@click.option("--clear", is_flag=True, help="Delete every cached feature instead.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def cache(args: tuple[str, ...], clear: bool, quiet: bool) -> None:
    """Encode a recipe's images once with its frozen encoder and store the features for training.

    Training fills the cache by itself (data.feature_cache=true, the default); this does it ahead of
    time. Features live under $BLIPKIT_CACHE/features (default ~/.cache/blipkit), keyed by the encoder's
    cache key and each image's content, so they are reused across epochs, stages and runs.
    """
    from blipkit.data.feature_cache import cache_size, clear_cache, features_root

    if clear:
        if args:
            raise click.UsageError("--clear takes no recipe")
        freed = clear_cache()
        click.echo(f"Cleared {features_root()} ({freed / 2**20:.1f} MiB)")
        return
    from blipkit.config import load_recipe
    from blipkit.features import recipe_features

    name, overrides = _split_recipe_args(args)
    for split, view in recipe_features(load_recipe(name, overrides), quiet=quiet):
        size = cache_size(view.cache.path)
        click.echo(f"{split.name} ({split.split}): {len(view.cache)} images cached in {view.cache.path} ({size / 2**20:.1f} MiB)")
        if view.skipped:
            click.echo(f"{split.name} ({split.split}) skipped samples: "
                       + ", ".join(f"{n} {reason}" for reason, n in view.skipped.items() if n), err=True)


@cli.group()
def recipes() -> None:
    """List, copy and validate training recipes."""


@recipes.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def recipes_ls(as_json: bool) -> None:
    """List the recipes that blipkit and plugins ship."""
    _print_entries("recipes", as_json)


@recipes.command("cp")
@click.argument("name")
@click.argument("dest", type=click.Path(dir_okay=True))
def recipes_cp(name: str, dest: str) -> None:
    """Copy recipe NAME to DEST (a file, or a directory to copy into) to edit it."""
    from blipkit.io import atomic_write_text
    from blipkit.plugin_manager import registries

    source = Path(registries().recipes.resolve(name).entry.factory())
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise click.UsageError(f"{target} exists; choose another destination")
    atomic_write_text(target, source.read_text())
    click.echo(f"Copied {name} to {target}; train with: blipkit train {target}")


@recipes.command("validate")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
def recipes_validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (a name or YAML file): keys, names and options, without loading weights."""
    from blipkit.config import load_recipe
    from blipkit.recipe_check import validate_recipe

    validate_recipe(load_recipe(recipe, list(overrides)))
    click.echo(f"{recipe}: ok")


def _add_command_modules() -> None:
    from blipkit import cli_demo, cli_export, cli_infer, cli_serve

    for module in (cli_infer, cli_serve, cli_demo, cli_export):
        for command in module.COMMANDS:
            cli.add_command(command)


_add_command_modules()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="blipkit")


if __name__ == "__main__":
    main(sys.argv[1:])
