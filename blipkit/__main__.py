"""Run the CLI as ``python -m blipkit``."""

from blipkit.cli import main

main()
