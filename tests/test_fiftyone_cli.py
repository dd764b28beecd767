"""`tinysam fiftyone prelabel` (the README's main job) and `tinysam fiftyone install-plugin`, run as real
commands against the test session's FiftyOne database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from fiftyone_helpers import PLUGIN_DIR, REPO, fiftyone_env, make_images

FAST = ["--points-per-side", "8", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def env():
    return {**os.environ, **fiftyone_env()["env"]}


def tinysam(env, *args, timeout=600):
    cmd = [sys.executable, "-m", "tinysam_kit.cli", "fiftyone", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_prelabel_creates_a_persistent_dataset_and_resumes(env, tmp_path, tiny_random_checkpoint):
    import fiftyone as fo

    images = make_images(tmp_path / "imgs", 3, seed=11)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    name = f"prelabel-{os.getpid()}"
    try:
        done = tinysam(env, "prelabel", str(tmp_path / "imgs"), "--dataset", name,
                       "--model", str(tiny_random_checkpoint), *FAST)
        assert done.returncode == 0, done.stderr
        assert "3 added" in done.stdout and "3 sample(s) segmented into 'tinysam'" in done.stdout
        assert "images/minute" in done.stdout
        assert "TinySAM → tinysam" in done.stderr  # the progress bar
        ds = fo.load_dataset(name)
        assert ds.persistent and len(ds) == 3 and len(ds.exists("tinysam")) == 3
        assert all(d.mask is not None for s in ds for d in s.tinysam.detections)
        before = {s.filepath: [d.confidence for d in s.tinysam.detections] for s in ds}

        # A new image in the folder: only it is added and segmented; the first three are left alone.
        shutil.copy(images[0], tmp_path / "imgs" / "copy.png")
        again = tinysam(env, "prelabel", str(tmp_path / "imgs"), "--dataset", name,
                        "--model", str(tiny_random_checkpoint), *FAST)
        assert again.returncode == 0, again.stderr
        assert "1 added" in again.stdout and "1 sample(s) segmented" in again.stdout
        assert "3 already done" in again.stdout
        ds.reload()
        assert len(ds) == 4 and len(ds.exists("tinysam")) == 4
        assert all(before[s.filepath] == [d.confidence for d in s.tinysam.detections]
                   for s in ds if s.filepath in before)

        changed = tinysam(env, "prelabel", str(tmp_path / "imgs"), "--dataset", name,
                          "--model", str(tiny_random_checkpoint), "--dense", *FAST)
        assert changed.returncode == 1 and "different settings (mode: 'hierarchical' → 'dense')" in changed.stderr
        assert "pass another --field, or --overwrite to replace it" in changed.stderr
        assert all(s.metadata is not None and s.metadata.width == 128 for s in ds)
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


@pytest.mark.slow
def test_prelabel_polylines(env, tmp_path, tiny_random_checkpoint):
    import fiftyone as fo

    make_images(tmp_path / "imgs", 2, seed=3)
    name = f"prelabel-polylines-{os.getpid()}"
    try:
        done = tinysam(env, "prelabel", str(tmp_path / "imgs"), "--dataset", name, "--field", "outlines",
                       "--polylines", "--model", str(tiny_random_checkpoint), "--no-progress", *FAST)
        assert done.returncode == 0, done.stderr
        ds = fo.load_dataset(name)
        assert ds.get_field("outlines").document_type is fo.Polylines and len(ds.exists("outlines")) == 2
        assert all(p.closed and p.filled for s in ds for p in s.outlines.polylines)
        assert ds.get_run_info("tinysam_outlines").config.serialize()["signature"]["output"] == "polylines"
        refused = tinysam(env, "prelabel", str(tmp_path / "imgs"), "--dataset", name, "--field", "outlines",
                          "--polylines", "--masks-dir", str(tmp_path / "masks"),
                          "--model", str(tiny_random_checkpoint), "--no-progress", *FAST)
        assert refused.returncode == 1 and "masks on disk apply to Detections" in refused.stderr
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


@pytest.mark.slow
def test_prelabel_offline_auto_unreadable_file(env, tmp_path):
    """`--offline` with `auto` uses the bundled demo model and says so; an unreadable image is reported once
    (its path once) and tagged, the rest is segmented."""
    import fiftyone as fo

    make_images(tmp_path / "imgs", 1, seed=4)
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"not a png")
    name = f"prelabel-offline-{os.getpid()}"
    home = {**env, "TINYSAM_HOME": str(tmp_path / "home")}  # no official weights there
    try:
        done = tinysam(home, "prelabel", str(tmp_path / "imgs"), "--dataset", name, "--model", "auto", "--offline",
                       "--points-per-side", "8")
        assert done.returncode == 1, done.stderr
        assert "note:" in done.stderr and done.stderr.count("TINYSAM_OFFLINE is set") == 1  # said once
        assert "model: demo (the bundled demo model" in done.stdout
        failed = [line for line in done.stderr.splitlines() if "failed:" in line]
        assert len(failed) == 1 and failed[0].startswith(f"  failed: {broken}: cannot decode image"), failed
        ds = fo.load_dataset(name)
        assert ds.match_tags("tinysam_failed").values("filepath") == [str(broken.resolve())]
        config = ds.get_run_info("tinysam_tinysam").config.serialize()
        assert config["model"] == "demo" and config["model_requested"] == "auto" and config["model_note"]
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


@pytest.mark.slow
def test_prelabel_bad_input(env, tmp_path):
    missing = tinysam(env, "prelabel", str(tmp_path / "nope"), "--dataset", "x")
    assert missing.returncode == 2 and "nope: no such file or directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = tinysam(env, "prelabel", str(tmp_path / "empty"), "--dataset", "x")
    assert empty.returncode == 2 and "no images" in empty.stderr


@pytest.mark.slow
def test_install_plugin_links_into_the_plugins_dir(env, tmp_path):
    first = tinysam(env, "install-plugin", "--plugins-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    link = tmp_path / "@tinysam-kit" / "tinysam"
    assert link.is_symlink() and link.resolve() == PLUGIN_DIR
    assert "already installed" in tinysam(env, "install-plugin", "--plugins-dir", str(tmp_path)).stdout
    copy = tinysam(env, "install-plugin", "--plugins-dir", str(tmp_path), "--copy")
    assert copy.returncode == 1 and "--force" in copy.stderr
    forced = tinysam(env, "install-plugin", "--plugins-dir", str(tmp_path), "--copy", "--force")
    assert forced.returncode == 0 and (link / "fiftyone.yml").is_file() and not link.is_symlink()
    # FiftyOne itself finds the installed copy.
    listed = subprocess.run([sys.executable, "-c", "import fiftyone.plugins as p; "
                             "print([x.name for x in p.list_plugins()])"],
                            env={**env, "FIFTYONE_PLUGINS_DIR": str(tmp_path)}, capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert "@tinysam-kit/tinysam" in listed.stdout, listed.stderr


@pytest.mark.slow
def test_prelabel_in_worker_processes_writes_what_one_process_writes(env, tmp_path):
    """`--workers 2`: two model processes compute, this process alone writes the database; the labels equal a
    one-process run's, an unreadable file is tagged, and a re-run resumes."""
    import fiftyone as fo
    import numpy as np

    make_images(tmp_path / "imgs", 5, seed=21)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG but not really")
    common = ["prelabel", str(tmp_path / "imgs"), "--model", "demo", "--threads", "1", "--points-per-side", "8"]
    names = [f"workers-{n}-{os.getpid()}" for n in (1, 2)]
    try:
        one = tinysam(env, *common, "--dataset", names[0], "--workers", "1")
        two = tinysam(env, *common, "--dataset", names[1], "--workers", "2")
        assert one.returncode == two.returncode == 1, two.stderr  # the broken file
        assert "2 model processes" in two.stdout and "5 sample(s) segmented" in two.stdout
        a, b = fo.load_dataset(names[0]), fo.load_dataset(names[1])
        want = dict(zip(a.values("filepath"), a.values("tinysam")))
        got = dict(zip(b.values("filepath"), b.values("tinysam")))
        assert sorted(want) == sorted(got)
        compared = 0
        for path, dets in want.items():
            if dets is None:
                assert got[path] is None and path.endswith("broken.png")
                continue
            assert len(dets.detections) == len(got[path].detections)
            for d, e in zip(dets.detections, got[path].detections):
                assert d.confidence == e.confidence and np.array_equal(d.mask, e.mask)
                assert np.allclose(d.bounding_box, e.bounding_box)
                compared += 1
        assert compared >= 5
        assert len(b.match_tags("tinysam_failed")) == 1 and len(b.exists("metadata")) == 5
        again = tinysam(env, *common, "--dataset", names[1], "--workers", "2")
        assert "0 sample(s) segmented" in again.stdout and "5 already done" in again.stdout
    finally:
        for name in names:
            if fo.dataset_exists(name):
                fo.delete_dataset(name)
