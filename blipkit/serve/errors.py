"""The error a server request ends in: an HTTP status, an OpenAI-style error type and a one-line message."""

from __future__ import annotations

from blipkit.errors import BlipkitError, one_line

__all__ = ["RequestError", "error_body"]


class RequestError(BlipkitError):
    """A request the server refuses or could not answer; ``status`` is the HTTP status to reply with."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(one_line(message))
        self.status = status
        self.kind = kind


def error_body(message: str, kind: str) -> dict[str, dict[str, str | None]]:
    """The JSON body of an error reply, in the shape OpenAI's API uses."""
    return {"error": {"message": one_line(message), "type": kind, "param": None, "code": None}}
