"""`tinysam everything --workers N`: N model processes on one machine write the same files as one process;
a killed worker loses only the images it held (reported), and a re-run completes them."""

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

from tinysam_kit.cli import main
from tinysam_kit.inference.batch import (
    CocoFolderSink,
    WorkerError,
    auto_workers,
    coco_key,
    run_everything_workers,
)
from tinysam_kit.inference.policy import EngineOptions

TINYSAM = str(Path(sys.executable).parent / "tinysam")
LOOSE = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--points-per-side", "8"]


def make_folder(directory: Path, n: int, size: tuple[int, int] = (48, 64)) -> Path:
    rng = np.random.default_rng(0)
    (directory / "sub").mkdir(parents=True)
    for i in range(n):
        img = np.full((size[0] + 8 * (i % 3), size[1], 3), 30, np.uint8)
        img[size[0] // 5: size[0] * 3 // 5, 10 + i % 5 * 5: size[1] * 2 // 3] = rng.integers(100, 255, 3)
        Image.fromarray(img).save(directory / ("sub" if i % 4 == 3 else "") / f"im{i:02d}.png")
    return directory


def comparable(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc.get("info", {}).get("stats", {}).pop("seconds", None)  # the per-image timing differs between any runs
    return doc


def assert_same_outputs(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # nothing missing, nothing extra, no .tmp
    assert (out / "annotations.json").read_bytes() == (reference / "annotations.json").read_bytes()
    for name in names:
        if name.endswith(".json"):
            assert comparable(out / name) == comparable(reference / name), name
        else:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_auto_workers_rule():
    plenty = 64 << 30  # bytes of memory available
    assert auto_workers(1000, device="cuda", cores=16, memory=plenty) == 1  # a GPU batches in one process
    assert auto_workers(3, device="cpu", cores=2, memory=plenty) == 1  # small folders: start-up would cost more
    assert auto_workers(15, device="cpu", cores=2, memory=plenty) == 1
    assert auto_workers(16, device="cpu", cores=2, memory=plenty) == 2
    assert auto_workers(1000, device="cpu", cores=8, threads=2, memory=plenty) == 4
    assert auto_workers(1000, device="cpu", cores=1, memory=plenty) == 1
    assert auto_workers(1000, device="cpu", cores=64, memory=6 << 30) == 6  # one per GiB available


def test_workers_write_the_files_of_one_process(tmp_path, tiny_random_checkpoint, capsys):
    folder = make_folder(tmp_path / "images", 6)
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    common = [str(folder), "--model", str(tiny_random_checkpoint), *LOOSE, "--threads", "1"]
    assert main(["everything", *common, "--out", str(tmp_path / "one"), "--workers", "1"]) == 1
    one = capsys.readouterr()
    assert main(["everything", *common, "--out", str(tmp_path / "two"), "--workers", "2"]) == 1
    two = capsys.readouterr()
    assert_same_outputs(tmp_path / "two", tmp_path / "one")
    assert two.out == one.out.replace(str(tmp_path / "one"), str(tmp_path / "two"))  # the same summary
    failures = failure_list(two.err)
    assert failures == failure_list(one.err)
    assert len(failures) == 1 and "corrupt.png" in failures[0] and "Error" in failures[0]  # with its reason


class FullDiskSink(CocoFolderSink):
    def write(self, key, result):
        raise OSError("No space left on device")


def test_a_failing_sink_stops_the_run_with_the_workers_error(tmp_path, tiny_random_checkpoint):
    folder = make_folder(tmp_path / "images", 3)
    jobs = [(coco_key(p, folder), p) for p in sorted(folder.rglob("*.png"))]
    options = EngineOptions(str(tiny_random_checkpoint), device="cpu", threads=1)
    with pytest.raises(WorkerError, match="No space left on device"):
        list(run_everything_workers(options, jobs, FullDiskSink(tmp_path / "out", folder), workers=2,
                                    points_per_side=4))


def test_a_model_that_fails_to_load_in_the_workers_is_the_one_process_error(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", 2)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    common = ["everything", str(folder), "--out", str(tmp_path / "o"), "--model", str(bad)]
    assert main([*common, "--workers", "1"]) == 2
    one = capsys.readouterr().err.splitlines()[-1]
    assert main([*common, "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == one and one.startswith("error: ") and "a worker process failed" in err


def test_bad_workers_value_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["everything", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    assert exc.value.code == 2 and "--workers must be a positive integer" in capsys.readouterr().err


def failure_list(stderr: str) -> list[str]:
    """The lines listing failed images, after the summary's "N image(s) failed:"."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("image(s) failed:"))
    return lines[start + 1:]


def worker_pids(parent: int) -> list[int]:
    """The multiprocessing workers among `parent`'s children (not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"multiprocessing-fork" in cmdline or b"spawn_main" in cmdline:
                pids.append(int(pid))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_killed_worker_loses_only_its_images_and_a_rerun_completes_them(tmp_path, tiny_random_checkpoint):
    n = 24
    folder = make_folder(tmp_path / "images", n, size=(240, 320))
    args = [TINYSAM, "everything", str(folder), "--model", str(tiny_random_checkpoint), *LOOSE, "--threads", "1"]
    reference = tmp_path / "reference"
    done = subprocess.run([*args, "--out", str(reference), "--workers", "1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "out"
    run = subprocess.Popen([*args, "--out", str(out), "--workers", "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.json")):  # mid-run: after the first image is written
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before any worker was killed"
            time.sleep(0.01)
        victim = worker_pids(run.pid)[0]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, stderr
    lost = failure_list(stderr)
    assert lost and all(f"pid {victim}" in line and "SIGKILL" in line and "run again" in line for line in lost)
    written = {p.stem for p in out.glob("*.json") if p.name != "annotations.json"}
    assert len(written) + len(lost) == n  # the other worker did everything else
    for p in out.glob("*.json"):
        json.loads(p.read_text())  # every file whole
    merged = json.loads((out / "annotations.json").read_text())
    assert len(merged["images"]) == len(written) and f"{len(written)} image(s)" in stdout

    again = subprocess.run([*args, "--out", str(out), "--workers", "2"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{len(written)} image(s) already done" in again.stderr
    for p in out.glob("*.tmp"):  # a write the kill cut short; the re-run wrote that file whole beside it
        p.unlink()
    assert_same_outputs(out, reference)
