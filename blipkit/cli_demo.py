"""The ``blipkit demo`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--model", "-m", help="Run directory or BLIP-2 checkpoint (default: the last 'blipkit train' run).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 makes the page reachable from other machines.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Folder of images the Search tab looks through (on 127.0.0.1 any folder can be typed in the page).")
def demo(model: str | None, host: str, port: int, images: str | None) -> None:
    """Open a web page to try a model: caption an uploaded image, ask about it, see the Q-Former's attention
    over it, and search a folder of images by text.

    \b
    Needs the demo extra (pip install 'blipkit[demo]'). Runs offline: no telemetry, no share link.
      blipkit demo --model runs/default --images photos/
    """
    from blipkit.model.persistence import last_run
    from blipkit.web_demo import launch_demo

    path = model or str(last_run())
    launch_demo(path, host=host, port=port, images=images, title=f"blipkit: {Path(path).resolve().name}",
                on_ready=lambda url: click.echo(f"Demo of {path} running at {url} (Ctrl+C to stop)", err=True))


COMMANDS = [demo]
