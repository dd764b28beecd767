"""`tinysam everything s3://bucket/prefix/` against a real S3-compatible server (moto's standalone server on
127.0.0.1, started and stopped by PID here): a prefix, `--workers 2` and a Ray cluster write byte for byte the
files a run on a local copy of the same folder writes; a list object with a missing entry reports it and does
the rest; a re-run resumes; a missing bucket or prefix and an unknown scheme are one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

s3fs = pytest.importorskip("s3fs", reason="the cloud extra is not installed (pip install 'tinysam-kit[cloud]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra: pip install "
                                          "'tinysam-kit[dev]')")

from tinysam_kit.cli import main  # noqa: E402 - after the skips
from tinysam_kit.cli.common import storage_options  # noqa: E402
from tinysam_kit.data.images import ImageError  # noqa: E402
from tinysam_kit.data.object_store import ObjectLoader, read_object  # noqa: E402

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
BUCKET = "images"
SOURCE = f"s3://{BUCKET}/data/"
FAST = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--points-per-side", "8", "--threads", "1"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for this module, stopped by its PID."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.name}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def s3_env(endpoint):
    """This process and the workers it spawns reach the server through the usual AWS variables."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()  # no cached client pointing at a stopped server


def make_folder(directory: Path) -> Path:
    """Small images (a nested subfolder, names that sort differently as parts and as text), a corrupt file,
    a hidden file and a non-image."""
    rng = np.random.default_rng(0)
    names = ["im00.png", "im01.png", "sub/im02.png", "sub/deeper/im03.png", "a-x.png", "a/x.png"]
    for i, name in enumerate(names):
        img = np.full((48 + 8 * (i % 3), 64, 3), 30, np.uint8)
        img[10:30, 8 + 4 * i: 50] = rng.integers(100, 255, 3)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(directory / name)
    (directory / "sub" / "photo.jpg").write_bytes((REPO / "examples" / "images" / "shapes_0.png").read_bytes())
    (directory / "corrupt.png").write_bytes(b"\x89PNG not really")
    (directory / ".hidden.png").write_bytes((directory / "im00.png").read_bytes())
    (directory / "notes.md").write_text("not an image\n")
    return directory


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("local") / "data")


@pytest.fixture(scope="module")
def bucket(s3_env, folder):
    """The folder uploaded under s3://images/data/ (a local copy of the bucket: `folder`)."""
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe(f"{BUCKET}/data/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return fs


@pytest.fixture(scope="module")
def model(tiny_random_checkpoint) -> list[str]:
    return ["--model", str(tiny_random_checkpoint)]


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["everything", *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def local_out(folder, model, tmp_path_factory) -> Path:
    """The reference: the same command on the local copy."""
    out = tmp_path_factory.mktemp("local_out")
    assert main(["everything", str(folder), "--out", str(out), *model, *FAST, "--workers", "1"]) == 1  # corrupt
    return out


def untimed(data: bytes) -> bytes:
    return re.sub(rb'"seconds": [0-9.e+-]+', b'"seconds": 0', data)  # per-image timing differs between runs


def assert_same_files(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # nothing missing, nothing extra, no .tmp
    assert (out / "annotations.json").read_bytes() == (reference / "annotations.json").read_bytes()
    for name in names:
        assert untimed((out / name).read_bytes()) == untimed((reference / name).read_bytes()), name


def failures(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("image(s) failed:"))
    return [line.strip() for line in lines[start + 1:]]


def test_a_prefix_writes_the_files_of_a_local_copy_and_a_rerun_resumes(bucket, local_out, model, tmp_path,
                                                                      capsys):
    out = tmp_path / "s3"
    code, err = run([SOURCE, "--out", str(out), *model, *FAST, "--workers", "1"], capsys)
    assert code == 1, err
    assert len(failures(err)) == 1, err
    assert failures(err)[0].startswith(f"{SOURCE}corrupt.png: ImageError: {SOURCE}corrupt.png: cannot decode image")
    assert_same_files(out, local_out)
    merged = json.loads((out / "annotations.json").read_text())
    assert merged["annotations"]
    names = [i["file_name"] for i in merged["images"]]
    assert names == ["a/x.png", "a-x.png", "im00.png", "im01.png", "sub/deeper/im03.png", "sub/im02.png",
                     "sub/photo.jpg"]

    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "annotations.json"}
    code, err = run([SOURCE, "--out", str(out), *model, *FAST, "--workers", "1"], capsys)
    assert code == 1 and "7 image(s) already done" in err and len(failures(err)) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "annotations.json"} == written
    assert_same_files(out, local_out)


def test_two_worker_processes_read_the_bucket(bucket, local_out, model, tmp_path, capsys):
    out = tmp_path / "s3"
    code, err = run([SOURCE, "--out", str(out), *model, *FAST, "--workers", "2"], capsys)
    assert code == 1 and "2 workers" in err, err
    assert failures(err) and all("corrupt.png" in f for f in failures(err))
    assert_same_files(out, local_out)


def test_a_list_object_with_a_missing_entry(bucket, folder, model, tmp_path, capsys):
    bucket.pipe(f"{BUCKET}/lists/batch.lst", b"# tonight\n../data/im00.png\n\ns3://images/data/sub/deeper/im03.png\n"
                                             b"../data/gone.png\n../data/im00.png\n")
    local_list = folder.parent / "lists" / "batch.lst"
    local_list.parent.mkdir(exist_ok=True)
    local_list.write_text(f"../data/im00.png\n{folder / 'sub/deeper/im03.png'}\n../data/gone.png\n")
    local, remote = tmp_path / "local", tmp_path / "s3"
    code, err = run([str(local_list), "--out", str(local), *model, *FAST, "--no-preview"], capsys)
    assert code == 1 and "gone.png" in err
    code, err = run([f"s3://{BUCKET}/lists/batch.lst", "--out", str(remote), *model, *FAST, "--no-preview"], capsys)
    assert code == 1
    assert failures(err) == [f"{SOURCE}gone.png: ImageError: {SOURCE}gone.png: object does not exist"]
    assert sorted(p.name for p in remote.iterdir()) == ["annotations.json", "im00.json", "sub__deeper__im03.json"]
    assert_same_files(remote, local)


def test_clear_errors_for_sources_that_cannot_be_read(bucket, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    for source in ("s3://no-such-bucket/data/", f"s3://{BUCKET}/nothing/here/"):
        code, err = run([source, *out], capsys)
        assert code == 2 and err.strip() == f"error: {source}: no such object or prefix", err
    code, err = run([f"s3://{BUCKET}/lists/", *out], capsys)
    assert code == 2 and "no images found" in err
    code, err = run(["nosuchfs://bucket/key.png", *out], capsys)
    assert code == 2 and "fsspec has no filesystem for nosuchfs://" in err and len(err.strip().splitlines()) == 1
    code, err = run([str(tmp_path), "--storage-option", "anon=true", *out], capsys)
    assert code == 2 and "--storage-option applies to an object-storage source" in err
    code, err = run([SOURCE, "--storage-option", "anon", *out], capsys)
    assert code == 2 and "KEY=VALUE" in err
    # without the cloud extra: one line saying what to install
    script = ("import sys; sys.modules['s3fs'] = None; from tinysam_kit.cli import main; "
              f"sys.exit(main(['everything', '{SOURCE}', '--out', {str(tmp_path / 'o')!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pip install 'tinysam-kit[cloud]'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_object_reads_are_bounded_and_the_loader_pickles(bucket, folder):
    image = f"{SOURCE}im00.png"
    size = (folder / "im00.png").stat().st_size
    with pytest.raises(ImageError, match=rf"{size} bytes exceeds the limit of 100 bytes per object"):
        read_object(image, max_bytes=100)
    bucket.pipe(f"{BUCKET}/empty/e.png", b"")
    with pytest.raises(ImageError, match="object is empty"):
        read_object(f"s3://{BUCKET}/empty/e.png")
    loader = pickle.loads(pickle.dumps(ObjectLoader({"anon": False})))
    assert np.array_equal(loader(image), np.asarray(Image.open(folder / "im00.png").convert("RGB")))
    assert np.array_equal(loader(str(folder / "im00.png")), loader(image))  # local paths load as files
    assert storage_options(["anon=true", "client_kwargs.region_name=eu-west-1", "endpoint_url=http://h:1"]) == {
        "anon": True, "client_kwargs": {"region_name": "eu-west-1"}, "endpoint_url": "http://h:1"}


@pytest.mark.slow
def test_a_ray_cluster_reads_the_bucket(bucket, local_out, model, tmp_path):
    from ray_helpers import LoopbackCluster, ray_missing_reason

    reason = ray_missing_reason()
    if reason:
        pytest.skip(reason)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    # The nodes' own configuration points nowhere: the storage options given on the command line reach them.
    with LoopbackCluster(workers=[1], head_cpus=1, env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}) as cluster:
        cluster.forward_port(int(endpoint.rsplit(":", 1)[1]))  # the server, at the same address in the namespace
        out = tmp_path / "ray"
        result = cluster.run([str(VENV_BIN / "tinysam"), "everything", SOURCE, "--out", str(out), *model, *FAST,
                              "--ray", cluster.address, "--storage-option", f"endpoint_url={endpoint}"], timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ray: 7 image(s) done" in result.stderr and f"{SOURCE}corrupt.png" in result.stderr
    assert_same_files(out, local_out)
