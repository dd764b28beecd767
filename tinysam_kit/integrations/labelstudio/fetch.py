"""Fetching task images: only from Label Studio itself or an explicit allow-list, with auth and limits.

Task data names an image by a Label Studio path (`/data/upload/...`, `/data/local-files/?d=...`), an
absolute URL, or a cloud URI (`s3://`, `gs://`, `azure-blob://`) that Label Studio presigns. Whoever can
edit task data must not be able to make the backend request arbitrary hosts, so every URL (including
every redirect hop) is checked against the Label Studio origin and `TINYSAM_ALLOWED_HOSTS`, and the
Label Studio credentials are only ever sent to the Label Studio origin.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx
import numpy as np

from tinysam_kit.data.images import load_image

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5
REFRESH_MARGIN_S = 30.0


class ImageFetchError(Exception):
    """An image could not be fetched. `status_code` is the HTTP status the backend answers with."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _jwt_claims(token: str) -> dict | None:
    """Claims of a JWT without verifying it (we only need its expiry and type); None if not a JWT."""
    pieces = token.split(".")
    if len(pieces) != 3:
        return None
    payload = pieces[1] + "=" * (-len(pieces[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """Authorization header for Label Studio.

    A personal access token is a long-lived JWT *refresh* token: Label Studio rejects it as a bearer token
    and wants it exchanged at `/api/token/refresh/` for a short-lived access token, which is renewed
    shortly before it expires (or after a 401). Anything else is a legacy token sent as `Token <key>`.
    """

    def __init__(self, base_url: str, api_key: str, client: httpx.Client) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key.strip()
        self.client = client
        claims = _jwt_claims(self.api_key)
        self.is_personal_token = claims is not None and claims.get("token_type", "refresh") == "refresh"
        self._access: str | None = None
        self._access_expiry = 0.0
        self._lock = threading.Lock()
        self.refreshes = 0

    def headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not self.is_personal_token:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or time.time() > self._access_expiry - REFRESH_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            resp = self.client.post(url, json={"refresh": self.api_key})
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot reach Label Studio at {url} to refresh the access token: {exc}",
                                  502) from exc
        if resp.status_code != 200:
            raise ImageFetchError(
                f"Label Studio refused the personal access token at {url} (HTTP {resp.status_code}); "
                "check LABEL_STUDIO_API_KEY", 502)
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageFetchError(f"unexpected answer from {url}: no 'access' token", 502) from exc
        claims = _jwt_claims(access) or {}
        self._access = access
        self._access_expiry = float(claims.get("exp", time.time() + 300))
        self.refreshes += 1


class ImageFetcher:
    """Downloads task images within the allowed locations, size and time limits."""

    def __init__(self, label_studio_url: str = "", api_key: str = "", *, allowed_hosts=(),
                 local_files_root: str = "", max_bytes: int = 64 * 1024 * 1024, timeout: float = 30.0) -> None:
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout)
        self.client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False,
                                   headers={"User-Agent": "tinysam-kit-ml-backend"})
        self._lock = threading.Lock()
        self.label_studio_url = ""
        self.auth: LabelStudioAuth | None = None
        self.fetches = 0
        self.configure(label_studio_url, api_key)

    def configure(self, label_studio_url: str, api_key: str) -> None:
        with self._lock:
            self.label_studio_url = (label_studio_url or "").rstrip("/")
            self.auth = LabelStudioAuth(self.label_studio_url, api_key, self.client) if self.label_studio_url else None

    def close(self) -> None:
        self.client.close()

    # ----------------------------------------------------------------- policy
    def is_label_studio(self, url: str) -> bool:
        return bool(self.label_studio_url) and _origin(url) == _origin(self.label_studio_url)

    def is_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return False
        if self.is_label_studio(url):
            return True
        host = parts.hostname.lower()
        host_port = f"{host}:{parts.port}" if parts.port else host
        return any(fnmatch.fnmatchcase(host, pattern) or fnmatch.fnmatchcase(host_port, pattern)
                   for pattern in self.allowed_hosts)

    def resolve(self, value: str, task_id=None) -> str:
        """Absolute http(s) URL (or local-files path marker) of a task's image value."""
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError(f"task image must be a non-empty string URL, got {value!r}")
        value = value.strip()
        scheme = urlsplit(value).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError(f"cannot presign {value!r} without a task id")
            self._need_label_studio(value)
            encoded = base64.urlsafe_b64encode(value.encode()).decode()
            return f"{self.label_studio_url}/tasks/{quote(str(task_id))}/presign/?fileuri={encoded}"
        if scheme in ("http", "https"):
            return value
        if value.startswith("/"):
            if value.startswith("//"):
                raise ImageFetchError(f"protocol-relative image URL {value!r} is not allowed")
            self._need_label_studio(value)
            return urljoin(self.label_studio_url + "/", value.lstrip("/"))
        raise ImageFetchError(f"unsupported image reference {value[:200]!r}: expected a Label Studio path "
                              "(/data/...), an http(s) URL or a cloud URI (s3://, gs://, azure-blob://)")

    def _need_label_studio(self, value: str) -> None:
        if not self.label_studio_url:
            raise ImageFetchError(f"image {value[:200]!r} is served by Label Studio, but its URL is unknown: set "
                                  "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) for the backend")

    def _local_file(self, url: str) -> Path | None:
        """`/data/local-files/?d=rel/path` read straight from LOCAL_FILES_DOCUMENT_ROOT when configured."""
        if self.local_files_root is None or not self.is_label_studio(url):
            return None
        parts = urlsplit(url)
        if parts.path.rstrip("/") != "/data/local-files":
            return None
        rel = parse_qs(parts.query).get("d", [""])[0]
        path = (self.local_files_root / rel).resolve()
        if self.local_files_root not in path.parents:
            raise ImageFetchError(f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT", 403)
        return path

    # ------------------------------------------------------------------ fetch
    def fetch(self, value: str, task_id=None) -> bytes:
        """Bytes of the image named by task data `value`."""
        url = self.resolve(value, task_id)
        local = self._local_file(url)
        if local is not None:
            if not local.is_file():
                raise ImageFetchError(f"local file {local} does not exist", 404)
            if local.stat().st_size > self.max_bytes:
                raise ImageFetchError(f"image {local} is larger than the {self.max_bytes} byte limit")
            self.fetches += 1
            return local.read_bytes()
        deadline = time.monotonic() + self.timeout
        retried_auth = False
        for _ in range(MAX_REDIRECTS + 1):
            if not self.is_allowed(url):
                raise ImageFetchError(
                    f"refusing to fetch {url[:200]!r}: only the Label Studio host "
                    f"({self.label_studio_url or 'not configured'}) and TINYSAM_ALLOWED_HOSTS are allowed", 422)
            headers = self.auth.headers() if (self.auth is not None and self.is_label_studio(url)) else {}
            status, location, body = self._get(url, headers, deadline)
            if status == 401 and headers and not retried_auth and self.auth is not None:
                retried_auth = True  # an access token can expire between refresh and use
                self.auth.invalidate()
                continue
            if status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            if status != 200:
                code = 404 if status == 404 else 502
                raise ImageFetchError(f"fetching {url[:200]!r} failed with HTTP {status}", code)
            self.fetches += 1
            return body
        raise ImageFetchError(f"too many redirects fetching {value[:200]!r}", 502)

    def _get(self, url: str, headers: dict, deadline: float) -> tuple[int, str | None, bytes]:
        try:
            with self.client.stream("GET", url, headers=headers) as resp:
                if resp.status_code != 200:
                    return resp.status_code, resp.headers.get("location"), b""
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageFetchError(f"image at {url[:200]!r} is {declared} bytes; the limit is "
                                          f"{self.max_bytes} (TINYSAM_MAX_IMAGE_MB)")
                chunks, total = [], 0
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ImageFetchError(f"image at {url[:200]!r} exceeds the {self.max_bytes} byte limit "
                                              "(TINYSAM_MAX_IMAGE_MB)")
                    if time.monotonic() > deadline:
                        raise ImageFetchError(f"fetching {url[:200]!r} took longer than {self.timeout:g} s "
                                              "(TINYSAM_FETCH_TIMEOUT)", 504)
                    chunks.append(chunk)
                return 200, None, b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise ImageFetchError(f"fetching {url[:200]!r} timed out after {self.timeout:g} s", 504) from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"fetching {url[:200]!r} failed: {type(exc).__name__}: {exc}", 502) from exc


_PROCESS_FETCHERS: dict[TaskImageLoader, ImageFetcher] = {}
_PROCESS_FETCHERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class TaskImageLoader:
    """Reads task images on other machines (Ray cluster nodes) with the same rules as the backend: the Label
    Studio host with its token, TINYSAM_ALLOWED_HOSTS, size and time limits, LOCAL_FILES_DOCUMENT_ROOT when
    set (then it must be mounted at the same path on every node).

    Picklable: it carries settings, not a connection; each process opens one fetcher per loader and reuses it
    (connection pool, refreshed access token). Holds the API key: send it only to machines you trust with it.
    """

    label_studio_url: str
    api_key: str
    allowed_hosts: tuple[str, ...] = ()
    local_files_root: str = ""
    max_bytes: int = 64 * 1024 * 1024
    timeout: float = 30.0

    @classmethod
    def like(cls, fetcher: ImageFetcher) -> TaskImageLoader:
        """A loader that fetches as `fetcher` does."""
        return cls(fetcher.label_studio_url, fetcher.auth.api_key if fetcher.auth is not None else "",
                   fetcher.allowed_hosts, str(fetcher.local_files_root or ""), fetcher.max_bytes, fetcher.timeout)

    def fetcher(self) -> ImageFetcher:
        with _PROCESS_FETCHERS_LOCK:
            fetcher = _PROCESS_FETCHERS.get(self)
            if fetcher is None:
                fetcher = _PROCESS_FETCHERS[self] = ImageFetcher(
                    self.label_studio_url, self.api_key, allowed_hosts=self.allowed_hosts,
                    local_files_root=self.local_files_root, max_bytes=self.max_bytes, timeout=self.timeout)
            return fetcher

    def __call__(self, url: str) -> np.ndarray:
        """RGB uint8 pixels of the image at a resolved task image URL; OSError (download refused or failed)
        or ImageError (not a readable image) say why not."""
        try:
            data = self.fetcher().fetch(url)
        except ImageFetchError as exc:
            raise OSError(str(exc)) from exc
        return load_image(data, name=url[:200])
