"""Image loading that either returns a fully decoded, upright image or raises a one-line DataError."""

from __future__ import annotations

import glob
import io
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from blipkit.errors import DataError, one_line

__all__ = ["IMAGE_EXTENSIONS", "iter_image_paths", "load_image", "load_image_bytes"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_GLOB_CHARS = set("*?[")


def _decode(opener: Image.Image, name: str) -> Image.Image:
    """Decode every pixel now (so that truncation shows here) and apply the EXIF orientation."""
    with opener as image:
        try:
            with warnings.catch_warnings():
                # A decompression-bomb warning would otherwise print per image; an actual bomb still raises.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
                upright = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as err:
            raise DataError(f"{name}: image too large to decode safely ({one_line(err)})") from None
        except Exception as err:  # decoders raise OSError, SyntaxError, zlib.error, struct.error, ...
            raise DataError(f"{name}: corrupt or truncated image ({one_line(err)}); re-save or remove it") from None
    return upright


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and EXIF-rotate the image at ``path``; any mode is returned as stored."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such image file; check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    try:
        opened = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (unrecognised format); remove it or fix its path") from None
    except Exception as err:  # a damaged header can raise OSError, SyntaxError or struct.error
        raise DataError(f"{path}: cannot be read as an image ({one_line(err)})") from None
    return _decode(opened, str(path))


def load_image_bytes(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode an encoded image held in memory; ``name`` labels errors."""
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format)") from None
    except Exception as err:  # a damaged header can raise OSError, SyntaxError or struct.error
        raise DataError(f"{name}: cannot be read as an image ({one_line(err)})") from None
    return _decode(opened, name)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def iter_image_paths(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Expand files, directories (their image files, sorted, not recursive) and glob patterns into image paths.

    A named file is yielded whatever its extension; directories and globs yield image extensions only.
    A path that does not exist, or a directory or glob with no image in it, raises DataError.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image(p))
            if not found:
                raise DataError(f"{path}: directory has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            yield from found
        elif path.is_file():
            yield path
        elif _GLOB_CHARS & set(str(item)):
            found = sorted(p for p in map(Path, glob.glob(str(item), recursive=True)) if _is_image(p))
            if not found:
                raise DataError(f"{item}: pattern matches no image files")
            yield from found
        else:
            raise DataError(f"{path}: no such file or directory")
