"""Launching on several processes: the arguments handed to accelerate, the example launcher configs, and
the CLI's refusals (the launched runs themselves are in test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from blipkit.cli import cli
from blipkit.errors import ConfigError
from blipkit.train.launch import launch_args

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def _parse(args: list[str]):
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser().parse_args(args)


def test_processes_become_accelerate_launch_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    parsed = _parse(launch_args(4, ["train", "tiny", "-q"], "--main_process_ip 10.1.2.3"))
    assert parsed.num_processes == 4 and parsed.multi_gpu and parsed.num_cpu_threads_per_process == 2
    assert parsed.module and parsed.training_script == "blipkit" and parsed.training_script_args == ["train", "tiny", "-q"]
    assert parsed.main_process_ip == "10.1.2.3" and parsed.main_process_port == 0
    with_file = _parse(launch_args(2, ["train"], f"--config_file {EXAMPLES / 'multi-node.yaml'} --machine_rank 1"))
    assert not with_file.multi_gpu and with_file.config_file == str(EXAMPLES / "multi-node.yaml")
    assert with_file.main_process_port is None, "the config file's port must reach every machine"


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="this machine has 2 GPUs"):
        launch_args(4, ["train"])
    assert "--num_processes" in launch_args(4, ["train"], "--num_machines 2")


def test_example_launcher_configs_load_in_accelerate() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"multi-node": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
                "deepspeed-zero2": DistributedType.DEEPSPEED}
    for name, kind in expected.items():
        config = load_config_from_file(str(EXAMPLES / f"{name}.yaml"))
        assert config.distributed_type == kind, name
    assert load_config_from_file(str(EXAMPLES / "multi-node.yaml")).num_machines == 2
    assert load_config_from_file(str(EXAMPLES / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    deepspeed = load_config_from_file(str(EXAMPLES / "deepspeed-zero2.yaml")).deepspeed_config
    settings = json.loads((EXAMPLES / deepspeed["deepspeed_config_file"]).read_text())
    assert settings["zero_optimization"]["stage"] == 2 and settings["train_micro_batch_size_per_gpu"] >= 1


def test_processes_inside_a_launched_process_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["train", "tiny", "--processes", "2", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "started by a launcher already" in result.output
    assert not (tmp_path / "run").exists()


def test_fsdp_on_cpu_is_refused_with_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["train", "tiny", "distributed.strategy=fsdp", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "fsdp runs on GPUs only" in result.stderr and "distributed.strategy=ddp" in result.stderr
