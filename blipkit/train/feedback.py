"""Training feedback: a rich progress bar per stage and loss/lr curves drawn at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from blipkit.io import atomic_path

__all__ = ["CountProgress", "StageProgress", "plot_curves"]


class StageProgress:
    """A progress bar on stderr (steps, loss, lr, samples/s, ETA); silent when quiet or not a terminal."""

    def __init__(self, stage: str, total: int, start: int = 0, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not self.enabled,
        )
        self.task = self.progress.add_task(stage, total=total, completed=start, info="")

    def __enter__(self) -> StageProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Show ``step`` and the latest metrics."""
        info = f"loss {metrics.get('loss', float('nan')):.4f}  lr {metrics.get('lr', 0.0):.2e}  {metrics.get('samples_per_s', 0.0):.1f} samples/s"
        self.progress.update(self.task, completed=step, info=info)


class CountProgress:
    """A plain counting progress bar on stderr (e.g. images encoded); silent when quiet or not a terminal."""

    def __init__(self, description: str, total: int | None, quiet: bool = False) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=quiet or not sys.stderr.isatty(),
        )
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self) -> CountProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()

    def advance(self, count: int) -> None:
        """Count ``count`` more items done."""
        self.progress.advance(self.task, count)

    def restart(self, description: str, total: int) -> None:
        """Start counting again from zero, towards ``total``, under ``description``."""
        self.progress.reset(self.task, total=total, description=description)


def plot_curves(metrics_file: Path, out: Path) -> bool:
    """Draw losses (training, and validation where it was scored) and the learning rate per stage from
    metrics.jsonl into a PNG; False when nothing to draw."""
    if not metrics_file.exists():
        return False
    every = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [row for row in every if "split" not in row]
    checks = [row for row in every if "split" in row and isinstance(row.get("val_loss"), (int, float))]
    stages = list(dict.fromkeys(row["stage"] for row in rows))
    if not stages:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(stages), figsize=(5 * len(stages), 6), squeeze=False)
    for column, stage in enumerate(stages):
        mine = [row for row in rows if row["stage"] == stage]
        steps = [row["step"] for row in mine]
        loss_axis, lr_axis = axes[0][column], axes[1][column]
        for key in sorted({k for row in mine for k in row} - {"stage", "step", "lr", "samples_per_s", "skipped_steps"}):
            values = [row.get(key) for row in mine]
            if all(isinstance(v, (int, float)) for v in values):
                loss_axis.plot(steps, values, label=key)
        validated = [row for row in checks if row["stage"] == stage]
        if validated:
            loss_axis.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "o--", color="black",
                           label="validation loss")
        loss_axis.set_title(f"{stage}: losses")
        loss_axis.legend(fontsize="small")
        lr_axis.plot(steps, [row["lr"] for row in mine], color="tab:gray")
        lr_axis.set_title(f"{stage}: learning rate")
        lr_axis.set_xlabel("optimizer step")
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return True
