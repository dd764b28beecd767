"""End to end against a real Label Studio 1.23 (own venv from .ci/setup_labelstudio.sh) and our backend
served by uvicorn, both on 127.0.0.1: smart clicks through Label Studio's interactive-annotating API,
"Retrieve predictions", stored annotations/predictions decoded back, and `tinysam ls-prelabel`."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from labelstudio_helpers import (
    UvicornThread,
    encode_image,
    free_port,
    ls_python,
    ls_venv,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
    synthetic_image,
)

from tinysam_kit.inference.encodings.labelstudio import rle_to_mask

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USER, PASSWORD = "admin@example.com", "tinysam-e2e"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # preset legacy token (the template was made with it)
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Object" background="#FF0000"/>
    <Label value="Background" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Object" smart="true" background="#FFAA00"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Background" background="#00FF00"/>
  </RectangleLabels>
</View>"""
SIZES = [(320, 240), (256, 320), (300, 200)]


def _model(tiny_random_checkpoint) -> tuple[str, dict]:
    """The trained demo model when it is present (meaningful masks), else the tiny random one."""
    try:
        from tinysam_kit.models.registry import MODELS, resolve_weights

        if "demo" in MODELS:
            resolve_weights("demo", download=False)
            return "demo", {}
    except Exception:  # noqa: BLE001 - any reason the demo model is unusable means: use the tiny one
        pass
    # random weights predict low IoUs: keep every candidate so everything-mode returns regions
    return str(tiny_random_checkpoint), {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    if ls_python() is None:
        pytest.skip(f"Label Studio is not installed in {ls_venv()} (run .ci/setup_labelstudio.sh)")
    work = tmp_path_factory.mktemp("label_studio")
    data = work / "data"
    template = ls_venv().parent / "template"
    if (template / "label_studio.sqlite3").is_file():
        shutil.copytree(template, data)  # already migrated: starts in seconds instead of minutes
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "ML_BLOCK_LOCAL_IP": "false",
           "SSRF_PROTECTION_ENABLED": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
           "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    log = open(work / "label_studio.log", "wb")
    proc = subprocess.Popen(
        [str(ls_venv() / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
         "-p", str(port), "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
         "--enable-legacy-api-token"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Token {TOKEN}"}, timeout=120)
    try:
        deadline = time.time() + 1200  # a fresh database migrates for minutes on a busy 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail("label-studio exited:\n" + (work / "label_studio.log").read_text()[-3000:])
            try:
                if client.get("/api/projects").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("label-studio did not come up:\n" + (work / "label_studio.log").read_text()[-3000:])
            time.sleep(1)
        yield client
    finally:
        client.close()
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and any child it started
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def backend_server(label_studio, tiny_random_checkpoint):
    from tinysam_kit.integrations.labelstudio import BackendSettings, create_app
    from tinysam_kit.integrations.labelstudio.backend import TinySamBackend

    model, overrides = _model(tiny_random_checkpoint)
    settings = BackendSettings.from_env({}, model=model, label_studio_url=str(label_studio.base_url).rstrip("/"),
                                        label_studio_api_key=TOKEN, points_per_side=8, min_region_area=20,
                                        max_regions=5, **overrides)
    backend = TinySamBackend(settings)
    with UvicornThread(create_app(settings, backend)) as server:
        yield server, backend
    backend.close()


def _project(ls: httpx.Client, title: str, n_images: int, config: str = CONFIG) -> tuple[int, list[dict]]:
    pid = ls.post("/api/projects", json={"title": title, "label_config": config}).raise_for_status().json()["id"]
    files = [(f"file{i}", (f"img{i}.png", encode_image(synthetic_image(*SIZES[i], seed=i)), "image/png"))
             for i in range(n_images)]
    ls.post(f"/api/projects/{pid}/import", files=files).raise_for_status()
    tasks = ls.get("/api/tasks", params={"project": pid, "page_size": 100}).raise_for_status().json()["tasks"]
    assert len(tasks) == n_images
    return pid, sorted(tasks, key=lambda t: t["id"])


def _kp(x, y, positive, w, h):
    return {"original_width": w, "original_height": h, "image_rotation": 0, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual", "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.6, "labels": ["Object"], "keypointlabels": ["Object"]}}


def _rect(x, y, bw, bh, w, h):
    return {"original_width": w, "original_height": h, "image_rotation": 0, "from_name": "rect", "to_name": "image",
            "type": "rectanglelabels", "origin": "manual",
            "value": {"x": x, "y": y, "width": bw, "height": bh, "rotation": 0, "rectanglelabels": ["Background"]}}


def test_smart_clicks_and_retrieved_predictions_round_trip(label_studio, backend_server):
    from tinysam_kit.data.images import load_image

    ls = label_studio
    server, backend = backend_server
    pid, tasks = _project(ls, "tinysam-e2e", 2)
    ml = ls.post("/api/ml", json={"url": server.url, "project": pid, "title": "TinySAM",
                                  "is_interactive": True}).raise_for_status().json()
    assert ml["state"] == "CO", ml
    assert ml["model_version"] == backend.model_version

    task = tasks[0]
    image = load_image(ls.get(task["data"]["image"]).raise_for_status().content)
    h, w = image.shape[:2]
    state = backend.predictor.embed(image)
    prompts = {
        "positive keypoint": ([_kp(40, 40, True, w, h)], [(0.4 * w, 0.4 * h)], [1], None, "Object"),
        "keypoints ±": ([_kp(40, 40, True, w, h), _kp(75, 70, False, w, h)],
                        [(0.4 * w, 0.4 * h), (0.75 * w, 0.7 * h)], [1, 0], None, "Object"),
        "rectangle": ([_rect(20, 20, 40, 35, w, h)], [], [], (0.2 * w, 0.2 * h, 0.6 * w, 0.55 * h), "Background"),
    }
    regions, expected = [], []
    for name, (context, points, labels, box, label) in prompts.items():
        resp = ls.post(f"/api/ml/{ml['id']}/interactive-annotating",
                       json={"task": task["id"], "context": {"result": context}}).raise_for_status().json()
        assert "errors" not in resp or not resp["errors"], (name, resp)
        data = resp["data"]
        assert data["model_version"] == backend.model_version
        (region,) = data["result"]
        assert region["value"]["brushlabels"] == [label], name
        mask, score, _ = backend.predictor.segment(points or None, labels or None, box, image_embedding=state)
        assert np.array_equal(rle_to_mask(region["value"]["rle"], h, w), mask), name
        assert region["score"] == pytest.approx(score)
        regions.append(region)
        expected.append(mask)

    # the annotator accepts the suggestions and submits: what Label Studio stores decodes to the same masks
    created = ls.post(f"/api/tasks/{task['id']}/annotations", json={"result": regions}).raise_for_status().json()
    stored = ls.get(f"/api/annotations/{created['id']}").raise_for_status().json()["result"]
    assert len(stored) == 3
    for region, mask in zip(stored, expected):
        assert np.array_equal(rle_to_mask(region["value"]["rle"], region["original_height"],
                                          region["original_width"]), mask)

    _retrieve(ls, pid)
    from tinysam_kit.integrations.labelstudio.label_config import parse_label_config

    config = parse_label_config(CONFIG)
    for t in tasks:
        preds = ls.get("/api/predictions", params={"task": t["id"]}).raise_for_status().json()
        assert len(preds) == 1 and preds[0]["model_version"] == backend.model_version
        assert preds[0]["result"], "everything mode stored no region"
        direct = backend.everything(t, config)["result"]
        assert len(preds[0]["result"]) == len(direct)
        for got, want in zip(preds[0]["result"], direct):
            hh, ww = want["original_height"], want["original_width"]
            assert np.array_equal(rle_to_mask(got["value"]["rle"], hh, ww), rle_to_mask(want["value"]["rle"], hh, ww))
            assert got["value"]["brushlabels"] == ["Object"]
    # a second retrieve skips tasks already predicted by this model_version
    _retrieve(ls, pid)
    assert len(ls.get("/api/predictions", params={"project": pid}).json()) == len(tasks)


def _retrieve(ls: httpx.Client, pid: int) -> None:
    """Data Manager → select all → "Retrieve predictions"."""
    ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
            json={"selectedItems": {"all": True, "excluded": []}}).raise_for_status()


def _another_backend(base, **changes):
    import dataclasses

    from tinysam_kit.integrations.labelstudio import create_app
    from tinysam_kit.integrations.labelstudio.backend import TinySamBackend

    backend = TinySamBackend(dataclasses.replace(base.settings, **changes), predictor=base.predictor)
    return backend, UvicornThread(create_app(backend.settings, backend))


def test_stored_predictions_are_scored_in_0_1_and_settings_decide_what_is_done(label_studio, backend_server):
    """What Label Studio stores: scores within [0, 1] (its UI shows them as percentages), no near-whole-image
    region, an empty answer stores nothing (the task is tried again), and a run with other everything-mode
    settings has another model_version, so "Retrieve predictions" predicts again instead of skipping."""
    from tinysam_kit.inference.policy import MAX_AREA_FRACTION

    ls = label_studio
    server, backend = backend_server
    pid, tasks = _project(ls, "tinysam-settings", 2)
    ml = ls.post("/api/ml", json={"url": server.url, "project": pid, "title": "TinySAM",
                                  "is_interactive": True}).raise_for_status().json()

    def stored():
        return ls.get("/api/predictions", params={"project": pid}).raise_for_status().json()

    _retrieve(ls, pid)
    first = stored()
    assert len(first) == len(tasks) and {p["model_version"] for p in first} == {backend.model_version}
    for prediction in first:
        assert 0.0 <= prediction["score"] <= 1.0
        for region in prediction["result"]:
            assert 0.0 <= region["score"] <= 1.0
            mask = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
            assert mask.mean() <= MAX_AREA_FRACTION

    # settings under which nothing is found: Label Studio stores nothing, and asks again next time
    empty, empty_server = _another_backend(backend, pred_iou_thresh=5.0)
    other, other_server = _another_backend(backend, max_regions=backend.settings.max_regions - 1)
    assert len({backend.model_version, empty.model_version, other.model_version}) == 3
    with empty_server, other_server:
        ls.patch(f"/api/ml/{ml['id']}", json={"url": empty_server.url, "project": pid}).raise_for_status()
        for attempt in (1, 2):
            _retrieve(ls, pid)
            assert empty.counters["batch_tasks"] == attempt * len(tasks), "an empty answer must not count as done"
            assert stored() == first
        # other settings: a new model_version, so every task is predicted again, then skipped
        ls.patch(f"/api/ml/{ml['id']}", json={"url": other_server.url, "project": pid}).raise_for_status()
        _retrieve(ls, pid)
        _retrieve(ls, pid)
    empty.close()
    other.close()
    assert other.counters["batch_tasks"] == len(tasks)
    versions = sorted(p["model_version"] for p in stored())
    assert versions == sorted([backend.model_version, other.model_version] * len(tasks))


def test_polygon_projects_get_polygons(label_studio, backend_server):
    """A `<PolygonLabels>` project: smart clicks and "Retrieve predictions" store polygon regions."""
    from tinysam_kit.inference.encodings.polygons import polygons_to_mask

    ls = label_studio
    server, backend = backend_server
    config = CONFIG.replace("<BrushLabels", "<PolygonLabels").replace("</BrushLabels>", "</PolygonLabels>")
    pid, tasks = _project(ls, "tinysam-polygons", 1, config)
    ml = ls.post("/api/ml", json={"url": server.url, "project": pid, "title": "TinySAM",
                                  "is_interactive": True}).raise_for_status().json()
    w, h = SIZES[0]
    resp = ls.post(f"/api/ml/{ml['id']}/interactive-annotating",
                   json={"task": tasks[0]["id"], "context": {"result": [_rect(20, 20, 40, 35, w, h)]}})
    regions = resp.raise_for_status().json()["data"]["result"]
    assert regions and all(r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == ["Background"]
                           for r in regions)
    created = ls.post(f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": regions}).raise_for_status().json()
    stored = ls.get(f"/api/annotations/{created['id']}").raise_for_status().json()["result"]
    assert [r["value"]["points"] for r in stored] == [r["value"]["points"] for r in regions]
    _retrieve(ls, pid)
    (prediction,) = ls.get("/api/predictions", params={"task": tasks[0]["id"]}).raise_for_status().json()
    assert prediction["result"]
    for region in prediction["result"]:
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Object"]
        pixels = [c for x, y in region["value"]["points"] for c in (x / 100 * w, y / 100 * h)]
        assert polygons_to_mask([pixels], h, w).any()


def _run_cli(argv: list[str]) -> int:
    from tinysam_kit.cli.labelstudio import register

    parser = argparse.ArgumentParser(prog="tinysam")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_ls_prelabel_pushes_predictions_and_resumes(label_studio, backend_server, monkeypatch):
    ls = label_studio
    _, backend = backend_server
    pid, tasks = _project(ls, "tinysam-prelabel", 3)
    # a personal access token (JWT refresh token) exercises the /api/token/refresh/ exchange for real
    pat = ls.post("/api/token/").raise_for_status().json()["token"]
    assert pat.count(".") == 2
    # the same settings as the server: the same model_version, so both count each other's work as done
    s = backend.settings
    for key, value in {"TINYSAM_PRED_IOU_THRESH": s.pred_iou_thresh, "TINYSAM_STABILITY_THRESH":
                       s.stability_score_thresh, "TINYSAM_POINTS_PER_SIDE": s.points_per_side,
                       "TINYSAM_MAX_REGIONS": s.max_regions, "TINYSAM_MIN_REGION_AREA": s.min_region_area}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))
    base = ["ls-prelabel", "--project", str(pid), "--url", str(ls.base_url).rstrip("/"), "--api-key", pat,
            "--model", backend.settings.model, "--no-progress", "--page-size", "2"]

    def versions():
        preds = ls.get("/api/predictions", params={"project": pid}).raise_for_status().json()
        return sorted(p["task"] for p in preds), {p["model_version"] for p in preds}

    assert _run_cli(base + ["--limit", "1"]) == 0  # an interrupted run: one task done
    done, mv = versions()
    assert done == [tasks[0]["id"]] and mv == {backend.model_version}
    assert _run_cli(base) == 0  # resumes: the other two
    done, _ = versions()
    assert done == [t["id"] for t in tasks]
    assert _run_cli(base) == 0  # nothing left: no duplicates
    done, _ = versions()
    assert done == [t["id"] for t in tasks]
    preds = ls.get("/api/predictions", params={"project": pid}).json()
    for p in preds:
        assert 1 <= len(p["result"]) <= s.max_regions
        r = p["result"][0]
        assert rle_to_mask(r["value"]["rle"], r["original_height"], r["original_width"]).any()


def test_ls_prelabel_pushes_no_empty_prediction_and_retries_such_tasks(label_studio, backend_server, capsys):
    ls = label_studio
    _, backend = backend_server
    pid, tasks = _project(ls, "tinysam-prelabel-empty", 2)
    argv = ["ls-prelabel", "--project", str(pid), "--url", str(ls.base_url).rstrip("/"), "--api-key", TOKEN,
            "--model", backend.settings.model, "--no-progress", "--points-per-side", "8", "--pred-iou-thresh", "5"]
    assert _run_cli(argv) == 0  # nothing found: nothing pushed
    out, err = capsys.readouterr()
    assert f"0 predicted, {len(tasks)} with no region (not pushed), 0 already done" in out
    assert ls.get("/api/predictions", params={"project": pid}).raise_for_status().json() == []
    # an empty prediction of this very model_version (e.g. stored by another tool) does not make a task done
    version = err.split("model_version ")[1].split()[0]
    ls.post("/api/predictions", json={"task": tasks[0]["id"], "result": [], "model_version": version}
            ).raise_for_status()
    assert _run_cli(argv) == 0
    assert f"0 predicted, {len(tasks)} with no region (not pushed), 0 already done" in capsys.readouterr().out


def test_ls_prelabel_reports_a_bad_project(label_studio, backend_server):
    _, backend = backend_server
    code = _run_cli(["ls-prelabel", "--project", "99999", "--url", str(label_studio.base_url).rstrip("/"),
                     "--api-key", TOKEN, "--model", backend.settings.model, "--no-progress"])
    assert code == 1


def test_embeddings_only_and_the_tasks_created_webhook_make_first_clicks_encoder_free(label_studio, backend_server,
                                                                                      capsys):
    """`ls-prelabel --embeddings-only` warms a project's store (resumable, predicting nothing); Label Studio's own
    TASKS_CREATED webhook has the backend encode newly imported tasks; first clicks on both run no encoder."""
    ls = label_studio
    server, backend = backend_server
    pid, tasks = _project(ls, "tinysam-embeddings", 2)
    argv = ["ls-prelabel", "--embeddings-only", "--project", str(pid), "--url", str(ls.base_url).rstrip("/"),
            "--api-key", TOKEN, "--model", backend.settings.model, "--no-progress"]
    assert _run_cli(argv + ["--limit", "1"]) == 0
    assert "1 tasks, 1 images encoded, 0 already stored, 0 failed" in capsys.readouterr().out
    assert _run_cli(argv) == 0  # resumes: only the second image is encoded
    assert "2 tasks, 1 images encoded, 1 already stored, 0 failed" in capsys.readouterr().out
    assert ls.get("/api/predictions", params={"project": pid}).raise_for_status().json() == []

    ml = ls.post("/api/ml", json={"url": server.url, "project": pid, "title": "TinySAM",
                                  "is_interactive": True}).raise_for_status().json()
    w, h = SIZES[1]
    runs = backend.counters["encoder_runs"]
    resp = ls.post(f"/api/ml/{ml['id']}/interactive-annotating",
                   json={"task": tasks[1]["id"], "context": {"result": [_kp(50, 50, True, w, h)]}})
    assert resp.raise_for_status().json()["data"]["result"]
    assert backend.counters["encoder_runs"] == runs, "the warmed task's first click ran the encoder"

    # an import into the connected project: Label Studio's webhook queues the new image
    encoded = backend.preencoder.describe()["encoded"]
    files = [("file", ("new.png", encode_image(synthetic_image(*SIZES[2], seed=7)), "image/png"))]
    ls.post(f"/api/projects/{pid}/import", files=files).raise_for_status()
    deadline = time.time() + 30
    while backend.preencoder.describe()["encoded"] == encoded:
        assert time.time() < deadline, f"no background encoding after the import: {backend.preencoder.describe()}"
        time.sleep(0.1)
    new = max(ls.get("/api/tasks", params={"project": pid}).json()["tasks"], key=lambda t: t["id"])
    runs = backend.counters["encoder_runs"]
    w, h = SIZES[2]
    resp = ls.post(f"/api/ml/{ml['id']}/interactive-annotating",
                   json={"task": new["id"], "context": {"result": [_kp(40, 60, True, w, h)]}})
    assert resp.raise_for_status().json()["data"]["result"]
    assert backend.counters["encoder_runs"] == runs, "the imported task's first click ran the encoder"


def test_ls_prelabel_in_model_processes_pushes_what_one_process_pushes(label_studio, backend_server, capsys):
    """`--workers 2`: everything mode in two model processes on this machine, this process pushing each result:
    the same predictions as `--workers 1`, the task without an image failed (not the run), and a re-run
    predicts nothing more."""
    ls = label_studio
    _, backend = backend_server
    url = str(ls.base_url).rstrip("/")
    projects = {}
    for workers in ("1", "2"):
        pid, tasks = _project(ls, f"tinysam-prelabel-workers-{workers}", 3)
        ls.post(f"/api/projects/{pid}/import", json=[{"image": "/data/upload/999/missing.png"}]).raise_for_status()
        projects[workers] = (pid, [t["id"] for t in tasks])
    capsys.readouterr()

    def run(workers: str) -> tuple[int, str, str]:
        code = _run_cli(["ls-prelabel", "--project", str(projects[workers][0]), "--url", url, "--api-key", TOKEN,
                         "--model", backend.settings.model, "--no-progress", "--points-per-side", "8",
                         "--min-area", "20", "--max-regions", "5", "--workers", workers])
        out, err = capsys.readouterr()
        return code, out, err

    for workers in ("1", "2"):
        code, out, err = run(workers)
        assert code == 1 and "3 predicted" in out and "1 failed" in out and "missing.png" in err, out + err
        assert ("2 model processes" in out) == (workers == "2"), out

    def predictions(workers: str) -> list[dict]:
        pid, task_ids = projects[workers]
        by_task = {p["task"]: p for p in ls.get("/api/predictions", params={"project": pid}).raise_for_status().json()}
        assert sorted(by_task) == task_ids  # one per image task, none for the missing image
        return [by_task[t] for t in task_ids]

    for mine, theirs in zip(predictions("1"), predictions("2")):
        assert mine["model_version"] == theirs["model_version"]
        assert mine["score"] == pytest.approx(theirs["score"])
        strip = [[{k: v for k, v in r.items() if k != "id"} for r in p["result"]] for p in (mine, theirs)]
        assert strip[0] == strip[1] and strip[0]

    code, out, err = run("2")  # resumes: only the missing image is left, and it still fails
    assert code == 1 and "0 predicted" in out and "3 already done" in out and "1 failed" in out, out + err
    assert len(predictions("2")) == 3


@pytest.mark.parametrize("flags", [["--ray", "auto", "--workers", "2"], ["--embeddings-only", "--workers", "2"]])
def test_ls_prelabel_refuses_workers_where_they_do_not_apply(flags, capsys):
    assert _run_cli(["ls-prelabel", "--project", "1", "--url", "http://127.0.0.1:9", "--api-key", TOKEN,
                     *flags]) == 2
    assert "--workers" in capsys.readouterr().err
