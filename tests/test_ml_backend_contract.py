"""Replay every request Label Studio 1.23.2 sent to a backend (../shared/ls_payloads) and check that our
answers have the shape Label Studio stored and used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from labelstudio_helpers import (
    LS_PAYLOADS,
    FakeLabelStudio,
    image_size_for,
    load_payloads,
    payload_images,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
)

from tinysam_kit.inference.encodings.labelstudio import rle_to_mask

pytestmark = pytest.mark.skipif(not LS_PAYLOADS.is_dir(), reason=f"captured payloads not present at {LS_PAYLOADS}")

TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the legacy token in the captured /setup


@pytest.fixture(scope="module")
def ls_server():
    with FakeLabelStudio(payload_images(), legacy_token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def client(ls_server, tiny_random_checkpoint):
    from fastapi.testclient import TestClient

    from tinysam_kit.integrations.labelstudio import BackendSettings, create_app

    settings = BackendSettings.from_env({}, model=str(tiny_random_checkpoint), label_studio_url=ls_server.url,
                                        label_studio_api_key=TOKEN, points_per_side=8, pred_iou_thresh=0.0,
                                        stability_score_thresh=0.0, min_region_area=1, max_regions=5)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _requests():
    if not LS_PAYLOADS.is_dir():
        return []
    out = []
    for folder in ("stub_modern", "browser"):
        for name, payload in load_payloads(folder):
            if "method" in payload:
                out.append(pytest.param(payload, id=f"{folder}/{name}"))
    return out


def _stored_answer_keys():
    answer = json.loads((LS_PAYLOADS / "stub_modern" / "04_backend_response_predict_batch.json").read_text())
    prediction = answer["response"]["results"][0]
    return set(answer["response"]), set(prediction), set(prediction["result"][0]), set(prediction["result"][0]["value"])


def _check_region(region: dict, task: dict, labels: tuple[str, ...]):
    _, _, region_keys, value_keys = _stored_answer_keys()
    assert set(region) == region_keys
    assert set(region["value"]) == value_keys
    assert (region["from_name"], region["to_name"], region["type"]) == ("brush", "image", "brushlabels")
    assert region["value"]["format"] == "rle"
    assert set(region["value"]["brushlabels"]) <= set(labels)
    width, height = image_size_for(task["data"]["image"])
    assert (region["original_width"], region["original_height"]) == (width, height)
    mask = rle_to_mask(region["value"]["rle"], height, width)
    assert mask.shape == (height, width)
    assert np.isfinite(region["score"])
    return mask


def test_every_captured_request_is_answered_in_the_stored_shape(client):
    requests = [p.values[0] for p in _requests()]
    assert len(requests) >= 15  # 12 captured from the API driver, 3 from the editor
    version = client.get("/versions").json()["versions"][0]
    response_keys, prediction_keys, _, _ = _stored_answer_keys()
    for req in requests:
        resp = client.request(req["method"], req["path"], params=req["query"] or None, json=req["json"])
        where = f"{req['method']} {req['path']}"
        assert resp.status_code == 200, (where, resp.text[:500])
        body = resp.json()
        if req["path"] == "/health":
            assert body["status"] == "UP"
        elif req["path"] == "/setup":
            assert body == {"model_version": version}
        elif req["path"] == "/versions":
            assert body == {"versions": [version]}
        elif req["path"] == "/webhook":
            assert body["status"] == "ok" and body["action"] == req["json"]["action"]
        elif req["path"] == "/predict":
            tasks = req["json"]["tasks"]
            context = req["json"]["params"]["context"]
            assert set(body) == response_keys and body["model_version"] == version
            assert len(body["results"]) == (1 if context else len(tasks))
            for task, prediction in zip(tasks, body["results"]):
                assert set(prediction) == prediction_keys, prediction.get("error")
                assert prediction["model_version"] == version
                for region in prediction["result"]:
                    _check_region(region, task, ("Object", "Background"))
            if context:
                (region,) = body["results"][0]["result"]
                prompt_labels = {r["value"].get("keypointlabels", r["value"].get("rectanglelabels"))[0]
                                 for r in context["result"]}
                assert region["value"]["brushlabels"] == sorted(prompt_labels)
                assert body["results"][0]["score"] == region["score"]
            else:
                assert any(p["result"] for p in body["results"]), "everything mode found no region at all"


def test_interactive_answer_has_the_keys_label_studio_returned_to_the_editor(client):
    """Label Studio hands `results[0]` of our answer to the editor as `data` (checks/ls_response_*)."""
    for name in ("keypoint_positive", "keypoints_pos_neg", "rectangle"):
        stored = json.loads((LS_PAYLOADS / "checks" / f"ls_response_interactive_{name}.json").read_text())
        req = json.loads((LS_PAYLOADS / "browser" / f"ls_to_backend_POST_predict_from_UI_{name}.json").read_text())
        body = client.post("/predict", json=req["json"]).json()
        ours = body["results"][0]
        assert set(ours) == set(stored["data"])
        assert set(ours["result"][0]) == set(stored["data"]["result"][0])


def test_captured_interactive_prompts_give_the_predictors_mask(client, ls_server):
    """The RLE we answer is exactly TinySAM's mask for the prompt, converted from percentages."""
    from tinysam_kit.data.images import load_image

    backend = client.app.state.backend
    name = "07_ls_to_backend_POST_predict_interactive_keypoints_pos_neg_api.json"
    req = json.loads((LS_PAYLOADS / "stub_modern" / name).read_text())["json"]
    region = client.post("/predict", json=req).json()["results"][0]["result"][0]
    image = load_image(ls_server.images[req["tasks"][0]["data"]["image"]])
    h, w = image.shape[:2]
    points = [(r["value"]["x"] / 100 * w, r["value"]["y"] / 100 * h) for r in req["params"]["context"]["result"]]
    labels = [1 if r["is_positive"] else 0 for r in req["params"]["context"]["result"]]
    state = backend.predictor.embed(image)
    expected, score, _ = backend.predictor.segment(points, labels, image_embedding=state)
    got = rle_to_mask(region["value"]["rle"], h, w)
    assert np.array_equal(got, expected)
    assert region["score"] == pytest.approx(score)


def test_legacy_lsml109_interactive_arguments_are_understood(client):
    """The legacy package's predict() saw the same context; it must produce the same answer shape."""
    kwargs = json.loads((LS_PAYLOADS / "stub_lsml109" / "predict_kwargs_interactive.json").read_text())["kwargs"]
    req = json.loads((LS_PAYLOADS / "stub_modern" / "05_ls_to_backend_POST_predict_interactive_keypoint_api.json")
                     .read_text())["json"]
    body = client.post("/predict", json={**req, "params": kwargs}).json()
    assert body["results"][0]["result"][0]["value"]["brushlabels"] == ["Object"]
