"""What ``blipkit serve`` can be told: address, batching, limits and access."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one server; the defaults are ``blipkit serve``'s."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_new_tokens: int = 256
    max_items: int = 64
    allow_url_fetch: bool = False
    fetch_timeout_s: float = 10.0
    api_key: str | None = None
    name: str | None = None
    device: str | None = None
    log_level: str = "info"
