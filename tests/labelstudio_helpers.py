"""Shared helpers of the Label Studio tests: a stand-in Label Studio file/auth server, a uvicorn runner,
payload loading. Real HTTP on 127.0.0.1 throughout; every server is stopped by whoever started it."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSAM_SHARED_DIR", REPO.parent / "shared"))
LS_PAYLOADS = SHARED / "ls_payloads"

# image sizes of the files named in the captured payloads (from the stored answers' original_width/height)
PAYLOAD_IMAGE_SIZES = {"upload_c.png": (512, 384), "scene_a.png": (640, 480), "scene_b.jpg": (800, 600)}


@pytest.fixture(scope="module", autouse=True)
def private_embedding_store(tmp_path_factory):
    """An embedding store of the test module's own (TINYSAM_EMBEDDING_STORE), for the backends made in it and the
    processes it starts: nothing is read from or left in the user's store. Autouse where imported."""
    folder = tmp_path_factory.mktemp("embeddings")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYSAM_EMBEDDING_STORE", str(folder))
        yield folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured background with a few solid shapes: something for a model to segment."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                    np.full_like(xx, 90)], -1).astype(np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = (220, 30, 30)
    cy, cx, r = height * 2 // 3, width * 2 // 3, min(width, height) // 6
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (30, 30, 220)
    return img


def encode_image(arr: np.ndarray, fmt: str = "PNG", exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, format=fmt, exif=exif)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def make_jwt(claims: dict) -> str:
    def seg(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg(claims)}.{seg({'sig': 'not-checked'})}"


class FakeLabelStudio:
    """Serves task images the way Label Studio does (uploads, local files) behind its token schemes.

    Legacy tokens are accepted as `Token <key>`; a personal access token (a JWT refresh token) is only
    accepted at /api/token/refresh/, which hands out short-lived `Bearer` access tokens.
    """

    def __init__(self, images: dict[str, bytes], legacy_token: str | None = None,
                 personal_token: str | None = None, access_ttl: float = 300.0, redirects: dict | None = None):
        self.images = images  # key: path + query as requested, e.g. "/data/upload/1/x.png"
        self.legacy_token = legacy_token
        self.personal_token = personal_token
        self.access_ttl = access_ttl
        self.redirects = redirects or {}
        self.access_tokens: dict[str, float] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.refreshes = 0
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - http.server naming
                outer.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path != "/api/token/refresh/":
                    return self._send(404)
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    refresh = json.loads(self.rfile.read(length)).get("refresh")
                except ValueError:
                    return self._send(400)
                if not outer.personal_token or refresh != outer.personal_token:
                    return self._send(401, b'{"detail": "Token is invalid"}')
                outer.refreshes += 1
                exp = time.time() + outer.access_ttl
                access = make_jwt({"token_type": "access", "exp": exp, "jti": outer.refreshes})
                outer.access_tokens[access] = exp
                return self._send(200, json.dumps({"access": access}).encode())

            def do_GET(self):  # noqa: N802
                auth = self.headers.get("Authorization")
                outer.requests.append(("GET", self.path, auth))
                if outer.delay:
                    time.sleep(outer.delay)
                if self.path in outer.redirects:
                    return self._send(302, headers={"Location": outer.redirects[self.path]})
                if not outer._authorised(auth):
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                body = outer.images.get(self.path)
                if body is None:
                    return self._send(404, b'{"detail": "Not found."}')
                return self._send(200, body, "image/png")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _authorised(self, auth: str | None) -> bool:
        if self.legacy_token is None and self.personal_token is None:
            return True
        if auth is None:
            return False
        if self.legacy_token and auth == f"Token {self.legacy_token}":
            return True
        if auth.startswith("Bearer "):
            exp = self.access_tokens.get(auth[7:])
            return exp is not None and exp > time.time()
        return False

    def __enter__(self) -> FakeLabelStudio:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def payload_images() -> dict[str, bytes]:
    """Images for every URL in the captured payloads, sized as Label Studio reported them."""
    out = {}
    for n, (name, (w, h)) in enumerate(PAYLOAD_IMAGE_SIZES.items()):
        data = encode_image(synthetic_image(w, h, seed=n), "JPEG" if name.endswith(".jpg") else "PNG")
        out[f"/data/local-files/?d=images/{name}"] = data
        for project in range(1, 6):
            for prefix in ("294aab4c", "0a98454b", "8a645855"):
                out[f"/data/upload/{project}/{prefix}-{name}"] = data
    return out


def image_size_for(url: str) -> tuple[int, int]:
    for name, size in PAYLOAD_IMAGE_SIZES.items():
        if url.endswith(name):
            return size
    raise KeyError(url)


def load_payloads(folder: str) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted((LS_PAYLOADS / folder).glob("*.json"))]


class UvicornThread:
    """uvicorn serving an ASGI app on 127.0.0.1 in a background thread of this process."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def ls_venv() -> Path:
    """The Label Studio virtual environment made by .ci/setup_labelstudio.sh."""
    return Path(os.environ.get("TINYSAM_LS_VENV", "/opt/tinysam-ls/venv"))


def ls_python() -> str | None:
    python = ls_venv() / "bin" / "python"
    return str(python) if python.is_file() and (ls_venv() / "bin" / "label-studio").is_file() else None
