"""Mixed precision: frozen parts stored in half precision, trainable parts in float32, fp16's GradScaler
state in checkpoints; and FSDP on GPUs. The `gpu` tests need CUDA (FSDP needs two devices)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import blipkit
from blipkit.config import load_recipe
from blipkit.io import load_safetensors, read_json
from blipkit.model.build import build_model
from blipkit.train.processes import frozen_dtype
from blipkit.train.runner import train


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = run / read_json(run / "blipkit.json")["checkpoint"]
    tensors = {f"bridge.{k}": v for k, v in load_safetensors(checkpoint / "bridge" / "model.safetensors").items()}
    tensors.update({f"projection.{k}": v for k, v in load_safetensors(checkpoint / "projection" / "model.safetensors").items()})
    return tensors


def test_frozen_parts_are_stored_in_the_autocast_dtype_and_the_bridge_in_float32() -> None:
    from accelerate.utils import DistributedType

    bf16 = SimpleNamespace(mixed_precision="bf16", distributed_type=DistributedType.MULTI_GPU)
    assert frozen_dtype(bf16) is torch.bfloat16
    assert frozen_dtype(SimpleNamespace(mixed_precision="fp16", distributed_type=DistributedType.NO)) is torch.float16
    assert frozen_dtype(SimpleNamespace(mixed_precision="no", distributed_type=DistributedType.NO)) is None
    assert frozen_dtype(SimpleNamespace(mixed_precision="bf16", distributed_type=DistributedType.FSDP)) is None

    model = build_model(load_recipe("tiny"), frozen_dtype=torch.bfloat16)
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.bridge.parameters()} == {torch.float32}
    assert {p.dtype for p in model.projection.parameters()} == {torch.float32}
    pixels = torch.rand(2, 3, 32, 32)
    tokens = model.image_tokens(pixels)
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens.float()).all()
    reference = build_model(load_recipe("tiny")).encoder(pixels)
    torch.testing.assert_close(tokens.float(), reference, rtol=0.05, atol=0.05)
    assert len(model.caption(pixels, num_beams=1, max_new_tokens=3)) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_gpu_resumes_exactly(tmp_path: Path, precision: str) -> None:
    """Half-precision training on one GPU: finite losses, fp32 checkpoints that load on the CPU, and a
    resume (with fp16's GradScaler state) equal to the uninterrupted run bit for bit."""
    recipe = load_recipe("tiny", [f"precision={precision}"])
    whole = tmp_path / "whole"
    train(recipe, output=whole, quiet=True)
    parts = tmp_path / "parts"
    train(recipe, output=parts, stop_after=3, quiet=True)
    state = json.loads((parts / read_json(parts / "blipkit.json")["checkpoint"] / "trainer_state" / "state.json").read_text())
    assert ("scaler" in state) == (precision == "fp16")
    train(recipe, output=parts, resume=True, quiet=True)
    expected, got = _weights(whole), _weights(parts)
    assert {v.dtype for v in got.values()} == {torch.float32}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    model = blipkit.load(whole, device="cpu")
    assert len(model.caption([torch.rand(3, 32, 32)], num_beams=1, max_new_tokens=3)) == 1


@pytest.mark.gpu
def test_fsdp_on_two_gpus_trains_what_ddp_trains(tmp_path: Path) -> None:
    """`distributed.strategy=fsdp` on 2 GPUs: whole safetensors checkpoints that load on the CPU, with the
    weights DDP trains (fp32, no dropout or ITM; tolerance for GPU summation order)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP across processes needs 2 GPUs")
    exact = ["bridge.options.dropout=0.0", "bridge.options.objectives=[itc,itg]", "precision=fp32",
             "stage1.eps=1e-5", "stage2.eps=1e-5"]
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        command = [sys.executable, "-m", "blipkit", "train", "tiny", *exact, f"distributed.strategy={strategy}",
                   "--processes", "2", "-o", str(runs[strategy]), "-q"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    expected, got = _weights(runs["ddp"]), _weights(runs["fsdp"])
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4, msg=key)
    assert blipkit.load(runs["fsdp"], device="cpu").projection is not None
