"""Background encoding: TASKS_CREATED webhooks and opened tasks fill the shared embedding store, so the first
click on a task runs no encoder; clicks overtake the queue. Real HTTP throughout (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time

import httpx
import pytest
from labelstudio_helpers import (
    LS_PAYLOADS,
    FakeLabelStudio,
    UvicornThread,
    encode_image,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
    synthetic_image,
)

from tinysam_kit.integrations.labelstudio import BackendSettings, create_app
from tinysam_kit.integrations.labelstudio.backend import TinySamBackend

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
</View>"""
TOKEN = "legacy-token-preencode"
N_BUSY = 24  # images of the busy-queue test (one large picture under many task URLs)


@pytest.fixture(scope="module")
def ls_server():
    images = {f"/data/upload/7/{name}.png": encode_image(synthetic_image(200 + 10 * n, 150, seed=n))
              for n, name in enumerate(["a", "b", "c", "d", "open", "x", "y"])}
    big = encode_image(synthetic_image(1600, 1200, seed=9), "JPEG")
    images.update({f"/data/upload/7/busy{n}.jpg": big for n in range(N_BUSY)})
    with FakeLabelStudio(images, legacy_token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def settings(ls_server, tiny_random_checkpoint):
    return BackendSettings.from_env({}, model=str(tiny_random_checkpoint), label_studio_url=ls_server.url,
                                    label_studio_api_key=TOKEN, points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, min_region_area=1, max_regions=2)


def task(task_id: int, name: str) -> dict:
    return {"id": task_id, "data": {"image": f"/data/upload/7/{name}"}}


def tasks_created(tasks: list[dict], label_config: str = CONFIG) -> dict:
    """A TASKS_CREATED webhook body: the captured one (when present) with these tasks and this config."""
    captured = LS_PAYLOADS / "stub_modern" / "14_ls_to_backend_POST_webhook_TASKS_CREATED.json"
    if captured.is_file():
        body = copy.deepcopy(json.loads(captured.read_text())["json"])
        template = body["tasks"][0]
        body["tasks"] = [{**template, **t} for t in tasks]
        body["project"]["label_config"] = label_config
        return body
    return {"action": "TASKS_CREATED", "tasks": tasks, "project": {"id": 7, "label_config": label_config}}


def click(t: dict, x: float = 40, y: float = 40) -> dict:
    region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
              "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"]}}
    return {"tasks": [t], "label_config": CONFIG, "project": "7.1", "params": {"context": {"result": [region]}}}


def embeddings(c: httpx.Client) -> dict:
    return c.get("/health").raise_for_status().json()["embeddings"]


def wait_idle(c: httpx.Client, timeout: float = 30.0) -> dict:
    """/health's embedding counters once the background queue is empty."""
    deadline = time.time() + timeout
    while True:
        state = embeddings(c)
        if state["background"]["pending"] == 0:
            return state
        assert time.time() < deadline, f"background encoding did not finish: {state}"
        time.sleep(0.05)


def image_gets(ls_server, name: str) -> int:
    return sum(1 for method, path, _ in ls_server.requests if method == "GET" and path.endswith(f"/{name}"))


def test_tasks_created_webhook_fills_the_store_and_the_first_click_runs_no_encoder(settings, ls_server):
    backend = TinySamBackend(settings)
    store = backend.predictor.store
    assert store is not None and embeddings_store_is_private(store)
    tasks = [task(1, "a.png"), task(2, "b.png")]
    with UvicornThread(create_app(settings, backend)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        answer = c.post("/webhook", json=tasks_created(tasks))
        assert answer.status_code == 200 and answer.json()["queued"] == 2, answer.text
        state = wait_idle(c)
        assert state["background"]["encoded"] == 2 and state["encoder_runs"] == 2
        assert state["store"] == str(store.root) and len(store) == 2
        fetched = image_gets(ls_server, "a.png")
        first = c.post("/predict", json=click(tasks[0]))
        assert first.status_code == 200 and first.json()["results"][0]["result"]
        assert embeddings(c)["encoder_runs"] == 2, "the first click must use the stored embedding"
        assert image_gets(ls_server, "a.png") == fetched, "nor download the image again"
        # the same tasks again (e.g. a second import): nothing is encoded twice
        assert c.post("/webhook", json=tasks_created(tasks)).json()["queued"] == 2
        state = wait_idle(c)
        assert state["background"]["already_embedded"] == 2 and state["encoder_runs"] == 2
    backend.close()

    # a restarted backend (empty memory cache) answers the first click from the store too
    restarted = TinySamBackend(settings)
    with UvicornThread(create_app(settings, restarted)) as server, httpx.Client(base_url=server.url,
                                                                                timeout=60) as c:
        assert c.post("/predict", json=click(tasks[1], 60, 50)).status_code == 200
        assert embeddings(c)["encoder_runs"] == 0
    restarted.close()


def embeddings_store_is_private(store) -> bool:
    import os

    return str(store.root) == os.environ["TINYSAM_EMBEDDING_STORE"]


def test_an_opened_task_is_answered_as_before_and_its_image_fetched_encoded_and_stored_once(settings, ls_server):
    """Label Studio's predict on opening a task (no context): everything-mode as always, the image stored."""
    captured = LS_PAYLOADS / "stub_modern" / "13_ls_to_backend_POST_predict_on_task_open.json"
    body = (json.loads(captured.read_text())["json"] if captured.is_file()
            else {"tasks": [{}], "project": "7.1", "params": {"login": None, "password": None, "context": None}})
    body["tasks"][0].update(task(5, "open.png"))
    body["label_config"] = CONFIG
    backend = TinySamBackend(settings)
    with UvicornThread(create_app(settings, backend)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        answer = c.post("/predict", json=body)
        assert answer.status_code == 200
        (prediction,) = answer.json()["results"]
        assert prediction["model_version"] == backend.model_version
        state = wait_idle(c)
        assert state["encoder_runs"] == 1, "the handler and the background worker must not both encode"
        assert image_gets(ls_server, "open.png") == 1, "nor both download the image"
        assert backend.predictor.store is not None
        key = backend.image_key(body["tasks"][0], body["tasks"][0]["data"]["image"])
        assert (backend.predictor.model_version, f"user:{key}") in backend.predictor.store
    backend.close()


def test_a_click_is_answered_while_the_queue_is_still_busy(settings, ls_server, caplog):
    """Clicks overtake background work: one arriving after a big import is answered long before the queue
    drains; images beyond the queue's bound are dropped with a log line."""
    busy = dataclasses.replace(settings, model="demo", preencode_queue=N_BUSY - 4)
    backend = TinySamBackend(busy)
    tasks = [task(100 + n, f"busy{n}.jpg") for n in range(N_BUSY)]
    with caplog.at_level(logging.WARNING, logger="tinysam_kit.integrations.labelstudio"), \
            UvicornThread(create_app(busy, backend)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/webhook", json=tasks_created(tasks)).json()["queued"] == N_BUSY - 4
        deadline = time.time() + 30
        while embeddings(c)["background"]["encoded"] < 1:  # the worker is under way
            assert time.time() < deadline
            time.sleep(0.01)
        answer = c.post("/predict", json=click(task(9, "x.png")))
        after = embeddings(c)
        assert answer.status_code == 200 and answer.json()["results"][0]["result"]
        assert after["background"]["pending"] > 0, f"the click waited for the whole queue: {after}"
        assert after["background"]["dropped"] == 4
        assert "pre-encoding queue full" in caplog.text
    backend.close()  # forgets the images still queued


def test_webhook_work_needs_basic_auth_when_it_is_on_and_the_fetcher_rules_hold(settings, ls_server):
    secured = dataclasses.replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret")
    backend = TinySamBackend(secured)
    elsewhere = {"id": 11, "data": {"image": "http://203.0.113.9/private.png"}}
    with UvicornThread(create_app(secured, backend)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200
        assert c.post("/webhook", json=tasks_created([task(10, "c.png")])).status_code == 401
        assert backend.preencoder.describe()["queued"] == 0
        ok = c.post("/webhook", json=tasks_created([task(10, "c.png"), elsewhere]), auth=("ls", "s3cret"))
        assert ok.status_code == 200 and ok.json()["queued"] == 2
        c.auth = ("ls", "s3cret")
        state = wait_idle(c)
        # the fetcher's allow-list applies: a host other than Label Studio's is never contacted
        assert state["background"]["encoded"] == 1 and state["background"]["failed"] == 1
        bad = c.post("/webhook", json={"action": "TASKS_CREATED", "tasks": [task(12, "d.png")], "project": {"id": 99}})
        assert bad.status_code == 422 and "label_config" in bad.json()["detail"]
    backend.close()


def test_background_encoding_can_be_turned_off(settings):
    backend = TinySamBackend(dataclasses.replace(settings, preencode_queue=0))
    with UvicornThread(create_app(backend.settings, backend)) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/webhook", json=tasks_created([task(20, "y.png")])).json()["queued"] == 0
        assert embeddings(c)["background"]["max_pending"] == 0
    backend.close()
    assert BackendSettings.from_env({"TINYSAM_PREENCODE_QUEUE": "5"}).preencode_queue == 5
