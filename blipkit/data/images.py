"""Image loading that either returns a fully decoded, upright image or raises a one-line DataError."""

from __future__ import annotations

import glob
import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from blipkit.errors import DataError, one_line

__all__ = ["IMAGE_EXTENSIONS", "iter_image_paths", "load_image", "load_image_bytes"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_GLOB_CHARS = set("*?[")


def _open(source: str | Path | IO[bytes], name: str) -> Image.Image:
    """Read only the header of an image; refuse, before any pixel is decoded, one whose header claims more
    than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL only warns up to twice that, then decodes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(
            f"{name}: image too large to decode safely ({one_line(err)}); shrink it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file (unrecognised format); remove it or fix its path") from None
    except Exception as err:  # a damaged header can raise OSError, SyntaxError or struct.error
        raise DataError(f"{name}: cannot be read as an image ({one_line(err)}); re-save or remove it") from None


def _decode(opener: Image.Image, name: str) -> Image.Image:
    """Decode every pixel now (so that truncation shows here) and apply the EXIF orientation."""
    with opener as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except Exception as err:  # decoders raise OSError, SyntaxError, zlib.error, struct.error, ...
            raise DataError(f"{name}: corrupt or truncated image ({one_line(err)}); re-save or remove it") from None
    return upright


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and EXIF-rotate the image at ``path``; any mode is returned as stored."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise DataError(f"{path}: symbolic link to nowhere (its target is missing or the links loop); fix the link")
        raise DataError(f"{path}: no such image file; check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a pipe, socket or device); pass an image file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); remove it or copy the image again")
    return _decode(_open(path, str(path)), str(path))


def load_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> Image.Image:
    """Decode an encoded image held in memory; ``name`` labels errors. ``max_pixels`` refuses, before
    decoding, an image whose header claims more pixels (a tighter limit than PIL's own)."""
    opener = _open(io.BytesIO(data), name)
    if max_pixels is not None and opener.width * opener.height > max_pixels:
        opener.close()
        raise DataError(
            f"{name}: image of {opener.width}x{opener.height} pixels is over the limit of {max_pixels:,}; "
            "shrink it"
        )
    return _decode(opener, name)


def _is_image(path: Path) -> bool:
    """An image file by its extension; a broken link counts, so that loading it reports it."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir() and (path.is_file() or path.is_symlink())


def _expand(item: str | Path) -> list[Path]:
    path = Path(item)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if _is_image(p))
        if not found:
            raise DataError(f"{path}: directory has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    if path.exists() or path.is_symlink():
        return [path]
    if _GLOB_CHARS & set(str(item)):
        found = sorted(p for p in map(Path, glob.glob(str(item), recursive=True)) if _is_image(p))
        if not found:
            raise DataError(f"{item}: pattern matches no image files")
        return found
    raise DataError(f"{path}: no such file or directory")


def iter_image_paths(
    inputs: Iterable[str | Path], on_error: Callable[[str | Path, DataError], None] | None = None
) -> Iterator[Path]:
    """Expand files, directories (their image files, sorted, not recursive) and glob patterns into image paths.

    A named file is yielded whatever its extension; directories and globs yield image extensions only.
    A path that does not exist, or a directory or glob with no image in it, raises DataError, or with
    ``on_error`` is passed to it (with the input) and the other inputs are still expanded.
    """
    for item in inputs:
        try:
            found = _expand(item)
        except DataError as err:
            if on_error is None:
                raise
            on_error(item, err)
            continue
        yield from found
