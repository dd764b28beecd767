"""FiftyOne and Label Studio as sinks of the Ray pipeline, on a real Ray cluster (head + worker node in a
loopback-only namespace; the host's database and Label Studio reach the namespace through port relays):

* `tinysam fiftyone prelabel --ray` writes the labels a run in one process writes (masks, scores, metadata,
  failure tags, run summary), and a re-run skips every sample;
* `tinysam ls-prelabel --ray` pushes the predictions the local command pushes, the nodes downloading the
  task images from Label Studio with its token, and a re-run pushes nothing twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from fiftyone_helpers import demo_model_available, fiftyone_env, make_images
from ray_helpers import LoopbackCluster, ray_missing_reason
from test_ls_e2e import TOKEN, _project, label_studio  # noqa: F401 - the real Label Studio fixture

pytestmark = pytest.mark.slow

REASON = ray_missing_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

TINYSAM = str(Path(sys.executable).parent / "tinysam")
MODEL = ["--model", "demo", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def demo_model():
    assert demo_model_available(), "the bundled demo model's weights ship with the package"


@pytest.fixture(scope="module")
def fo_env():
    return fiftyone_env()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    return {"TINYSAM_EMBEDDING_STORE": str(tmp_path_factory.mktemp("embeddings"))}


@pytest.fixture(scope="module")
def cluster(fo_env):
    with LoopbackCluster(workers=[1], head_cpus=1) as c:
        c.forward_port(fo_env["port"])  # the test database, at the same address inside the namespace
        yield c


def run_here(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


# ------------------------------------------------------------------------------------------- FiftyOne
def detections_by_path(dataset, field: str) -> dict:
    return dict(zip(dataset.values("filepath"), dataset.values(field)))


def test_fiftyone_prelabel_on_ray_writes_what_the_local_run_writes(fo_env, cluster, store, tmp_path):
    import fiftyone as fo_api

    from tinysam_kit.integrations.fiftyone.runner import FAILED_TAG, load_summary

    folder = tmp_path / "images"
    make_images(folder, 5, size=(96, 128), seed=3)
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    env = {**fo_env["env"], **store}
    base = [TINYSAM, "fiftyone", "prelabel", str(folder), "--points-per-side", "8", *MODEL]

    local = run_here(base + ["--dataset", "sinks_local"], env)
    assert local.returncode == 1, local.stderr  # the broken file
    remote = cluster.run(base + ["--dataset", "sinks_ray", "--ray", cluster.address], timeout=400, env=env)
    assert remote.returncode == 1, remote.stdout + remote.stderr
    assert "5 sample(s) segmented" in remote.stdout and "broken.png" in remote.stderr

    a, b = fo_api.load_dataset("sinks_local"), fo_api.load_dataset("sinks_ray")
    want, got = detections_by_path(a, "tinysam"), detections_by_path(b, "tinysam")
    assert sorted(want) == sorted(got)
    masks = 0
    for path, dets in want.items():
        if path.endswith("broken.png"):
            assert dets is None and got[path] is None
            continue
        theirs = got[path].detections
        assert len(theirs) == len(dets.detections) > 0, path
        for d, e in zip(dets.detections, theirs):
            assert (d.label, d.confidence, d["predicted_iou"], d["area"]) == (e.label, e.confidence, e["predicted_iou"],
                                                                              e["area"])
            assert np.allclose(d.bounding_box, e.bounding_box)
            assert np.array_equal(d.mask, e.mask)
            masks += 1
    assert masks >= 5
    size = {s.filepath: (s.metadata.width, s.metadata.height) for s in a if s.metadata is not None}
    assert size and size == {s.filepath: (s.metadata.width, s.metadata.height) for s in b if s.metadata is not None}
    assert [s.filepath for s in b.match_tags(FAILED_TAG)] == [str((folder / "broken.png").resolve())]
    summary = load_summary(b, "tinysam")
    assert summary["status"] == "completed_with_errors" and summary["processed"] == 5 and summary["model"] == "demo"
    assert b.get_run_info("tinysam_tinysam").config.parameters["ray_address"] == cluster.address

    again = cluster.run(base + ["--dataset", "sinks_ray", "--ray", cluster.address], timeout=400, env=env)
    assert "0 sample(s) segmented" in again.stdout and "5 already done" in again.stdout, again.stdout + again.stderr
    b.reload()
    assert sum(len(d.detections) for d in b.exists("tinysam").values("tinysam")) == masks  # nothing twice


def test_segment_everything_operator_runs_on_the_cluster(fo_env, cluster, store, tmp_path):
    """The App's *Segment everything* with a Ray address (as its delegated worker would run it, inside the
    cluster's namespace) writes what the operator writes in-process."""
    import fiftyone as fo_api
    from fiftyone.operators import execute_operator
    from fiftyone_helpers import PLUGIN_URI

    from tinysam_kit.integrations.fiftyone.runner import run_key_for

    dataset = fo_api.Dataset("sinks_operator", persistent=True)
    dataset.add_samples([fo_api.Sample(filepath=str(p)) for p in make_images(tmp_path / "op", 3, seed=5)],
                        progress=False)
    params = {"model": "demo", "threads": 1, "points_per_side": 8}
    operator = f"{PLUGIN_URI}/segment_everything"
    assert execute_operator(operator, dataset=dataset, params={**params, "label_field": "here"}).error is None
    script = ("import fiftyone as fo\nfrom fiftyone.operators import execute_operator\n"
              f"result = execute_operator({operator!r}, dataset=fo.load_dataset('sinks_operator'), "
              f"params={{**{params!r}, 'label_field': 'there', 'ray_address': {cluster.address!r}}})\n"
              "print('error:', result.error) if result.error else print('done')")
    result = cluster.run([sys.executable, "-c", script], timeout=400, env={**fo_env["env"], **store})
    assert result.returncode == 0 and "done" in result.stdout, result.stdout + result.stderr
    dataset.reload()
    assert dataset.get_run_info(run_key_for("there")).config.parameters["ray_address"] == cluster.address
    for here, there in zip(dataset.values("here"), dataset.values("there")):
        assert len(here.detections) == len(there.detections) > 0
        assert all(np.array_equal(a.mask, b.mask) and a.confidence == b.confidence
                   for a, b in zip(here.detections, there.detections))


def test_fiftyone_prelabel_refuses_ray_options_without_ray(fo_env, store, tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 1)
    result = run_here([TINYSAM, "fiftyone", "prelabel", str(folder), "--dataset", "sinks_opts", *MODEL,
                       "--batch-size", "4"], {**fo_env["env"], **store}, timeout=120)
    assert result.returncode == 2 and "--batch-size applies to --ray runs" in result.stderr


# ------------------------------------------------------------------------------------------ Label Studio
def test_ls_prelabel_on_ray_pushes_what_the_local_command_pushes(label_studio, cluster, store):  # noqa: F811
    ls = label_studio
    url = str(ls.base_url).rstrip("/")
    cluster.forward_port(urlsplit(url).port)  # nodes download the task images from Label Studio itself
    projects = {}
    for name in ("local", "ray"):
        pid, tasks = _project(ls, f"sinks-{name}", 3)
        ls.post(f"/api/projects/{pid}/import", json=[{"image": "/data/upload/999/missing.png"}]).raise_for_status()
        projects[name] = (pid, [t["id"] for t in tasks])
    base = [TINYSAM, "ls-prelabel", "--url", url, "--api-key", TOKEN, "--points-per-side", "8", "--min-area", "20",
            "--max-regions", "5", *MODEL]

    local = run_here(base + ["--project", str(projects["local"][0])], store)
    assert local.returncode == 1 and "missing.png" in local.stderr, local.stderr  # the task without an image
    remote = cluster.run(base + ["--project", str(projects["ray"][0]), "--ray", cluster.address], timeout=400,
                         env=store)
    assert remote.returncode == 1, remote.stdout + remote.stderr
    assert "3 predicted" in remote.stdout and "1 failed" in remote.stdout and "missing.png" in remote.stderr
    assert "ray: 3 image(s) done" in remote.stderr and "1 failed" in remote.stderr

    def predictions(name: str) -> list[dict]:
        pid, task_ids = projects[name]
        preds = ls.get("/api/predictions", params={"project": pid}).raise_for_status().json()
        by_task = {p["task"]: p for p in preds}
        assert sorted(by_task) == task_ids  # one per image task, none for the missing image
        return [by_task[t] for t in task_ids]

    for mine, theirs in zip(predictions("local"), predictions("ray")):
        assert mine["model_version"] == theirs["model_version"]
        assert mine["score"] == pytest.approx(theirs["score"])
        strip = [[{k: v for k, v in r.items() if k != "id"} for r in p["result"]] for p in (mine, theirs)]
        assert strip[0] == strip[1] and strip[0]

    again = cluster.run(base + ["--project", str(projects["ray"][0]), "--ray", cluster.address], timeout=400,
                        env=store)
    assert "0 predicted" in again.stdout and "3 already done" in again.stdout, again.stdout + again.stderr
    assert len(predictions("ray")) == 3
