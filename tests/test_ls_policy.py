"""The backend follows the shared policy (`tinysam_kit.inference.policy`) like every other front end: model
choice with a fallback it explains, the model's own everything-mode thresholds, scores in [0, 1], no
near-whole-image regions, a `model_version` naming every setting, and refusals users can find in the log.
All through real HTTP: uvicorn on 127.0.0.1, or `tinysam serve-ls` in its own process."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from labelstudio_helpers import (
    REPO,
    FakeLabelStudio,
    UvicornThread,
    encode_image,
    free_port,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
    synthetic_image,
)

from tinysam_kit.inference import policy
from tinysam_kit.inference.encodings.labelstudio import rle_to_mask
from tinysam_kit.integrations.labelstudio import BackendSettings, create_app
from tinysam_kit.integrations.labelstudio.backend import TinySamBackend

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/><Label value="Background"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/><Label value="Car"/></KeyPointLabels>
</View>"""
SCENES = {f"/data/upload/1/scene{n}.png": synthetic_image(w, h, seed=n)
          for n, (w, h) in enumerate([(320, 240), (256, 320), (300, 200)])}
PLAIN = np.full((240, 320, 3), (200, 190, 170), np.uint8)
PLAIN[80:140, 100:160] = (30, 30, 200)


@pytest.fixture(scope="module")
def ls_server():
    images = {url: encode_image(img) for url, img in SCENES.items()}
    images["/data/upload/1/plain.png"] = encode_image(PLAIN)
    with FakeLabelStudio(images) as server:
        yield server


def serve(settings: BackendSettings):
    backend = TinySamBackend(settings)
    return backend, UvicornThread(create_app(settings, backend))


def batch(url: str, images: list[str]) -> dict:
    body = {"tasks": [{"id": n, "data": {"image": image}} for n, image in enumerate(images, 1)],
            "label_config": CONFIG, "project": "1.1"}
    resp = httpx.post(url + "/predict", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def click(label: str) -> dict:
    context = {"result": [{"original_width": 320, "original_height": 240, "from_name": "kp", "to_name": "image",
                           "type": "keypointlabels", "is_positive": True,
                           "value": {"x": 40, "y": 45, "width": 0.5, "keypointlabels": [label]}}]}
    return {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/scene0.png"}}], "label_config": CONFIG,
            "project": "1.1", "params": {"context": context}}


def start_serve_ls(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tinysam_kit.cli", "serve-ls", "--host", "127.0.0.1", "--port",
                             str(port), *args], env={**env, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail("serve-ls exited:\n" + proc.stdout.read().decode()[-3000:])
        if time.time() > deadline:
            stop(proc)
            pytest.fail("serve-ls did not become healthy")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out.decode()


def offline_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYSAM_", "BASIC_AUTH_", "LABEL_STUDIO_"))}
    return {**env, "TINYSAM_HOME": str(tmp_path / "home"), "TINYSAM_THREADS": "1"}


# ------------------------------------------------------------------------------------- 10: model choice
@pytest.mark.slow
def test_serve_ls_offline_falls_back_to_the_demo_model_and_says_why(tmp_path):
    """No official weights and no network: `auto` (the default) serves the demo model instead of exiting, and
    the reason is in the log and in /health."""
    proc, url = start_serve_ls(["--offline", "--log-level", "info"], offline_env(tmp_path))
    try:
        health = httpx.get(url + "/health").json()
    finally:
        log = stop(proc)
    assert health["model"] == "demo" and health["model_requested"] == "auto"
    assert "demo" in health["model_note"] and "TINYSAM_OFFLINE" in health["model_note"]
    assert health["model_version"].startswith("tinysam-demo-")
    assert health["everything"]["pred_iou_thresh"] == policy.registered_everything_params("demo")["pred_iou_thresh"]
    assert health["model_note"] in log


def test_ls_prelabel_falls_back_too(tmp_path, monkeypatch, capsys):
    from tinysam_kit.cli.labelstudio import register

    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TINYSAM_OFFLINE", "1")
    monkeypatch.delenv("TINYSAM_MODEL", raising=False)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["ls-prelabel", "--project", "1", "--url", f"http://127.0.0.1:{free_port()}",
                              "--api-key", "token", "--no-progress"])
    assert args.func(args) == 1  # the model loaded; only Label Studio is unreachable
    err = capsys.readouterr().err
    assert "note:" in err and "demo" in err and "model_version tinysam-demo-" in err


# ------------------------------------------------------------------- 11, 12: thresholds, scores, areas
def test_batch_uses_the_models_own_thresholds_and_reports_scores_in_0_1(ls_server):
    """Unset thresholds are the demo model's registered ones (what the CLI and FiftyOne use), so the regions
    are the ones `generate_everything` gives with `policy.everything_params`; scores are clamped IoUs."""
    from tinysam_kit.inference.everything import generate_everything

    settings = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url, points_per_side=16)
    backend, server = serve(settings)
    expected = policy.everything_params("demo", {"points_per_side": 16}, prelabel=True)
    assert backend.everything_params == expected
    assert expected["pred_iou_thresh"] == policy.registered_everything_params("demo")["pred_iou_thresh"]
    with server:
        results = batch(server.url, list(SCENES))["results"]
    raw_above_one = False
    for (url, image), prediction in zip(SCENES.items(), results):
        regions = prediction["result"]
        assert regions, f"no region for {url}"
        h, w = image.shape[:2]
        records = generate_everything(backend.predictor, image, output_mode="binary_mask", **expected)
        records = sorted((r for r in records if r["area"] >= settings.min_region_area),
                         key=lambda r: r["predicted_iou"], reverse=True)[: settings.max_regions]
        assert len(regions) == len(records)
        for region, record in zip(regions, records):
            assert np.array_equal(rle_to_mask(region["value"]["rle"], h, w), record["segmentation"])
            assert region["score"] == pytest.approx(policy.report_score(record["predicted_iou"]))
            assert 0.0 <= region["score"] <= 1.0
            raw_above_one |= record["predicted_iou"] > 1.0
        assert 0.0 <= prediction["score"] <= 1.0
    assert raw_above_one, "the demo model's IoU head exceeds 1 on these scenes: the clamp must have been exercised"
    backend.close()


def test_near_whole_image_masks_are_dropped_as_configured(ls_server):
    """TINYSAM_MAX_AREA_FRACTION decides which large masks batch mode keeps (default policy.MAX_AREA_FRACTION)."""
    base = {"LABEL_STUDIO_URL": ls_server.url, "TINYSAM_POINTS_PER_SIDE": "8"}
    assert TinySamBackend(BackendSettings.from_env(base, model="demo")).everything_params["max_area_fraction"] \
        == policy.MAX_AREA_FRACTION
    largest, versions = {}, set()
    for fraction in ("0.5", "1"):
        settings = BackendSettings.from_env({**base, "TINYSAM_MAX_AREA_FRACTION": fraction}, model="demo")
        backend, server = serve(settings)
        with server:
            body = batch(server.url, ["/data/upload/1/plain.png"])
        versions.add(body["model_version"])
        regions = body["results"][0]["result"]
        largest[fraction] = max(rle_to_mask(r["value"]["rle"], 240, 320).mean() for r in regions)
        backend.close()
    assert largest["0.5"] <= 0.5 < largest["1"]
    assert len(versions) == 2


# --------------------------------------------------------------------- 13: run identity, empty results
def test_model_version_names_every_setting_and_empty_results_are_not_stored(ls_server):
    plain = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url, points_per_side=8)
    strict = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url, points_per_side=8,
                                      pred_iou_thresh=5.0)  # no predicted IoU reaches 5: nothing is found
    versions = []
    for settings in (plain, strict):
        backend, server = serve(settings)
        with server:
            setup = httpx.post(server.url + "/setup", json={"project": "1.1", "schema": CONFIG}).json()
            assert setup["model_version"] == httpx.get(server.url + "/versions").json()["versions"][0]
            assert setup["model_version"] == policy.run_identity(backend.predictor.model_version, "everything",
                                                                 backend.run_params)
            versions.append(setup["model_version"])
            body = batch(server.url, ["/data/upload/1/scene0.png"])
        backend.close()
    assert versions[0] != versions[1] and all(v.startswith("tinysam-demo-") for v in versions)
    # Label Studio stores nothing for an empty list of predictions: the task is not "done" for this version
    assert body["results"] == [[]]


# ----------------------------------------------------------------------------- 14, 15: refusals and labels
def test_every_refusal_is_logged_with_its_endpoint_and_reason(ls_server, caplog):
    settings = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url, max_request_bytes=4096)
    backend, server = serve(settings)
    caplog.set_level(logging.WARNING, logger="tinysam_kit.integrations.labelstudio")
    with server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"}
                      ).status_code == 422
        assert c.post("/predict", json={"label_config": CONFIG}).status_code == 422
        assert c.post("/predict", content=b"x" * 5000, headers={"content-type": "application/json"}).status_code == 413
        assert c.get("/nowhere").status_code == 404
    backend.close()
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for endpoint, reason in [("POST /setup -> 422", "BrushLabels"), ("POST /predict -> 422", "tasks"),
                             ("POST /predict -> 413", "TINYSAM_MAX_REQUEST_MB"), ("GET /nowhere -> 404", "Not Found")]:
        assert any(endpoint in m and reason in m for m in logged), (endpoint, logged)


def test_a_prompt_label_without_a_brush_label_of_that_name_is_refused_by_name(ls_server, caplog):
    settings = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url)
    backend, server = serve(settings)
    caplog.set_level(logging.WARNING, logger="tinysam_kit.integrations.labelstudio")
    with server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
        ok = c.post("/predict", json=click("Object"))
        assert ok.status_code == 200 and ok.json()["results"][0]["result"][0]["value"]["brushlabels"] == ["Object"]
        refused = c.post("/predict", json=click("Car"))
    backend.close()
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "'Car'" in detail and "Object, Background" in detail
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "label(s) Car have no label of the same name" in logged  # said at /setup already
    assert "POST /predict -> 422" in logged


# -------------------------------------------------------------------------------------- 17, 18: startup
@pytest.mark.slow
def test_int8_start_logs_no_quantizer_chatter(tiny_random_checkpoint, tmp_path):
    """The first int8 start quantizes the model: ONNX Runtime's per-tensor notes stay out of the log, and the
    backend's own info lines stay in it."""
    pytest.importorskip("onnxruntime")
    weights = tmp_path / "weights"
    weights.mkdir()
    for path in tiny_random_checkpoint.parent.glob(tiny_random_checkpoint.name + "*"):
        shutil.copy(path, weights / path.name)
    proc, url = start_serve_ls(["--model", str(weights / tiny_random_checkpoint.name), "--engine", "onnx",
                                "--precision", "int8", "--log-level", "info"], offline_env(tmp_path))
    try:
        assert httpx.get(url + "/health").json()["model_version"].split("-")[3:5] == ["onnx", "int8"]
    finally:
        log = stop(proc)
    assert list(weights.glob("*.int8.*.onnx")), "the start quantized nothing: the check would be vacuous"
    assert "Quantization parameters" not in log, log[-3000:]
    assert "model_version tinysam-" in log  # the backend's info lines were not silenced with them


def test_app_version_is_the_package_version(ls_server):
    import importlib

    settings = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url)
    backend, server = serve(settings)
    with server:
        info = httpx.get(server.url + "/openapi.json").json()["info"]
    backend.close()
    assert info["version"] == importlib.import_module("tinysam_kit").__version__
