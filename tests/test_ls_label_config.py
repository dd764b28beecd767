"""Labeling-config parsing and smart-tool context → prompt conversion."""

from __future__ import annotations

import pytest

from tinysam_kit.integrations.labelstudio.backend import BadRequest, parse_context
from tinysam_kit.integrations.labelstudio.label_config import LabelConfigError, parse_label_config

CAPTURED = """<View>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Object" background="#FF0000"/><Label value="Background" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Object" smart="true"/><Label value="Background" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""


def test_captured_config():
    cfg = parse_label_config(CAPTURED)
    assert cfg.images == {"image": "image"}
    assert cfg.brush_for("image").name == "brush"
    assert cfg.brush_for("image").labels == ("Object", "Background")
    assert [c.name for c in cfg.keypoints] == ["kp"] and cfg.keypoints[0].smart
    assert [c.name for c in cfg.rectangles] == ["rect"] and cfg.rectangles[0].smart


def test_two_images_each_with_its_brush_and_plain_brush_tag():
    cfg = parse_label_config("""<View><Header value="x"/>
      <Image name="left" value="$a"/><Image name="right" value="$b"/>
      <Brush name="b2" toName="right"/><BrushLabels name="b1" toName="left"><Label value="A"/></BrushLabels>
      <Choices name="c" toName="left"><Choice value="x"/></Choices></View>""")
    assert cfg.images == {"left": "a", "right": "b"}
    assert cfg.brush_for("left").name == "b1" and cfg.brush_for("right").tag == "brush"
    assert cfg.others == ("c",)


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("<View><Image name='i' value='$i'/>", "not valid XML"),
    ("<View><Text name='t' value='$t'/></View>", "no <Image"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='j'/></View>", "BrushLabels"),
    ("<!DOCTYPE v [<!ENTITY x 'y'>]><View/>", "DOCTYPE"),
])
def test_unusable_configs(text, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(text)


def test_polygon_controls_are_outputs_and_win_beside_brushes():
    polygons = ('<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
                '<Label value="Car"/></PolygonLabels></View>')
    cfg = parse_label_config(polygons)
    assert cfg.brushes == () and cfg.output_for("image").name == "poly" and cfg.output_for().labels == ("Car",)
    both = parse_label_config(polygons.replace("</View>", '<BrushLabels name="b" toName="image"/></View>'))
    assert both.output_for("image").tag == "polygonlabels" and both.brush_for("image").name == "b"
    with pytest.raises(LabelConfigError, match="PolygonLabels"):
        cfg.output_for("elsewhere")


def kp(x, y, positive=True, to="image", label="Object"):
    return {"type": "keypointlabels", "to_name": to, "from_name": "kp", "is_positive": positive,
            "original_width": 640, "original_height": 480, "value": {"x": x, "y": y, "keypointlabels": [label]}}


def test_keypoints_combine_and_rectangles_are_boxes():
    cfg = parse_label_config(CAPTURED)
    prompt = parse_context({"result": [kp(45, 50), kp(55, 52, False)]}, cfg, 100)
    assert prompt.points == [(45.0, 50.0), (55.0, 52.0)] and prompt.point_labels == [1, 0]
    assert prompt.label == "Object" and prompt.original_size == (640, 480)
    rect = {"type": "rectanglelabels", "to_name": "image", "from_name": "rect",
            "value": {"x": 30, "y": 30, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["Object"]}}
    assert parse_context({"result": [rect]}, cfg, 100).box == (30.0, 30.0, 60.0, 70.0)
    rotated = {**rect, "value": {**rect["value"], "x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90}}
    x0, y0, x1, y1 = parse_context({"result": [rotated]}, cfg, 100).box
    assert (x0, y0, x1, y1) == pytest.approx((40, 10, 50, 30))
    # on a 200×100 image the same rotation turns 40×10 px into 10×40 px: pixel units, not percent units
    rotated.update(original_width=200, original_height=100)
    x0, y0, x1, y1 = parse_context({"result": [rotated]}, cfg, 100).box
    assert (x0, y0, x1, y1) == pytest.approx((45, 10, 50, 50))
    # edge clicks a hair outside 0..100 % are clamped
    assert parse_context({"result": [kp(100.4, -0.2)]}, cfg, 100).points == [(100.0, 0.0)]


def test_contexts_without_prompts():
    cfg = parse_label_config(CAPTURED)
    assert parse_context(None, cfg, 10) is None
    assert parse_context({"result": []}, cfg, 10) is None
    brush = {"type": "brushlabels", "to_name": "image", "value": {"format": "rle", "rle": []}}
    assert parse_context({"result": [brush]}, cfg, 10) is None


@pytest.mark.parametrize("context, message", [
    ("x", "must be an object"),
    ({"result": "x"}, "must be a list"),
    ({"result": [1]}, r"result\[0\] must be an object"),
    ({"result": [kp(10, 10, to="other")]}, "not an <Image>"),
    ({"result": [kp("10", 10)]}, "must be a number"),
    ({"result": [kp(float("nan"), 10)]}, "finite"),
    ({"result": [kp(10, 150)]}, "outside the image"),
    ({"result": [{**kp(10, 10), "original_width": 0}]}, "positive integers"),
    ({"result": [kp(1, 1)] * 11}, "limit is 10"),
])
def test_bad_contexts(context, message):
    with pytest.raises(BadRequest, match=message):
        parse_context(context, parse_label_config(CAPTURED), 10)
