"""Safe, atomic file I/O: only safetensors and JSON are ever read from user paths."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blipkit.errors import DataError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_directory(destination: str | Path, shared: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``destination``; when the block succeeds, fsync its files
    and rename it into place (replacing what was there), else remove it. ``shared``: the files follow the
    umask, as files meant for others do, instead of the atomic writers' private mode."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    old = tmp.with_name(tmp.name + ".old")
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        if shared:
            tmp.chmod(0o777 & ~umask)
        for path in tmp.rglob("*"):
            if shared:
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if destination.exists():
            os.replace(destination, old)
        os.replace(tmp, destination)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or err}); check that it is a readable file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); fix or regenerate the file") from None


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors atomically; shared storage is cloned so that safetensors accepts it."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a one-line error when it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; restore the file, or save the weights again")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path} is not a readable safetensors file ({err}); re-save it") from None


def cache_dir() -> Path:
    """blipkit's cache directory: ``$BLIPKIT_CACHE`` or ``~/.cache/blipkit``."""
    return Path(os.environ.get("BLIPKIT_CACHE") or Path.home() / ".cache" / "blipkit")


def load_safetensors_prefixed(directory: str | Path, prefixes: tuple[str, ...], strip: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose names start with one of ``prefixes`` from a model directory's safetensors weights
    (``model.safetensors`` or the shards of ``model.safetensors.index.json``), read one by one; ``strip``
    is removed from the front of each returned name."""
    from safetensors import safe_open

    from blipkit.errors import ModelUnavailableError

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        contents = read_json(index)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict):
            raise DataError(f"{index} is not a valid safetensors index; fix or delete it")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise ModelUnavailableError(
            f"{directory} has no model.safetensors; only safetensors weights are loaded "
            "(re-save the model with save_pretrained(dir, safe_serialization=True))"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefixes):
                        state[key[len(strip) :] if strip and key.startswith(strip) else key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise DataError(f"{file} is not a readable safetensors file ({err}); re-save it") from None
    return state
