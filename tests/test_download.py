"""Weights download against a real HTTP server on 127.0.0.1: success, checksum mismatch, interruption + resume."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tinysam_kit.models import registry
from tinysam_kit.models.registry import (
    ChecksumError,
    ModelNotAvailableError,
    ModelSpec,
    download_file,
    load_model_with_info,
    resolve_weights,
)


class FileServer:
    """Serves one payload with Range support; can cut the first full transfer after `cut_after` bytes."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut_after: int | None = None
        self.requests: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                data, status, start = server.payload, 200, 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.cut_after is not None and not rng:
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # a dropped connection mid-transfer
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights.pth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture()
def payload(tiny_random_checkpoint):
    return tiny_random_checkpoint.read_bytes()


def test_download_success_and_checksum(tmp_path, payload):
    sha = hashlib.sha256(payload).hexdigest()
    with FileServer(payload) as srv:
        path = download_file(srv.url, tmp_path / "w.pth", sha, progress=False)
    assert path.read_bytes() == payload
    assert not (tmp_path / "w.pth.part").exists()


def test_checksum_mismatch_leaves_nothing(tmp_path, payload):
    with FileServer(payload) as srv, pytest.raises(ChecksumError, match="does not match"):
        download_file(srv.url, tmp_path / "w.pth", "0" * 64, progress=False)
    assert not (tmp_path / "w.pth").exists()
    assert not (tmp_path / "w.pth.part").exists()


def test_interrupted_transfer_resumes(tmp_path, payload):
    sha = hashlib.sha256(payload).hexdigest()
    with FileServer(payload) as srv:
        srv.cut_after = len(payload) // 3
        with pytest.raises(Exception):  # noqa: B017 - the exact error depends on where the socket dropped
            download_file(srv.url, tmp_path / "w.pth", sha, progress=False)
        assert not (tmp_path / "w.pth").exists()
        part = tmp_path / "w.pth.part"
        kept = part.stat().st_size
        assert 0 < kept <= len(payload) // 3
        srv.cut_after = None
        download_file(srv.url, tmp_path / "w.pth", sha, progress=False)
        assert srv.requests[-1] == f"bytes={kept}-"
    assert (tmp_path / "w.pth").read_bytes() == payload


def test_registered_model_downloads_into_cache_and_loads(tmp_path, monkeypatch, payload, tiny_random_checkpoint):
    import json

    from tinysam_kit.models.config import ModelConfig

    config = ModelConfig.from_dict(json.loads(tiny_random_checkpoint.with_name(
        tiny_random_checkpoint.name + ".json").read_text())["config"])
    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path / "cache"))
    with FileServer(payload) as srv:
        spec = ModelSpec("test-model", "test.pth", srv.url, hashlib.sha256(payload).hexdigest(), config)
        monkeypatch.setitem(registry.MODELS, spec.name, spec)
        model, name, sha = load_model_with_info("test-model", device="cpu")
    assert (tmp_path / "cache" / "test.pth").read_bytes() == payload
    assert name == "test-model" and sha == spec.sha256
    assert isinstance(model.image_encoder.img_size, int)
    # Loaded again offline from the cache (server is gone).
    model2, _, _ = load_model_with_info("test-model", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_unpublished_hash_is_recorded_and_enforced(tmp_path, monkeypatch, payload):
    from tinysam_kit.models.config import TINYSAM_VIT_T

    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path))
    with FileServer(payload) as srv:
        spec = ModelSpec("tofu", "tofu.pth", srv.url, None, TINYSAM_VIT_T)
        monkeypatch.setitem(registry.MODELS, spec.name, spec)
        path, _ = resolve_weights("tofu")
    assert (tmp_path / "tofu.pth.sha256").read_text().strip() == hashlib.sha256(payload).hexdigest()
    path.write_bytes(payload[:-1] + b"x")  # tampered after the first download
    with pytest.raises(ChecksumError):
        resolve_weights("tofu")


def test_offline_error_names_file_and_destination(tmp_path, monkeypatch):
    from tinysam_kit.models.config import TINYSAM_VIT_T

    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path))
    spec = ModelSpec("offline", "offline.pth", "http://127.0.0.1:9/offline.pth", None, TINYSAM_VIT_T)
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    with pytest.raises(ModelNotAvailableError) as err:
        resolve_weights("offline")
    msg = str(err.value)
    assert "http://127.0.0.1:9/offline.pth" in msg and str(tmp_path / "offline.pth") in msg


def test_unknown_model_name():
    with pytest.raises(ModelNotAvailableError, match="neither a registered model"):
        load_model_with_info("no-such-model-or-file")
