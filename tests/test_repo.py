"""The repository keeps its promises: README's commands, CI's command, recipes' launch lines."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_starts_with_train_then_test_commands() -> None:
    first, second = _readme_commands()[:2]
    assert first.startswith("bash scripts/setup.sh") and "blipkit train" in first
    captions = "blipkit shapes" if "--caption" in first else "blipkit caption"
    assert captions in first and first.index("blipkit train") < first.index(captions)
    assert second.startswith("bash scripts/setup.sh") and "pytest" in second


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [_readme_commands()[1]]


def test_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in text and "## [Unreleased]" in text
