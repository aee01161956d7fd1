"""Request bodies into checked values: JSON or form fields, and images from uploads, base64, data URLs or
(when the server allows it) http(s) URLs."""

from __future__ import annotations

import base64
import binascii
import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from blipkit.data.images import load_image_bytes
from blipkit.errors import DataError, one_line
from blipkit.serve.errors import RequestError

__all__ = ["Fields", "ImageReader", "parse_json"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body, or a 400 that says why it is not JSON."""
    try:
        return json.loads(body.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise RequestError(f"body is not UTF-8 text ({err.reason} at byte {err.start}); send UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise RequestError(f"body is not valid JSON ({err}); send a JSON object") from None
    except RecursionError:
        raise RequestError("body is JSON nested too deeply; send a flat JSON object") from None


class Fields:
    """A request's named values (a JSON object, or a form's text fields and files) with typed getters;
    a missing or wrong-typed value is a 400 that names the field."""

    def __init__(self, values: Mapping[str, Any], from_form: bool = False) -> None:
        self.values = dict(values)
        self.from_form = from_form

    def __contains__(self, name: str) -> bool:
        return self.values.get(name) is not None

    def raw(self, name: str, required: bool = False) -> Any:
        """The value as sent; None when absent (a 400 when ``required``)."""
        value = self.values.get(name)
        if value is None and required:
            raise RequestError(f"'{name}' is missing; add it to the request")
        return value

    def text(self, name: str, default: str | None = None, required: bool = False, allow_empty: bool = False) -> str | None:
        """A string field."""
        value = self.raw(name, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise RequestError(f"'{name}' must be a string, not {_json_type(value)}")
        if not value.strip() and not allow_empty:
            raise RequestError(f"'{name}' is empty; give some text")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        """An integer field within [low, high]; forms send it as text."""
        value = self.raw(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise RequestError(f"'{name}' must be an integer, not {value[:40]!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"'{name}' must be an integer, not {_json_type(value)}")
        if not low <= value <= high:
            raise RequestError(f"'{name}' must be between {low} and {high}, not {value}")
        return value

    def number(self, name: str, default: float | None, low: float, high: float) -> float | None:
        """A finite number within [low, high]; forms send it as text."""
        value = self.raw(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise RequestError(f"'{name}' must be a number, not {value[:40]!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"'{name}' must be a finite number, not {_json_type(value)}")
        if not low <= value <= high:
            raise RequestError(f"'{name}' must be between {low} and {high}, not {value}")
        return float(value)

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean field; forms send true/false, 1/0, yes/no or on/off."""
        value = self.raw(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise RequestError(f"'{name}' must be true or false, not {_json_type(value)}")
        return value

    def items(self, single: str, plural: str, limit: int) -> list[Any]:
        """The value of ``single``, or the list under ``plural`` (at most ``limit`` entries); [] when neither.
        A form sends a list as the same name repeated, under either name."""
        if single in self and plural in self:
            raise RequestError(f"give '{single}' or '{plural}', not both")
        name = single if single in self else plural
        value = self.raw(name)
        if value is None:
            return []
        if name == single and not (self.from_form and isinstance(value, list)):
            return [value]
        if not isinstance(value, list):
            value = [value] if self.from_form else value
        if not isinstance(value, list) or not value:
            raise RequestError(f"'{plural}' must be a non-empty list, not {_json_type(value)}")
        if len(value) > limit:
            raise RequestError(f"'{plural}' has {len(value)} entries; send at most {limit} per request")
        return value


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class ImageReader:
    """Decodes the images a request carries, within the server's limits."""

    max_pixels: int
    max_bytes: int
    allow_url_fetch: bool = False
    fetch_timeout_s: float = 10.0

    def read(self, value: Any, name: str = "image") -> Image.Image:
        """A decoded image from uploaded bytes, or from a string: base64, a data URL or an http(s) URL."""
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            data = self._string_bytes(value.strip(), name)
        else:
            raise RequestError(
                f"'{name}' must be an uploaded file or a string (base64, a data URL), not {_json_type(value)}"
            )
        if not data:
            raise RequestError(f"'{name}' is empty (0 bytes); send the image's bytes")
        try:
            return load_image_bytes(data, f"'{name}'", max_pixels=self.max_pixels)
        except DataError as err:  # its advice is for files on disk; a client can only send another image
            problem = str(err).partition("; ")[0]
            raise RequestError(f"{problem}; send an intact image (PNG, JPEG, WebP, ...) of at most "
                               f"{self.max_pixels:,} pixels") from None

    def _string_bytes(self, value: str, name: str) -> bytes:
        lowered = value[:16].lower()
        if lowered.startswith("data:"):
            header, comma, payload = value.partition(",")
            if not comma or not header.lower().endswith(";base64"):
                raise RequestError(
                    f"'{name}': a data URL must be base64-encoded (data:image/png;base64,...)"
                )
            return _b64decode(payload, name)
        if lowered.startswith(("http://", "https://")):
            return self._fetch(value, name)
        if "://" in value[:24]:
            raise RequestError(f"'{name}': only data URLs and http(s) URLs are taken, not {value[:24]!r}...")
        return _b64decode(value, name)

    def _fetch(self, url: str, name: str) -> bytes:
        shown = url if len(url) <= 120 else url[:117] + "..."
        if not self.allow_url_fetch:
            raise RequestError(
                f"'{name}': this server does not fetch image URLs ({shown}); send the image as a data URL "
                "(data:image/png;base64,...), or start the server with --allow-url-fetch"
            )
        opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _WebOnlyRedirects(),
                        urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.UnknownHandler()):
            opener.add_handler(handler)
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "blipkit"}),
                             timeout=self.fetch_timeout_s) as response:
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as err:
            raise RequestError(f"'{name}': fetching {shown} gave HTTP {err.code} ({err.reason}); check the URL") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise RequestError(f"'{name}': cannot fetch {shown} ({one_line(reason)}); check the URL, or send a data URL") from None
        if len(data) > self.max_bytes:
            raise RequestError(f"'{name}': {shown} is larger than {self.max_bytes:,} bytes; send a smaller image")
        return data


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirected to a URL that is not http(s): {newurl[:80]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _b64decode(text: str, name: str) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise RequestError(f"'{name}' is empty; send the image as base64 or a data URL")
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(
            f"'{name}' is not valid base64 ({one_line(err)}); send the image's bytes base64-encoded, "
            "a data URL (data:image/png;base64,...), or upload it as a multipart file"
        ) from None
