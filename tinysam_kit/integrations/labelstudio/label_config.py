"""Which parts of a Label Studio labeling config the backend works with.

The backend needs: the `<Image>` whose task field holds the picture, the control its masks go to
(`<BrushLabels>`/`<Brush>` for brush masks, `<PolygonLabels>`/`<Polygon>` for polygons), and the
keypoint/rectangle controls whose regions arrive as prompts.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache

MAX_CONFIG_CHARS = 1_000_000

BRUSH_TAGS = {"brushlabels": "brushlabels", "brush": "brush"}
POLYGON_TAGS = {"polygonlabels": "polygonlabels", "polygon": "polygon"}
KEYPOINT_TAGS = {"keypointlabels": "keypointlabels", "keypoint": "keypoint"}
RECTANGLE_TAGS = {"rectanglelabels": "rectanglelabels", "rectangle": "rectangle"}


class LabelConfigError(ValueError):
    """The labeling config cannot be used by this backend; the message says what is missing."""


@dataclass(frozen=True)
class Control:
    name: str
    tag: str  # lower-case tag, e.g. "brushlabels"
    to_name: tuple[str, ...]
    labels: tuple[str, ...] = ()
    smart: bool = False

    @property
    def result_type(self) -> str:
        """The `type` of results this control produces ("brushlabels", "keypointlabels", ...)."""
        return self.tag


@dataclass(frozen=True)
class LabelConfig:
    images: dict[str, str]  # <Image name> -> task data key (the `$image` in value="$image", without `$`)
    brushes: tuple[Control, ...]
    keypoints: tuple[Control, ...] = ()
    rectangles: tuple[Control, ...] = ()
    others: tuple[str, ...] = field(default=())
    polygons: tuple[Control, ...] = ()

    def brush_for(self, image_name: str | None = None) -> Control:
        """The brush control that draws on `image_name` (the first one when not given)."""
        return _control_for(self.brushes, image_name, "<BrushLabels>")

    def output_for(self, image_name: str | None = None) -> Control:
        """The control TinySAM's masks go to on `image_name`: its polygon control when it has one (alone or
        beside a brush control), else its brush control."""
        if any(image_name is None or image_name in c.to_name for c in self.polygons):
            return _control_for(self.polygons, image_name, "<PolygonLabels>")
        return _control_for(self.brushes, image_name, "<BrushLabels> or <PolygonLabels>")

    @property
    def outputs(self) -> tuple[Control, ...]:
        return self.polygons + self.brushes

    def image_key(self, image_name: str) -> str:
        return self.images[image_name]

    def prompt_control(self, from_name: str) -> Control | None:
        for control in self.keypoints + self.rectangles:
            if control.name == from_name:
                return control
        return None


def _control_for(controls: tuple[Control, ...], image_name: str | None, what: str) -> Control:
    for control in controls:
        if image_name is None or image_name in control.to_name:
            return control
    raise LabelConfigError(f"no {what} control has toName={image_name!r}; "
                           f"such controls: {', '.join(c.name for c in controls) or 'none'}")


def _bool(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _to_names(element: ET.Element) -> tuple[str, ...]:
    raw = element.get("toName") or element.get("toname") or ""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@lru_cache(maxsize=64)
def parse_label_config(text: str) -> LabelConfig:
    """Parse the XML labeling config; raise LabelConfigError unless it has an image and a brush or polygon
    control."""
    if not isinstance(text, str) or not text.strip():
        raise LabelConfigError("label config is empty")
    if len(text) > MAX_CONFIG_CHARS:
        raise LabelConfigError(f"label config is {len(text)} characters; the limit is {MAX_CONFIG_CHARS}")
    if "<!DOCTYPE" in text.upper() or "<!ENTITY" in text.upper():
        # Labeling configs never need a DTD; refusing it rules out entity-expansion attacks.
        raise LabelConfigError("label config must not contain a DOCTYPE or ENTITY declaration")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc

    images: dict[str, str] = {}
    brushes: list[Control] = []
    polygons: list[Control] = []
    keypoints: list[Control] = []
    rectangles: list[Control] = []
    others: list[str] = []
    for element in root.iter():
        tag = str(element.tag).lower()
        name = element.get("name")
        if tag == "image":
            value = (element.get("value") or "").strip()
            if name and value:
                images[name] = value[1:] if value.startswith("$") else value
            continue
        if not name:
            continue
        labels = tuple(child.get("value") for child in element
                       if str(child.tag).lower() == "label" and child.get("value") is not None)
        smart = _bool(element.get("smart")) or _bool(element.get("smartOnly")) or any(
            _bool(child.get("smart")) for child in element if str(child.tag).lower() == "label")
        if tag in BRUSH_TAGS:
            brushes.append(Control(name, tag, _to_names(element), labels, smart))
        elif tag in POLYGON_TAGS:
            polygons.append(Control(name, tag, _to_names(element), labels, smart))
        elif tag in KEYPOINT_TAGS:
            keypoints.append(Control(name, tag, _to_names(element), labels, smart))
        elif tag in RECTANGLE_TAGS:
            rectangles.append(Control(name, tag, _to_names(element), labels, smart))
        elif element.get("toName") is not None:
            others.append(name)

    if not images:
        raise LabelConfigError('label config has no <Image name="..." value="$field"> tag')
    brushes = [b for b in brushes if any(t in images for t in b.to_name)]
    polygons = [p for p in polygons if any(t in images for t in p.to_name)]
    if not brushes and not polygons:
        raise LabelConfigError("label config has no <BrushLabels> (or <Brush>) or <PolygonLabels> (or <Polygon>) "
                               f"control with toName pointing to an <Image> ({', '.join(images)}); TinySAM answers "
                               "with brush masks or polygons")
    return LabelConfig(images, tuple(brushes), tuple(keypoints), tuple(rectangles), tuple(others), tuple(polygons))
