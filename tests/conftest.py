"""Test setup: offline hubs, deterministic seeds, a fresh plugin manager per test."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from blipkit import plugin_manager


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLIPKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("BLIPKIT_DISABLE_PLUGINS", raising=False)
    torch.manual_seed(0)
    plugin_manager.reset()
    yield
    plugin_manager.reset()
