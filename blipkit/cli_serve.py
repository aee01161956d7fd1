"""The ``blipkit serve`` command: parses arguments, calls the library, prints."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
