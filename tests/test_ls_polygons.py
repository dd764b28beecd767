"""Projects whose output control is `<PolygonLabels>` get polygons (percent coordinates, one region per connected
part, holes filled), through real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import httpx
import pytest
from labelstudio_helpers import (
    FakeLabelStudio,
    UvicornThread,
    encode_image,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
    synthetic_image,
)

from tinysam_kit.inference.encodings.polygons import MIN_PART_AREA, mask_to_parts, polygons_to_mask
from tinysam_kit.integrations.labelstudio import BackendSettings, create_app
from tinysam_kit.integrations.labelstudio.backend import TinySamBackend

POLYGONS = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Shape"/><Label value="Other"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Shape"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Other"/></RectangleLabels>
</View>"""
BOTH = POLYGONS.replace("<KeyPointLabels", '<BrushLabels name="brush" toName="image"><Label value="Shape"/>'
                                           '</BrushLabels>\n  <KeyPointLabels')
IMAGE = synthetic_image(320, 240, seed=4)
URL = "/data/upload/1/shapes.png"


@pytest.fixture(scope="module")
def server():
    with FakeLabelStudio({URL: encode_image(IMAGE)}) as ls:
        settings = BackendSettings.from_env({}, model="demo", label_studio_url=ls.url, points_per_side=8)
        backend = TinySamBackend(settings)
        with UvicornThread(create_app(settings, backend)) as http:
            yield http.url, backend
        backend.close()


def rectangle_prompt(config: str) -> dict:
    context = {"result": [{"original_width": 320, "original_height": 240, "from_name": "rect", "to_name": "image",
                           "type": "rectanglelabels", "value": {"x": 23, "y": 23, "width": 30, "height": 31,
                                                               "rotation": 0, "rectanglelabels": ["Other"]}}]}
    return {"tasks": [{"id": 1, "data": {"image": URL}}], "label_config": config, "project": "1.1",
            "params": {"context": context}}


def to_pixels(region: dict) -> list[float]:
    w, h = region["original_width"], region["original_height"]
    return [c for x, y in region["value"]["points"] for c in (x / 100 * w, y / 100 * h)]


@pytest.mark.parametrize("config", [POLYGONS, BOTH], ids=["polygons alone", "beside brush labels"])
def test_a_box_is_answered_with_the_predictors_mask_as_polygons(server, config):
    url, backend = server
    resp = httpx.post(url + "/predict", json=rectangle_prompt(config), timeout=60)
    assert resp.status_code == 200, resp.text
    regions = resp.json()["results"][0]["result"]
    state = backend.predictor.embed(IMAGE)
    mask, score, _ = backend.predictor.segment(box=(73.6, 55.2, 169.6, 129.6), image_embedding=state)
    parts = mask_to_parts(mask)
    assert len(regions) == len(parts) >= 1  # one region per connected part above MIN_PART_AREA
    for region, part in zip(regions, parts):
        assert (region["from_name"], region["type"]) == ("poly", "polygonlabels")
        assert region["value"]["polygonlabels"] == ["Other"] and region["value"]["closed"] is True
        assert all(0 <= c <= 100 for point in region["value"]["points"] for c in point)
        assert to_pixels(region) == pytest.approx(part)
        assert region["score"] == pytest.approx(score)
    drawn = polygons_to_mask([to_pixels(r) for r in regions], 240, 320)
    assert (drawn & mask).sum() / (drawn | mask).sum() > 0.9


def test_batch_regions_are_polygons_with_the_first_label(server):
    url, _ = server
    body = {"tasks": [{"id": 1, "data": {"image": URL}}], "label_config": POLYGONS, "project": "1.1"}
    (prediction,) = httpx.post(url + "/predict", json=body, timeout=120).json()["results"]
    assert prediction["result"]
    for region in prediction["result"]:
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Shape"]
        assert polygons_to_mask([to_pixels(region)], 240, 320).sum() >= MIN_PART_AREA
        assert 0.0 <= region["score"] <= 1.0
