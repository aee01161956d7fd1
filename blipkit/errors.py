"""User-facing errors: each carries a one-line message that says what went wrong and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable
import difflib


class BlipkitError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits with ``exit_code``."""

    exit_code = 1


class UnknownNameError(BlipkitError, KeyError):
    """A name that no plugin registered."""

    exit_code = 2

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        message = f"unknown {kind} '{name}'"
        message += f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        message += f" {hint or f'List them with: blipkit {kind}s'}"
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateNameError(BlipkitError):
    """Two plugins registered the same name."""


class ModelUnavailableError(BlipkitError):
    """Weights that cannot be loaded here (no hub access, missing package or file)."""


class ConfigError(BlipkitError):
    """A recipe or override that does not fit the schema."""

    exit_code = 2


class DataError(BlipkitError):
    """A dataset or image that cannot be read."""


class NonFiniteError(BlipkitError):
    """Training met a non-finite loss or gradient norm too many steps in a row."""


class PeerLostError(BlipkitError):
    """Another process of a multi-process run stopped (crashed, killed, out of memory); this one stops too."""


class ReportedByMainError(BlipkitError):
    """A mistake the main process of a multi-process run found and reports; the others end quietly with
    its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str) -> str:
    """Collapse whitespace so that a message fits on one line."""
    return " ".join(str(text).split())
