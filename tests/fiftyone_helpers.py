"""A private FiftyOne environment for the test session: its own mongod on a temporary directory, its own
plugins, model-zoo and embedding-store directories. Must run before `fiftyone` is imported (FiftyOne reads its config at
import time), so test modules call `fiftyone_env()` from a fixture and import fiftyone afterwards."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "tinysam_kit" / "integrations" / "fiftyone" / "plugin"
ZOO_DIR = REPO / "tinysam_kit" / "integrations" / "fiftyone" / "zoo"
PLUGIN_URI = "@tinysam-kit/tinysam"

_ENV: dict | None = None


def mongod_path() -> Path | None:
    spec = importlib.util.find_spec("fiftyone")  # locating the package does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "db" / "bin" / "mongod"
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, root: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(root, ignore_errors=True)


def fiftyone_env() -> dict:
    """Start (once per process) the private database and point FiftyOne at it; returns the env vars
    subprocesses (delegated worker, App server) need to see the same database and plugin."""
    global _ENV
    if _ENV is not None:
        return _ENV
    if "fiftyone" in sys.modules and not os.environ.get("TINYSAM_FO_TEST_ROOT"):
        pytest.fail("fiftyone was imported before the test database was configured")
    mongod = mongod_path()
    if mongod is None:
        pytest.skip("FiftyOne or its database binary is not installed (run .ci/setup_fiftyone.sh)")
    root = Path(tempfile.mkdtemp(prefix="tinysam-fo-"))
    (root / "db").mkdir()
    plugins = root / "plugins" / "@tinysam-kit"
    plugins.mkdir(parents=True)
    (plugins / "tinysam").symlink_to(PLUGIN_DIR, target_is_directory=True)
    port = free_port()
    proc = subprocess.Popen(
        [str(mongod), "--dbpath", str(root / "db"), "--port", str(port), "--bind_ip", "127.0.0.1",
         "--logpath", str(root / "mongod.log"), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    atexit.register(_stop, proc, root)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (root / "mongod.log").read_text()[-2000:] if (root / "mongod.log").exists() else ""
                pytest.fail(f"mongod did not start: {log}")
            time.sleep(0.2)
    env = {
        "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}",
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DATABASE_NAME": "tinysam_tests",
        "FIFTYONE_PLUGINS_DIR": str(root / "plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(root / "zoo"),
        "FIFTYONE_CONFIG_PATH": str(root / "no-config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(root / "no-app-config.json"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS": "true",
        "TINYSAM_FO_TEST_ROOT": str(root),
        "TINYSAM_EMBEDDING_STORE": str(root / "embeddings"),  # never the user's store
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    os.environ.update(env)
    import fiftyone as fo

    assert fo.config.database_uri == env["FIFTYONE_DATABASE_URI"], "FiftyOne config was loaded too early"
    _ENV = {"root": root, "port": port, "env": env, "mongod": proc}
    return _ENV


def make_images(directory: Path, n: int, size=(96, 128), seed: int = 0) -> list[Path]:
    """Synthetic scenes: a few filled rectangles and discs on a textured background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = (rng.normal(120, 10, (h, w, 3))).clip(0, 255)
        for _ in range(3):
            color = rng.integers(0, 255, 3)
            if rng.random() < 0.5:
                x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
                img[y0 : y0 + rng.integers(15, h // 2), x0 : x0 + rng.integers(15, w // 2)] = color
            else:
                cx, cy, r = rng.integers(20, w - 20), rng.integers(20, h - 20), rng.integers(8, 20)
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = color
        path = directory / f"img_{i:03d}.png"
        Image.fromarray(img.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def demo_model_available() -> bool:
    from tinysam_kit.models.registry import MODELS, PACKAGE_WEIGHTS

    spec = MODELS.get("demo")
    return spec is not None and (PACKAGE_WEIGHTS / spec.filename).is_file()


def rasterise_polylines(polylines, width: int, height: int):
    """The filled polylines painted into a full-image bool canvas (the inverse of a Polylines output)."""
    import cv2
    import numpy as np

    canvas = np.zeros((height, width), dtype=np.uint8)
    for polyline in polylines:
        for shape in polyline.points:
            pts = np.round(np.asarray(shape, dtype=np.float64) * [width, height]).astype(np.int32)
            cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], 1)
    return canvas.astype(bool)


def polylines_iou(polylines, mask) -> float:
    """IoU of the rasterised polylines against `mask` with its holes filled (what polylines can express)."""
    import numpy as np
    from scipy.ndimage import binary_fill_holes

    filled = binary_fill_holes(mask)
    drawn = rasterise_polylines(polylines, mask.shape[1], mask.shape[0])
    union = np.logical_or(filled, drawn).sum()
    return float(np.logical_and(filled, drawn).sum() / union) if union else 1.0
