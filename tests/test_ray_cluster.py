"""`tinysam everything --ray` on a real two-node Ray cluster (head + worker in a loopback-only namespace):
the same files as the single-process command, exactly once under a worker-node kill, corrupt files reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray_helpers import LoopbackCluster, ray_missing_reason

pytestmark = pytest.mark.slow

REASON = ray_missing_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

TINYSAM = str(Path(sys.executable).parent / "tinysam")
FAST = ["--model", "demo", "--points-per-side", "8", "--threads", "1"]
N_IMAGES = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Small images with shapes (two in a subfolder) and one corrupt file."""
    d = tmp_path_factory.mktemp("ray_images")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        img = np.full((80 + 8 * i, 112, 3), 30, np.uint8)
        img[8:56, 6 + 4 * i: 80] = rng.integers(100, 255, 3)
        img[44:76, 60:108] = rng.integers(100, 255, 3)
        Image.fromarray(img).save(d / ("sub" if i % 4 == 3 else "") / f"im{i}.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG not really")
    return d


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = subprocess.run([TINYSAM, "everything", str(folder), "--out", str(out), *FAST],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # the corrupt file
    return out


@pytest.fixture(scope="module")
def cluster():
    with LoopbackCluster(workers=[1], head_cpus=1) as c:
        yield c


def comparable(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc.get("info", {}).get("stats", {}).pop("seconds", None)
    return doc


def assert_same_outputs(ray_out: Path, single_out: Path) -> None:
    names = sorted(p.name for p in single_out.iterdir())
    assert sorted(p.name for p in ray_out.iterdir()) == names  # no .tmp leftovers, nothing extra
    for name in names:
        if name.endswith(".json"):
            assert comparable(json.loads((ray_out / name).read_text())) == \
                comparable(json.loads((single_out / name).read_text())), name
        else:
            assert np.array_equal(np.asarray(Image.open(ray_out / name)), np.asarray(Image.open(single_out / name)))


def test_ray_run_equals_single_process_and_reports_corrupt_file(cluster, folder, single, tmp_path):
    out = tmp_path / "ray"
    result = cluster.run([TINYSAM, "everything", str(folder), "--out", str(out), *FAST, "--ray", cluster.address],
                         timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "corrupt.png" in result.stderr and "1 image(s) failed" in result.stderr
    assert f"ray: {N_IMAGES} image(s) done" in result.stderr
    assert_same_outputs(out, single)
    merged = json.loads((out / "annotations.json").read_text())
    assert len(merged["images"]) == N_IMAGES and merged["annotations"]


def test_worker_node_killed_midway_then_rerun_is_exactly_once(cluster, folder, single, tmp_path):
    out = tmp_path / "ray"
    args = [TINYSAM, "everything", str(folder), "--out", str(out), *FAST, "--ray", cluster.address]
    driver = subprocess.Popen(cluster.netns_prefix() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cluster.env)
    deadline = time.monotonic() + 180
    while len(list(out.glob("*.json"))) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    raylets = cluster.raylet_pids(1)
    assert raylets, "the worker node's raylet is not running"
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)
    try:
        _, first_err = driver.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # the run may wait for lost capacity; a re-run finishes the work
        driver.kill()
        _, first_err = driver.communicate()
    assert not list(out.glob("*.tmp"))
    for path in out.glob("*.json"):  # whatever was written is whole
        json.loads(path.read_text())
    done_before = {p.name for p in out.glob("*.json") if p.name != "annotations.json"}
    assert len(done_before) >= 2, first_err[-3000:]

    rerun = cluster.run(args, timeout=300)
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # only the corrupt file fails
    if len(done_before) < N_IMAGES:
        assert f"{len(done_before)} image(s) already done" in rerun.stderr
    assert_same_outputs(out, single)
    merged = json.loads((out / "annotations.json").read_text())
    assert len(merged["images"]) == len({i["file_name"] for i in merged["images"]}) == N_IMAGES
