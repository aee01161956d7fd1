"""The CLI through click's CliRunner: help, listings, --json, name errors, offline errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from blipkit.cli import cli
from test_plugin_manager import install_fake_plugin


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_teaches(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("encoders", "llms", "bridges", "plugins", "datasets"):
        assert command in result.output
    assert "BLIPKIT_DEBUG" in result.output
    assert runner.invoke(cli, ["--version"]).output.startswith("blipkit, version ")


@pytest.mark.parametrize("command", ["encoders", "llms", "bridges"])
def test_listings_as_json(runner: CliRunner, command: str) -> None:
    result = runner.invoke(cli, [command, "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert entries, f"no {command} registered"
    for entry in entries:
        assert set(entry) >= {"name", "aliases", "description", "kind", "offline", "plugin"}
        assert entry["description"], entry["name"]


def test_expected_names_are_listed(runner: CliRunner) -> None:
    encoders = {e["name"] for e in json.loads(runner.invoke(cli, ["encoders", "--json"]).output)}
    assert {"siglip", "siglip-so400m", "clip", "eva", "open_clip:", "hf:", "efficientnet-lite0", "tiny-vit"} <= encoders
    llms = {e["name"]: e for e in json.loads(runner.invoke(cli, ["llms", "--json"]).output)}
    assert {"llama-3.2-1b", "llama-3.1-8b", "opt-2.7b", "qwen2.5-0.5b", "smollm2-135m", "flan-t5-base",
            "flan-t5-xl", "hf:", "gguf:", "tiny-llama", "tiny-t5"} <= set(llms)
    assert llms["flan-t5-base"]["kind"] == "encoder-decoder"
    assert llms["llama-3.2-1b"]["kind"] == "decoder-only"
    assert llms["tiny-llama"]["offline"] is True
    assert llms["smollm2-135m"]["offline"] is True
    assert llms["llama-3.2-1b"]["offline"] is False
    bridges = {e["name"] for e in json.loads(runner.invoke(cli, ["bridges", "--json"]).output)}
    assert {"qformer", "moe", "mlp", "linear"} <= bridges


def test_tables(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["llms"])
    assert result.exit_code == 0
    assert "tiny-llama" in result.output and "offline" in result.output
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "encoders.tiny_vit" in result.output


def test_plugins_json(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0
    report = {item["name"]: item for item in json.loads(result.output)}
    assert "tiny-vit" in report["blipkit.plugins.encoders.tiny_vit"]["registered"]["encoders"]
    assert all(item["error"] is None for item in report.values())


def test_describe_one_and_load(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["encoders", "tiny-vit", "--load", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["name"] == "tiny-vit" and info["loaded"]["parameters"] > 0
    result = runner.invoke(cli, ["llms", "hf:org/model", "--json"])
    assert json.loads(result.output)["name"] == "hf:"


def test_unknown_name_is_one_line_with_suggestion(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["llms", "tiny-lama"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: unknown llm 'tiny-lama'; did you mean 'tiny-llama'")


def test_hub_model_offline_is_one_line(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["llms", "llama-3.2-1b", "--load"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "meta-llama/Llama-3.2-1B" in lines[0] and "hf:" in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_DEBUG", "1")
    result = runner.invoke(cli, ["llms", "nope"])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "UnknownNameError"


def test_load_without_name_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["encoders", "--load"])
    assert result.exit_code == 2 and "--load needs a NAME" in result.stderr


def test_plugin_adds_a_command(tmp_path: Path) -> None:
    source = (
        "import click\nfrom blipkit import hookimpl\n\n"
        "@hookimpl\ndef register_commands(cli):\n"
        "    @cli.command()\n    def hello():\n        'Say hello.'\n        click.echo('hello from a plugin')\n"
    )
    install_fake_plugin(tmp_path, "blipkit-hello", "blipkit_hello", source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "blipkit", "hello"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from a plugin"
