"""Turning whatever image a user has into the H×W×3 uint8 RGB array the model expects."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = int(os.environ.get("TINYSAM_MAX_IMAGE_PIXELS", 300_000_000))
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
LIST_SUFFIXES = (".txt", ".lst")  # a source with one of these suffixes is a list of images, one per line


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` by suffix, recursively, sorted. Hidden files are skipped (e.g. the `._name.jpg`
    metadata files macOS leaves on shared drives are not images)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


class ImageError(ValueError):
    """The image cannot be used; the message says which image and why."""


def _pil_to_array(img: Image.Image, name: str) -> np.ndarray:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: image has zero size ({img.width}×{img.height})")
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: {img.width}×{img.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
            "(set TINYSAM_MAX_IMAGE_PIXELS to raise it)"
        )
    try:
        img = ImageOps.exif_transpose(img)  # annotators see the rotated image; masks must line up with it
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make an otherwise fine image unusable
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_rgb_uint8(np.asarray(img), name=name)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def load_image(source, name: str | None = None) -> np.ndarray:
    """Read a path, bytes, file object, PIL image or array into H×W×3 uint8 RGB (EXIF rotation applied)."""
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source, name=name or "array")
    if isinstance(source, Image.Image):
        return _pil_to_array(source, name or "image")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        if not path.exists():
            raise ImageError(f"{name}: file does not exist")
        if not path.is_file():
            raise ImageError(f"{name}: not a file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: file is empty")
        opener = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "image bytes"
        if len(source) == 0:
            raise ImageError(f"{name}: no data")
        opener = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        name = name or getattr(source, "name", "file object")
        opener = source
    else:
        raise ImageError(f"unsupported image type {type(source).__name__}")
    try:
        with Image.open(opener) as img:
            img.load()
            return _pil_to_array(img, name)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:  # its message names the file object, e.g. <_io.BytesIO at 0x...>
        raise ImageError(f"{name}: cannot decode image (not a format Pillow reads, or not an image)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from exc


def to_rgb_uint8(image: np.ndarray, image_format: str = "RGB", name: str = "array") -> np.ndarray:
    """Normalise an array (gray, gray+alpha, RGB/BGR, RGBA/BGRA; uint8/uint16/float/bool) to RGB uint8."""
    image_format = image_format.upper()
    if image_format not in ("RGB", "BGR"):
        raise ImageError(f"image_format must be 'RGB' or 'BGR', not {image_format!r}")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ImageError(f"{name}: expected H×W, H×W×3 or H×W×4 image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: image has zero size {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        if arr.min(initial=0) < 0:
            raise ImageError(f"{name}: negative pixel values in a {arr.dtype} image")
        peak = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        arr = np.rint(arr.astype(np.float64) * (255.0 / peak)).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min(initial=0) < 0:
            raise ImageError(f"{name}: negative pixel values in a {arr.dtype} image")
        arr = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: image contains NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 2:
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if image_format == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)
