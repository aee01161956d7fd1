"""The ``blipkit serve`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import os

import click

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


@click.command(context_settings={"max_content_width": 100})
@click.option("--model", "-m", help="Run directory or BLIP-2 checkpoint (default: the last 'blipkit train' run).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--name", help="The model's id in /v1/models and chat requests (default: the run directory's name).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most images in one forward pass (1: no batching).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long the first request of a batch waits for others.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most items waiting; further requests get 503 until it drains.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Largest request body.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest image (width x height) decoded.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most new tokens a request may ask for.")
@click.option("--allow-url-fetch", is_flag=True,
              help="Let requests name http(s) image URLs that the server downloads (off: data URLs and uploads only).")
@click.option("--api-key", default=lambda: os.environ.get("BLIPKIT_API_KEY"),
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (default: $BLIPKIT_API_KEY).")
@click.option("--device", help="Where the model runs (default: cuda when available, else cpu).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="Server log level (info logs every request).")
def serve(model: str | None, host: str, port: int, name: str | None, max_batch: int, max_wait_ms: float,
          max_queue: int, max_body_mb: float, max_image_pixels: int, max_new_tokens: int, allow_url_fetch: bool,
          api_key: str | None, device: str | None, log_level: str) -> None:
    """Serve a trained model over HTTP: caption, ask, embed, and OpenAI-compatible chat completions.

    \b
    Concurrent requests with the same settings run as one batch:
      blipkit serve --model runs/default
      curl -F image=@cat.jpg http://127.0.0.1:8000/v1/caption
    Endpoints, the OpenAI client and the limits: docs/serving.md.
    """
    from blipkit.model.persistence import last_run
    from blipkit.serve.server import serve as run_server
    from blipkit.serve.settings import ServeSettings

    settings = ServeSettings(
        host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
        max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=max_image_pixels, max_new_tokens=max_new_tokens,
        allow_url_fetch=allow_url_fetch, api_key=api_key or None, name=name, device=device, log_level=log_level,
    )
    run_server(model or str(last_run()), settings, report=click.echo)


COMMANDS: list[click.Command] = [serve]
