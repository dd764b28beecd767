"""The backend's HTTP behaviour: auth, limits, image fetching policy, tokens, caching, concurrency."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import httpx
import numpy as np
import pytest
from labelstudio_helpers import (
    FakeLabelStudio,
    UvicornThread,
    encode_image,
    make_jwt,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
    synthetic_image,
)

from tinysam_kit.inference.encodings.labelstudio import rle_to_mask
from tinysam_kit.integrations.labelstudio import BackendSettings, create_app
from tinysam_kit.integrations.labelstudio.fetch import ImageFetcher, ImageFetchError

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/><Label value="Background"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Background"/></RectangleLabels>
</View>"""
TOKEN = "legacy-token-0123456789"
IMAGE = synthetic_image(160, 120, seed=1)


def keypoint(x, y, positive=True, label="Object", w=160, h=120):
    return {"original_width": w, "original_height": h, "image_rotation": 0, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "is_positive": positive, "origin": "manual",
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}}


def rectangle(x, y, w, h, label="Background", iw=160, ih=120):
    return {"original_width": iw, "original_height": ih, "image_rotation": 0, "from_name": "rect",
            "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def predict_body(context_results=None, image="/data/upload/1/a.png", task_id=1):
    return {"tasks": [{"id": task_id, "data": {"image": image}}], "label_config": CONFIG, "project": "1.1",
            "params": {"login": None, "password": None,
                       "context": None if context_results is None else {"result": context_results}}}


@pytest.fixture(scope="module")
def ls_server():
    images = {"/data/upload/1/a.png": encode_image(IMAGE),
              "/data/upload/1/b.png": encode_image(synthetic_image(200, 100, seed=2)),
              "/data/upload/1/rotated.jpg": encode_image(synthetic_image(160, 120, seed=3), "JPEG",
                                                         exif_orientation=6),
              "/data/upload/1/broken.png": b"\x89PNG not really"}
    with FakeLabelStudio(images, legacy_token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def settings(ls_server, tiny_random_checkpoint):
    return BackendSettings.from_env({}, model=str(tiny_random_checkpoint), label_studio_url=ls_server.url,
                                    label_studio_api_key=TOKEN, points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, min_region_area=1, max_regions=3)


@pytest.fixture(scope="module")
def backend(settings):
    from tinysam_kit.integrations.labelstudio.backend import TinySamBackend

    return TinySamBackend(settings)


@pytest.fixture(scope="module")
def client(settings, backend):
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings, backend), raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------- interactive
def test_click_mask_equals_predictor_and_second_click_is_cached(client, backend, ls_server):
    backend.predictor.cache.clear()
    fetches = backend.fetcher.fetches
    first = client.post("/predict", json=predict_body([keypoint(30, 40)])).json()["results"][0]
    assert backend.fetcher.fetches == fetches + 1
    both = client.post("/predict", json=predict_body([keypoint(30, 40), keypoint(70, 70, False)])).json()
    assert backend.fetcher.fetches == fetches + 1, "the second click on a task must not fetch or encode again"
    region = both["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["Object"]
    state = backend.predictor.embed(IMAGE)
    expected, score, _ = backend.predictor.segment([(48, 48), (112, 84)], [1, 0], image_embedding=state)
    assert np.array_equal(rle_to_mask(region["value"]["rle"], 120, 160), expected)
    assert region["score"] == pytest.approx(score) == both["results"][0]["score"]
    assert 0.0 <= region["score"] <= 1.0
    assert first["result"][0]["id"] != region["id"]


def test_rectangle_becomes_a_box_prompt_with_its_label(client, backend):
    """The same box gives the same mask as `TinySamPredictor.segment` (what the CLI and FiftyOne answer)."""
    region = client.post("/predict", json=predict_body([rectangle(10, 20, 50, 40)])).json()["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["Background"]
    state = backend.predictor.embed(IMAGE)
    expected, _, _ = backend.predictor.segment(box=(16, 24, 96, 72), image_embedding=state)
    assert np.array_equal(rle_to_mask(region["value"]["rle"], 120, 160), expected)




def test_smart_brush_context_is_ignored_gracefully(client):
    stroke = {"type": "brushlabels", "from_name": "brush", "to_name": "image",
              "value": {"format": "rle", "rle": [0, 0, 0, 4], "brushlabels": ["Object"]}}
    resp = client.post("/predict", json=predict_body([stroke]))
    assert resp.status_code == 200
    assert resp.json()["results"] == [{"result": [], "score": 0.0, "model_version": resp.json()["model_version"]}]


def test_exif_rotated_image_lines_up_with_what_the_annotator_sees(client):
    # stored 160×120 with orientation 6: the browser shows it 120 wide, 160 high
    resp = client.post("/predict", json=predict_body([keypoint(50, 50, w=120, h=160)],
                                                     image="/data/upload/1/rotated.jpg", task_id=7))
    region = resp.json()["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (120, 160)
    assert rle_to_mask(region["value"]["rle"], 160, 120).shape == (160, 120)


def test_mask_is_resized_to_the_size_label_studio_reports(client):
    resp = client.post("/predict", json=predict_body([keypoint(50, 50, w=320, h=240)]))
    region = resp.json()["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (320, 240)


# ---------------------------------------------------------------------- batch
def test_batch_prediction_regions_are_capped_sorted_and_labelled(client, settings):
    body = predict_body(None)
    body["tasks"].append({"id": 2, "data": {"image": "/data/upload/1/b.png"}})
    body["tasks"].append({"id": 3, "data": {"image": "/data/upload/1/missing.png"}})
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results) == 3
    for prediction, (w, h) in zip(results[:2], [(160, 120), (200, 100)]):
        regions = prediction["result"]
        assert 1 <= len(regions) <= settings.max_regions
        scores = [r["score"] for r in regions]
        assert scores == sorted(scores, reverse=True)
        assert prediction["score"] == pytest.approx(np.mean(scores))
        for r in regions:
            assert r["value"]["brushlabels"] == ["Object"]
            assert rle_to_mask(r["value"]["rle"], h, w).sum() >= settings.min_region_area
    # a task whose image cannot be fetched gets no 'result', so Label Studio skips it and retries later
    assert "result" not in results[2] and "404" in results[2]["error"]


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("mutate, status, message", [
    (lambda b: b.update(label_config="<View><Image name='i' value='$image'/></View>"), 422, "BrushLabels"),
    (lambda b: b.update(label_config="<View"), 422, "not valid XML"),
    (lambda b: b.update(tasks=[]), 422, "non-empty"),
    (lambda b: b.update(tasks=[{"id": 1, "data": {"picture": "x"}}]), 422, "'image' field"),
    (lambda b: b["params"]["context"]["result"][0]["value"].update(x="left"), 422, "must be a number"),
    (lambda b: b["params"]["context"]["result"][0]["value"].update(x=250), 422, "outside the image"),
    (lambda b: b["params"]["context"]["result"][0].update(is_positive="yes"), 422, "is_positive"),
    (lambda b: b["params"]["context"].update(result=[keypoint(1, 1)] * 600), 413, "limit"),
    (lambda b: b["tasks"][0]["data"].update(image="http://169.254.169.254/latest/meta-data"), 422, "refusing"),
    (lambda b: b["tasks"][0]["data"].update(image="file:///etc/passwd"), 422, "unsupported image"),
    (lambda b: b["tasks"][0]["data"].update(image="/data/upload/1/broken.png"), 422, "cannot decode"),
    (lambda b: b.pop("tasks"), 422, "tasks: Field required"),
])
def test_bad_requests_get_precise_4xx(client, mutate, status, message):
    body = predict_body([keypoint(30, 40)])
    mutate(body)
    resp = client.post("/predict", json=body)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]


def test_malformed_json_and_oversized_bodies(client, settings):
    resp = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "not valid JSON" in resp.json()["detail"]
    big = b'{"tasks": [], "pad": "' + b"x" * (settings.max_request_bytes + 10) + b'"}'
    resp = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "TINYSAM_MAX_REQUEST_MB" in resp.json()["detail"]


def test_every_answer_carries_its_server_time(client):
    """The load benchmark reads `Server-Timing`; it is there on answers, refusals and errors alike."""
    answers = (client.post("/predict", json=predict_body([keypoint(30, 40)])), client.get("/health"),
               client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}))
    for resp in answers:
        name, _, duration = resp.headers["server-timing"].partition(";dur=")
        assert name == "app" and 0 <= float(duration) < 60_000, resp.headers
    assert float(answers[0].headers["server-timing"].split("dur=")[1]) > 0


def test_webhook_accepts_anything(client):
    for body in (b"", b"garbage", b"[1, 2]", json.dumps({"action": "PROJECT_UPDATED"}).encode()):
        assert client.post("/webhook", content=body).status_code == 200


def test_setup_rejects_an_unusable_config_and_accepts_captured_one(client):
    assert client.post("/setup", json={"project": "1.1", "schema": "<View/>"}).status_code == 422
    ok = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "hostname": "http://localhost:8080",
                                     "access_token": "abc"})
    assert ok.status_code == 200 and ok.json()["model_version"].startswith("tinysam-")
    # predicts that omit label_config use the project's config from /setup
    body = predict_body([keypoint(30, 40)])
    body.pop("label_config")
    body["project"] = "9.1"
    assert client.post("/predict", json=body).status_code == 200


# ---------------------------------------------------------------- basic auth
def test_basic_auth(settings, backend):
    from fastapi.testclient import TestClient

    secured = dataclasses.replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret")
    with TestClient(create_app(secured, backend)) as c:
        assert c.get("/health").status_code == 401
        assert c.get("/health", auth=("ls", "wrong")).status_code == 401
        assert c.post("/predict", json=predict_body([keypoint(5, 5)])).status_code == 401
        assert c.get("/health", auth=("ls", "s3cret")).status_code == 200
        assert c.post("/predict", json=predict_body([keypoint(5, 5)]), auth=("ls", "s3cret")).status_code == 200
        assert c.post("/webhook", json={"action": "X"}).status_code == 200  # Label Studio's webhooks carry no auth


# -------------------------------------------------------------- concurrency
def test_health_and_setup_stay_fast_while_model_is_busy(settings, backend):
    """A batch holds the model; /health and /setup answer at once and a click runs as soon as it is free."""
    with UvicornThread(create_app(settings, backend)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        body = predict_body(None)
        body["tasks"] *= 3
        batch = threading.Thread(target=lambda: c.post("/predict", json=body))
        batch.start()
        deadline = time.time() + 10
        while not backend.gate._busy and time.time() < deadline:
            time.sleep(0.005)
        assert backend.gate._busy, "the batch never started"
        for _ in range(5):
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            assert c.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
            assert time.perf_counter() - t < 1.0
        click = c.post("/predict", json=predict_body([keypoint(30, 40)]))
        assert click.status_code == 200
        batch.join(120)


def test_model_gate_lets_clicks_overtake_waiting_batch_work():
    from tinysam_kit.integrations.labelstudio.backend import ModelGate

    gate, order = ModelGate(), []

    def work(name, interactive):
        with gate.hold(interactive):
            order.append(name)
            time.sleep(0.01)

    with gate.hold(False):  # a batch task is running
        threads = [threading.Thread(target=work, args=("batch", False))]
        threads[0].start()
        time.sleep(0.05)
        threads.append(threading.Thread(target=work, args=("click", True)))
        threads[1].start()
        time.sleep(0.05)
    for t in threads:
        t.join(5)
    assert order == ["click", "batch"]


# --------------------------------------------------------- fetching policy
def test_fetch_only_from_label_studio_and_allow_list():
    png = encode_image(IMAGE)
    with FakeLabelStudio({"/x.png": png}, legacy_token=TOKEN) as ls, FakeLabelStudio({"/y.png": png}) as other, \
            FakeLabelStudio({"/z.png": png}) as cdn:
        redirects = {"/go-other": other.url + "/y.png", "/go-cdn": cdn.url + "/z.png"}
        ls.redirects.update(redirects)
        cdn_host = cdn.url.split("//")[1]
        fetcher = ImageFetcher(ls.url, TOKEN, allowed_hosts=[cdn_host])
        assert fetcher.fetch("/x.png") == png
        assert fetcher.fetch(ls.url + "/x.png") == png
        assert fetcher.fetch(cdn.url + "/z.png") == png
        assert fetcher.fetch("/go-cdn") == png  # a redirect to an allowed host is followed
        for bad in (other.url + "/y.png", "/go-other", "//evil.example/x.png", "ftp://x/y"):
            with pytest.raises(ImageFetchError):
                fetcher.fetch(bad)
        assert other.requests == [], "a host outside the allow-list must never be contacted"
        # credentials go to Label Studio only
        assert all(auth is None for _, _, auth in cdn.requests)
        assert all(auth == f"Token {TOKEN}" for _, path, auth in ls.requests)
        fetcher.close()


def test_personal_access_token_is_exchanged_and_refreshed():
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 86400, "jti": "pat"})
    png = encode_image(IMAGE)
    with FakeLabelStudio({"/data/upload/1/a.png": png}, personal_token=pat, access_ttl=31.0) as ls:
        fetcher = ImageFetcher(ls.url, pat)
        assert fetcher.auth.is_personal_token
        assert fetcher.fetch("/data/upload/1/a.png") == png
        assert fetcher.fetch("/data/upload/1/a.png") == png
        assert ls.refreshes == 1, "the access token is reused while valid"
        time.sleep(1.2)  # now within the refresh margin of its 31 s lifetime
        assert fetcher.fetch("/data/upload/1/a.png") == png
        assert ls.refreshes == 2
        ls.access_tokens.clear()  # the server forgets the token (e.g. restarted): 401, refresh, retry
        assert fetcher.fetch("/data/upload/1/a.png") == png
        assert ls.refreshes == 3
        assert not any(auth == f"Bearer {pat}" for _, _, auth in ls.requests), "the raw PAT is never a bearer"
        fetcher.close()
        with pytest.raises(ImageFetchError, match="refused the personal access token"):
            ImageFetcher(ls.url, make_jwt({"token_type": "refresh", "jti": "wrong"})).fetch("/data/upload/1/a.png")


def test_size_and_time_limits(tmp_path):
    png = encode_image(IMAGE)
    with FakeLabelStudio({"/a.png": png}) as ls:
        with pytest.raises(ImageFetchError, match="limit") as info:
            ImageFetcher(ls.url, "", max_bytes=len(png) - 1).fetch("/a.png")
        assert info.value.status_code == 422
        ls.delay = 1.5
        with pytest.raises(ImageFetchError, match="timed out") as info:
            ImageFetcher(ls.url, "", timeout=0.5).fetch("/a.png")
        assert info.value.status_code == 504


def test_local_files_are_read_from_the_document_root(tmp_path):
    root = tmp_path / "files"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"png-bytes")
    (tmp_path / "secret.txt").write_text("no")
    fetcher = ImageFetcher("http://127.0.0.1:1", "", local_files_root=str(root))
    assert fetcher.fetch("/data/local-files/?d=images/a.png") == b"png-bytes"
    with pytest.raises(ImageFetchError, match="outside") as info:
        fetcher.fetch("/data/local-files/?d=../secret.txt")
    assert info.value.status_code == 403


def test_cloud_uri_is_presigned_through_label_studio():
    png = encode_image(IMAGE)
    with FakeLabelStudio({}, legacy_token=TOKEN) as ls, FakeLabelStudio({"/bucket/key.png": png}) as bucket:
        fetcher = ImageFetcher(ls.url, TOKEN, allowed_hosts=[bucket.url.split("//")[1]])
        url = fetcher.resolve("s3://bucket/key.png", task_id=5)
        assert url.startswith(ls.url + "/tasks/5/presign/?fileuri=")
        ls.redirects[url[len(ls.url):]] = bucket.url + "/bucket/key.png"
        assert fetcher.fetch("s3://bucket/key.png", task_id=5) == png
        fetcher.close()


# ---------------------------------------------------------------- the command
@pytest.mark.slow
def test_serve_ls_command_and_container_healthcheck(tiny_random_checkpoint):
    """`tinysam serve-ls` in its own process, probed by the Docker health check, then stopped."""
    import os
    import signal
    import subprocess
    import sys

    from labelstudio_helpers import REPO, free_port

    port = free_port()
    env = {**os.environ, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw", "PYTHONPATH": str(REPO),
           "TINYSAM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinysam_kit.cli", "serve-ls", "--host", "127.0.0.1", "--port",
                             str(port), "--model", str(tiny_random_checkpoint), "--log-level", "warning"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "serve-ls did not become healthy"
            try:
                if httpx.get(url + "/health", auth=("ls", "pw")).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert subprocess.run([sys.executable, "-m", "tinysam_kit.integrations.labelstudio.healthcheck", url], env=env,
                              capture_output=True).returncode == 0
        assert httpx.get(url + "/health").status_code == 401
        no_auth = {k: v for k, v in env.items() if not k.startswith("BASIC_AUTH")}
        assert subprocess.run([sys.executable, "-m", "tinysam_kit.integrations.labelstudio.healthcheck", url],
                              env=no_auth,
                              capture_output=True).returncode == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_serve_ls_refuses_bad_settings(monkeypatch, capsys, tmp_path):
    import argparse

    from tinysam_kit.cli.labelstudio import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.setenv("BASIC_AUTH_USER", "only-user")
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    args = parser.parse_args(["serve-ls", "--model", str(tmp_path / "nope.pth")])
    assert args.func(args) == 2
    assert "BASIC_AUTH_PASS" in capsys.readouterr().err
    monkeypatch.delenv("BASIC_AUTH_USER")
    assert args.func(args) == 2  # the model file does not exist: a one-line error, no traceback
    assert "nope.pth" in capsys.readouterr().err


def test_setup_hostname_is_used_only_without_label_studio_url(tiny_random_checkpoint):
    from tinysam_kit.integrations.labelstudio.backend import BadRequest, TinySamBackend

    png = encode_image(IMAGE)
    with FakeLabelStudio({"/data/upload/1/a.png": png}, legacy_token="creator-token") as ls:
        backend = TinySamBackend(BackendSettings.from_env({}, model=str(tiny_random_checkpoint)))
        body = predict_body([keypoint(30, 40)])
        with pytest.raises(BadRequest, match="LABEL_STUDIO_URL"):
            backend.predict(body["tasks"], CONFIG, body["params"]["context"])
        backend.setup(CONFIG, ls.url, "creator-token")
        assert backend.predict(body["tasks"], CONFIG, body["params"]["context"])["results"][0]["result"]
        backend.close()
        pinned = TinySamBackend(BackendSettings.from_env({}, model=str(tiny_random_checkpoint),
                                                         label_studio_url="http://127.0.0.1:9"))
        pinned.setup(CONFIG, ls.url, "creator-token")
        assert pinned.fetcher.label_studio_url == "http://127.0.0.1:9"
        pinned.close()


# ------------------------------------------------------------ mask quality
def test_demo_model_segments_the_clicked_object(ls_server):
    """With the trained demo model (when bundled), a box or a click on a solid shape gives that shape."""
    from fastapi.testclient import TestClient

    from tinysam_kit.models.registry import MODELS, resolve_weights

    resolve_weights("demo", download=False)  # committed with the package: must be there
    assert "demo" in MODELS
    settings = BackendSettings.from_env({}, model="demo", label_studio_url=ls_server.url, label_studio_api_key=TOKEN)
    truth = np.zeros((120, 160), bool)
    truth[30:60, 40:80] = True  # the red rectangle of synthetic_image(160, 120)
    with TestClient(create_app(settings)) as c:
        for context in ([rectangle(23, 23, 54, 31)], [keypoint(37.5, 37.5)]):
            region = c.post("/predict", json=predict_body(context)).json()["results"][0]["result"][0]
            mask = rle_to_mask(region["value"]["rle"], 120, 160)
            iou = (mask & truth).sum() / max((mask | truth).sum(), 1)
            assert iou > 0.7, (context[0]["type"], iou)
