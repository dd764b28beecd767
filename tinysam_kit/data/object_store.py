"""Images in object storage (S3, GCS, Azure Blob, ... anything with an fsspec filesystem) as sources.

A source URL (`s3://bucket/prefix/`) names what a local path would: a "folder" prefix (searched recursively),
one object, or a list object (`.txt`/`.lst`: one URL or key per line). `list_objects` turns it into image
URLs and the root URL their output names are relative to (`relative_key`), exactly as for a local folder of
the same layout; `ObjectLoader` reads one object (size-bounded) and decodes it like a local file.

Storage options (endpoint, credentials, `anon`) are fsspec's: passed explicitly, or from the filesystem's
usual configuration (for S3: `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `~/.aws/...`). fsspec and s3fs are the
optional `cloud` extra; this module imports them only when a URL is used.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from tinysam_kit.data.images import IMAGE_SUFFIXES, LIST_SUFFIXES, ImageError, load_image

# Objects larger than this are refused before they are downloaded (the whole object is held in memory while
# it is decoded). 1 GiB holds an uncompressed 8-bit RGB image at the default pixel limit (300 MP ≈ 900 MB).
MAX_OBJECT_BYTES = int(os.environ.get("TINYSAM_MAX_OBJECT_BYTES", 1 << 30))
INSTALL_HINT = "pip install 'tinysam-kit[cloud]'"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: `C://x` is a Windows path


class ObjectStoreError(RuntimeError):
    """The source cannot be listed or read as a whole (no filesystem for the scheme, missing bucket or prefix,
    no access); the message names the URL and the reason."""


def is_url(source: Any) -> bool:
    """Whether `source` is an object-storage URL (`scheme://...`) rather than a local path."""
    return isinstance(source, str) and _URL.match(source) is not None


def open_filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path without the scheme) for `url`."""
    try:
        import fsspec
    except ImportError as exc:
        raise ObjectStoreError(f"{url}: reading object storage needs fsspec: {INSTALL_HINT}") from exc
    scheme = _URL.match(url).group(1) if is_url(url) else "file"
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # a known scheme whose package is missing ("Install s3fs to access S3")
        raise ObjectStoreError(f"{url}: no filesystem for {scheme}:// is installed ({exc}); for S3: "
                               f"{INSTALL_HINT}") from exc
    except ValueError as exc:  # "Protocol not known"
        raise ObjectStoreError(f"{url}: fsspec has no filesystem for {scheme}:// ({exc})") from exc
    except TypeError as exc:
        raise ObjectStoreError(f"{url}: bad storage options for {scheme}:// ({exc})") from exc


def _read_bounded(fs, path: str, url: str, limit: int) -> bytes:
    """The bytes of one object, refused (ImageError) when missing, empty, a prefix or larger than `limit`;
    other storage failures are OSError."""
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ImageError(f"{url}: not an object (a prefix)")
        size = info.get("size")
        if size is not None and size > limit:
            raise ImageError(f"{url}: {size} bytes exceeds the limit of {limit} bytes per object "
                             "(set TINYSAM_MAX_OBJECT_BYTES to raise it)")
        if size == 0:
            raise ImageError(f"{url}: object is empty")
        data = fs.cat_file(path, start=0, end=limit + 1 if size is None else size)
    except FileNotFoundError as exc:
        raise ImageError(f"{url}: object does not exist") from exc
    except (OSError, ValueError):
        raise
    except Exception as exc:  # the storage client's own errors (no credentials, endpoint unreachable)
        raise OSError(f"{url}: cannot read the object ({type(exc).__name__}: {exc})") from exc
    if len(data) > limit:
        raise ImageError(f"{url}: more than {limit} bytes (set TINYSAM_MAX_OBJECT_BYTES to raise the limit)")
    return data


def read_object(url: str, storage_options: dict | None = None, max_bytes: int | None = None) -> bytes:
    """One object's bytes: ImageError when it is missing, empty or above `max_bytes` (default
    MAX_OBJECT_BYTES), OSError when the storage fails."""
    fs, path = open_filesystem(url, storage_options)
    return _read_bounded(fs, path, url, MAX_OBJECT_BYTES if max_bytes is None else max_bytes)


class ObjectLoader:
    """`load(source)` for batch runs: an object URL is read through fsspec (with `storage_options`) and
    decoded like a local file; a local path is decoded as is. Picklable (worker processes, Ray tasks carry it
    with its options)."""

    def __init__(self, storage_options: dict | None = None, max_bytes: int | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.max_bytes = max_bytes

    def __call__(self, source) -> np.ndarray:
        if not is_url(source):
            return load_image(source)
        return load_image(read_object(source, self.storage_options, self.max_bytes), name=source)


def relative_key(url: str, root: str) -> str:
    """`url`'s path under the root URL `root` ('/'-separated): what a local file's path relative to its folder
    is."""
    prefix = root if root.endswith("/") else root + "/"
    if not url.startswith(prefix):
        raise ValueError(f"{url} is not under {root}")
    return url[len(prefix):]


def _is_image_name(name: str) -> bool:
    """`find_images`' rule for one object name: an image suffix, not hidden."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def list_objects(url: str, storage_options: dict | None = None) -> tuple[list[str], str]:
    """(image URLs, root URL) for a source URL: a single object (root: its "folder"), a prefix searched
    recursively (root: the prefix; sorted like `find_images`, hidden names skipped) or a list object (root:
    the deepest prefix holding every listed image). Listed objects that are missing stay in the list: the run
    reports them as failures. Raises ObjectStoreError when the source cannot be listed."""
    fs, path = open_filesystem(url, storage_options)
    path = path.rstrip("/")
    try:
        if fs.isfile(path):
            if PurePosixPath(path).suffix.lower() in LIST_SUFFIXES:
                return _read_list(fs, path, url, storage_options)
            return [fs.unstrip_protocol(path)], fs.unstrip_protocol(posixpath.dirname(path))
        if not fs.isdir(path):
            raise ObjectStoreError(f"{url}: no such object or prefix")
        found = fs.find(path)
    except ObjectStoreError:
        raise
    except Exception as exc:  # no access, no credentials, endpoint unreachable: one line for the user
        raise ObjectStoreError(f"{url}: cannot list ({type(exc).__name__}: {exc})") from exc
    start = len(path) + 1 if path else 0
    relative = [p[start:] for p in found if p.startswith(path + "/" if path else "")]
    images = sorted((r for r in relative if _is_image_name(posixpath.basename(r))), key=PurePosixPath)
    if not images:
        raise ObjectStoreError(f"{url}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    root = fs.unstrip_protocol(path)
    return [f"{root.rstrip('/')}/{r}" for r in images], root


def _read_list(fs, path: str, url: str, storage_options: dict | None) -> tuple[list[str], str]:
    try:
        text = _read_bounded(fs, path, url, MAX_OBJECT_BYTES).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise ObjectStoreError(f"{url}: cannot read the image list: {exc}") from exc
    folder = posixpath.dirname(path)
    images: dict[str, None] = {}  # in order, each once
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_url(line):
            other, other_path = open_filesystem(line, storage_options)
            images[other.unstrip_protocol(other_path.rstrip("/"))] = None
        else:  # a key relative to the list's prefix ('..' allowed), or from the storage's root: /bucket/key
            joined = posixpath.normpath(posixpath.join(folder, line))
            if not path.startswith("/"):  # bucketed stores' paths are bucket/key
                joined = joined.lstrip("/")
            images[fs.unstrip_protocol(joined)] = None
    if not images:
        raise ObjectStoreError(f"{url}: the list names no images (one URL or key per line)")
    return list(images), _common_root(list(images), url)


def _common_root(urls: list[str], source: str) -> str:
    """The deepest prefix holding every URL's object."""
    schemes = {_URL.match(u).group(1) for u in urls}
    if len(schemes) > 1:
        raise ObjectStoreError(f"{source}: the list names objects in more than one storage "
                               f"({', '.join(sorted(s + '://' for s in schemes))})")
    scheme = schemes.pop() + "://"
    parents = [posixpath.dirname(u[len(scheme):]) for u in urls]
    return scheme + posixpath.commonpath(parents) if all(parents) else scheme
