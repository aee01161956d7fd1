"""Running the HTTP API: check the ``serve`` extra, bind the address, load the model, serve until stopped."""

from __future__ import annotations

import importlib
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

from blipkit.errors import BlipkitError
from blipkit.serve.settings import ServeSettings

__all__ = ["bind", "require_serve_extra", "serve"]


def require_serve_extra() -> None:
    """Raise a one-line error naming the install command when FastAPI, uvicorn or python-multipart is missing."""
    missing = []
    for package, modules in (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                             ("python-multipart", ("python_multipart", "multipart"))):
        for module in modules:
            try:
                importlib.import_module(module)
                break
            except ImportError:
                continue
        else:
            missing.append(package)
    if missing:
        raise BlipkitError(f"blipkit serve needs {', '.join(missing)}; install them with: pip install 'blipkit[serve]'")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``, or a one-line error when the address cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise BlipkitError(f"cannot resolve host '{host}' ({err.strerror}); give an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise BlipkitError(f"cannot listen on {host}:{port} ({err.strerror}); pick another with --port or --host") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _device(name: str | None) -> str:
    """``name`` checked to be a device this machine has; by default CUDA when there is a GPU, else the CPU."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise BlipkitError(f"unknown device '{name}'; give cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BlipkitError(f"device '{name}' asked for, but this machine has no usable CUDA GPU; give --device cpu")
    return name


def serve(model: str | Path, settings: ServeSettings, report: Callable[[str], None] = print) -> None:
    """Load the model at ``model`` and answer HTTP requests on ``settings``' address until interrupted."""
    require_serve_extra()
    import uvicorn

    import blipkit
    from blipkit.serve.app import create_app
    from blipkit.serve.service import ModelService, model_name

    device = _device(settings.device)
    sock = bind(settings.host, settings.port)
    try:
        name = model_name(model, settings.name)
        service = ModelService(blipkit.load(model, device=device), name, settings.max_batch, settings.max_wait_ms,
                               settings.max_queue)
        app = create_app(service, settings)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        report(f"Serving '{name}' ({', '.join(service.describe()['tasks']) or 'no tasks'}) on http://{shown}:{port} "
               f"on {device}; batches of up to {settings.max_batch}, {settings.max_wait_ms:g} ms wait. Ctrl-C stops.")
        if not _is_loopback(settings.host):
            report(f"Warning: listening on {settings.host}: anyone who can reach this machine can use the model"
                   + ("" if settings.api_key else "; set --api-key to require a key"))
        config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
