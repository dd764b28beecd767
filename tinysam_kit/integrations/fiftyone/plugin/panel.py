"""TinySAM click-to-segment: a Python panel in the App's sample modal.

FiftyOne's Python panels have no image component that reports where it was clicked (`ImageView` runs an
operator with fixed parameters), so the sample is drawn inside a Plotly chart (`PlotlyView`), whose click
and box-select events carry data coordinates:

* the picture (the sample with the current mask, points and box painted on it, rendered here as a PNG data
  URL) is the chart's layout image, placed on axes measured in image pixels (y pointing down);
* a transparent heatmap over it, one cell per `cell` × `cell` pixels, turns a click into the pixel position
  of the clicked cell's centre (Plotly reports x/y of heatmap cells);
* in box mode a transparent grid of scatter points is added and the chart drags a selection rectangle; the
  App sends the selected grid points, and the box is their extent widened by half a grid step.

The image's embedding is computed once per image by the process-wide predictor (`get_predictor`, with its
embedding cache and store), so every later click runs only the prompt decoder.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections import OrderedDict

import fiftyone.operators as foo
import fiftyone.operators.types as types
import numpy as np

from tinysam_kit.data.images import ImageError, load_image
from tinysam_kit.inference import policy
from tinysam_kit.inference.predictor import PromptError
from tinysam_kit.integrations.fiftyone import labels as L
from tinysam_kit.integrations.fiftyone.plugin.app_refresh import show_written
from tinysam_kit.integrations.fiftyone.predictors import get_predictor, image_key
from tinysam_kit.integrations.fiftyone.runner import RunError, check_field_name, field_type_name

DEFAULT_FIELD = "tinysam_clicks"
DEFAULT_LABEL = "object"
PREVIEW_MAX_SIDE = 1024  # the picture sent to the browser; clicks are still mapped to full-resolution pixels
CLICK_CELLS = 256  # heatmap cells along the image's long side: a click lands on a cell centre
BOX_GRID = 64  # scatter points along the long side for drag-selected boxes
PLOT_HEIGHT = 520
MASK_COLOR = np.array([30, 144, 255], dtype=np.float32)  # dodger blue
POSITIVE_COLOR = (0, 200, 0)
NEGATIVE_COLOR = (230, 0, 0)
BOX_COLOR = (255, 215, 0)
SAVED_COLOR = (255, 140, 0)
CACHED_IMAGES = 4
CACHED_PREVIEWS = 8  # each holds a full-resolution mask
TRANSPARENT = [[0, "rgba(0,0,0,0)"], [1, "rgba(0,0,0,0)"]]

_lock = threading.Lock()
_images: OrderedDict[str, np.ndarray] = OrderedDict()
_previews: OrderedDict[tuple, dict] = OrderedDict()


def _remember(cache: OrderedDict, key, value, limit: int):
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)
    return value


def _recall(cache: OrderedDict, key):
    with _lock:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
        return value


# ------------------------------------------------------------------------------------- geometry

def cell_size(width: int, height: int, cells: int = CLICK_CELLS) -> int:
    return max(1, math.ceil(max(width, height) / cells))


def click_to_pixel(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """A click's chart coordinates (image pixels) clamped into the image."""
    return min(max(float(x), 0.0), float(width)), min(max(float(y), 0.0), float(height))


def selection_to_box(points: list[dict], width: int, height: int) -> list[float] | None:
    """The pixel box [x0, y0, x1, y1] a drag selected: the selected grid points' extent widened by half a
    grid step (the rectangle's edges lie between the outermost selected points and the next ones)."""
    xs = [float(p["x"]) for p in points if p.get("x") is not None and p.get("y") is not None]
    ys = [float(p["y"]) for p in points if p.get("x") is not None and p.get("y") is not None]
    if not xs:
        return None
    half = max(width, height) / BOX_GRID / 2
    x0, y0 = click_to_pixel(min(xs) - half, min(ys) - half, width, height)
    x1, y1 = click_to_pixel(max(xs) + half, max(ys) + half, width, height)
    return [x0, y0, x1, y1]


# ---------------------------------------------------------------------------------- segmentation
def _image(filepath: str, key: str) -> np.ndarray:
    image = _recall(_images, key)
    if image is None:
        image = _remember(_images, key, load_image(filepath), CACHED_IMAGES)
    return image


def saved_masks(sample, field: str) -> dict[str, np.ndarray]:
    """{label id: mask on the image's pixel grid} of the masks already in `sample[field]` (none when the
    field is missing or not Detections), so the panel shows what was saved without a round trip to the
    Sample tab."""
    try:
        value = sample[field]
    except (KeyError, AttributeError):
        return {}
    out = {}
    for det in getattr(value, "detections", None) or []:
        if det.mask is None and not det.mask_path:
            continue
        height, width = _image(sample.filepath, image_key(sample.filepath)).shape[:2]
        out[det.id] = det.to_segmentation(frame_size=(width, height), target=1).get_mask().astype(bool)
    return out


def segment_clicks(filepath: str, points: list, box: list | None, saved: dict | None = None) -> dict:
    """Mask, score and overlay picture for the clicks `points` ([[x, y, 1|0], ...], pixels) and `box`, with the
    masks already `saved` ({id: mask}) outlined.

    The embedding comes from the shared predictor's cache after the first call for an image; results are
    kept per prompt set so the panel's re-renders do not run the decoder again.
    """
    predictor = get_predictor()
    key = image_key(filepath)
    saved = saved or {}
    memo = (predictor.model_version, key, tuple(tuple(p) for p in points), tuple(box) if box else None,
            tuple(sorted(saved)))
    hit = _recall(_previews, memo)
    if hit is not None:
        return hit
    image = _image(filepath, key)
    height, width = image.shape[:2]
    mask, score, raw = None, None, None
    if points or box:
        state = predictor.embed(image, key=key)
        coords = np.array([p[:2] for p in points], dtype=np.float64) if points else None
        point_labels = np.array([p[2] for p in points], dtype=np.float64) if points else None
        mask, score, raw = predictor.segment(coords, point_labels, np.array(box, dtype=np.float64) if box else None,
                                             image_embedding=state)
    result = {"width": width, "height": height, "mask": mask, "saved": len(saved), "score": score, "predicted_iou": raw,
              "picture": overlay_png(image, mask, points, box, list(saved.values()))}
    return _remember(_previews, memo, result, CACHED_PREVIEWS)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    return mask & ~inner


def overlay_png(image: np.ndarray, mask: np.ndarray | None, points: list, box: list | None,
                saved: list[np.ndarray] = ()) -> str:
    """The image with saved masks outlined in orange, the current mask tinted and outlined, positive points
    green, negative red, the box yellow, as a PNG data URL no larger than PREVIEW_MAX_SIDE."""
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    scale = min(1.0, PREVIEW_MAX_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image).resize(size, Image.BILINEAR) if scale < 1 else Image.fromarray(image)

    def fit(m: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)) if scale < 1 else m

    rgb = np.asarray(picture, dtype=np.float32).copy()
    for old in saved:
        rgb[_outline(fit(old))] = SAVED_COLOR
    if mask is not None and mask.any():
        small = fit(mask)
        rgb[small] = 0.45 * rgb[small] + 0.55 * MASK_COLOR
        rgb[_outline(small)] = 255
    picture = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(3, round(max(size) / 100))
    if box:
        draw.rectangle([v * scale for v in box], outline=BOX_COLOR, width=max(2, radius // 2))
    for x, y, label in points:
        cx, cy = x * scale, y * scale
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius],
                     fill=POSITIVE_COLOR if label else NEGATIVE_COLOR, outline=(255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def save_mask(sample, field: str, mask: np.ndarray, label: str, score: float, predicted_iou: float):
    """Append the mask to `sample[field]` (a Detections field, created when missing) as a Detection with its
    mask cropped to its box; returns the Detection."""
    check_field_name(field, "output field")
    have = field_type_name(sample._dataset.get_field_schema(), field)
    if have is not None and have != "Detections":
        raise RunError(f"field {field!r} already exists as {have}; choose another output field")
    results = L.results_to_detections([L.MaskResult(mask, score, label,
                                                    attributes={"predicted_iou": predicted_iou})])
    if not results.detections:
        raise PromptError("the mask is empty; click on the object first")
    existing = sample[field] if have is not None else None
    kept = list(existing.detections) if existing is not None else []
    sample[field] = type(results)(detections=kept + results.detections)
    sample.save()
    return results.detections[0]


def plot_figure(result: dict, box_mode: bool) -> tuple[list[dict], dict]:
    """Plotly traces and layout: the picture as layout image on pixel axes, a transparent click heatmap, and
    in box mode a transparent grid of points for drag selection."""
    width, height = result["width"], result["height"]
    cell = cell_size(width, height)
    cols, rows = math.ceil(width / cell), math.ceil(height / cell)
    traces = [{"type": "heatmap", "name": "clicks", "z": [[0] * cols for _ in range(rows)], "x0": cell / 2,
               "dx": cell, "y0": cell / 2, "dy": cell, "zmin": 0, "zmax": 1, "colorscale": TRANSPARENT,
               "showscale": False, "hoverinfo": "none"}]
    if box_mode:
        step = max(width, height) / BOX_GRID
        xs = np.arange(step / 2, width, step)
        ys = np.arange(step / 2, height, step)
        gx, gy = np.meshgrid(xs, ys)
        traces.append({"type": "scatter", "mode": "markers", "name": "box grid",
                       "x": np.round(gx.ravel(), 2).tolist(), "y": np.round(gy.ravel(), 2).tolist(),
                       "marker": {"opacity": 0, "size": 4}, "selected": {"marker": {"opacity": 0}},
                       "unselected": {"marker": {"opacity": 0}}, "hoverinfo": "none"})
    axis = {"visible": False, "showgrid": False, "zeroline": False, "fixedrange": True}
    layout = {
        "xaxis": {**axis, "range": [0, width], "constrain": "domain"},
        "yaxis": {**axis, "range": [height, 0], "scaleanchor": "x", "scaleratio": 1, "constrain": "domain"},
        "images": [{"source": result["picture"], "xref": "x", "yref": "y", "x": 0, "y": 0, "sizex": width,
                    "sizey": height, "xanchor": "left", "yanchor": "top", "sizing": "stretch",
                    "layer": "below"}],
        "margin": {"t": 0, "l": 0, "r": 0, "b": 0, "pad": 0},
        "dragmode": "select" if box_mode else False,
        "hovermode": "closest",
        "showlegend": False,
    }
    return traces, layout


# ------------------------------------------------------------------------------------------ panel
class ClickToSegmentPanel(foo.Panel):
    """Click on the open sample to segment an object with TinySAM, then save it as a Detection with mask."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="click_to_segment",
            label="TinySAM: Click to segment",
            surfaces="modal",
            icon="ads_click",
            help_markdown="Click the object (positive point); Shift+click or the *Negative* switch adds "
                          "negative points; *Box* mode drags a box. *Save* writes a Detection with its mask.",
        )

    # ----------------------------------------------------------------- state
    def _reset(self, ctx, message: str | None = None) -> None:
        ctx.panel.state.set({"sample_id": ctx.current_sample, "points": [], "box": None, "message": message})

    def _sample(self, ctx):
        if not ctx.current_sample or ctx.dataset is None:
            return None
        if ctx.panel.state.sample_id != ctx.current_sample:
            self._reset(ctx)
        return ctx.dataset[ctx.current_sample]

    def _prompts(self, ctx) -> tuple[list, list | None]:
        return list(ctx.panel.state.points or []), ctx.panel.state.box or None

    def on_load(self, ctx):
        self._reset(ctx)

    def on_change_current_sample(self, ctx):
        self._reset(ctx)

    # ---------------------------------------------------------------- events
    def on_click_image(self, ctx):
        sample = self._sample(ctx)
        x, y = ctx.params.get("x"), ctx.params.get("y")
        if sample is None or x is None or y is None:
            return
        result = self._segment(ctx, sample, *self._prompts(ctx))
        if result is None:
            return
        negative = bool(ctx.panel.state.get("controls.negative")) or bool(ctx.params.get("shift_pressed"))
        px, py = click_to_pixel(x, y, result["width"], result["height"])
        points, box = self._prompts(ctx)
        points.append([round(px, 2), round(py, 2), 0 if negative else 1])
        ctx.panel.state.set({"points": points, "message": None})

    def on_select_box(self, ctx):
        sample = self._sample(ctx)
        selected = ctx.params.get("data") or []
        if sample is None or not selected:
            return
        result = self._segment(ctx, sample, [], None)
        if result is None:
            return
        box = selection_to_box(selected, result["width"], result["height"])
        if box is not None:
            ctx.panel.state.set({"box": [round(v, 2) for v in box], "message": None})

    def on_change_mode(self, ctx):
        ctx.panel.state.set("message", None)

    def undo(self, ctx):
        points, box = self._prompts(ctx)
        if points:
            points.pop()
            ctx.panel.state.set("points", points)
        elif box:
            ctx.panel.state.set("box", None)

    def clear(self, ctx):
        self._reset(ctx)

    def save(self, ctx):
        sample = self._sample(ctx)
        if sample is None:
            return
        points, box = self._prompts(ctx)
        if not points and not box:
            ctx.panel.state.set("message", "Nothing to save: click on an object first.")
            return
        field = self._field(ctx)
        label = (ctx.panel.state.get("fields.label") or DEFAULT_LABEL).strip() or DEFAULT_LABEL
        result = self._segment(ctx, sample, points, box)
        if result is None:
            return
        new_field = field not in ctx.dataset.get_field_schema()
        try:
            save_mask(sample, field, result["mask"], label, result["score"], result["predicted_iou"])
        except (RunError, PromptError) as exc:
            ctx.panel.state.set("message", f"Not saved: {exc}")
            return
        ctx.panel.state.set({"points": [], "box": None, "message": f"Saved '{label}' to '{field}'."})
        ctx.ops.notify(f"Saved '{label}' to '{field}' (score {result['score']:.2f})", variant="success")
        show_written(ctx, self.plugin_name, field, {sample.id}, new_field)

    def _field(self, ctx) -> str:
        return (ctx.panel.state.get("fields.field") or DEFAULT_FIELD).strip()

    def _segment(self, ctx, sample, points, box) -> dict | None:
        try:
            return segment_clicks(sample.filepath, points, box, saved_masks(sample, self._field(ctx)))
        except (ImageError, PromptError, OSError, policy.PolicyError) as exc:
            ctx.panel.state.set("message", f"Cannot segment this sample: {exc}")
            return None

    # ---------------------------------------------------------------- layout
    def render(self, ctx):
        panel = types.Object()
        sample = self._sample(ctx)
        if sample is None or ctx.dataset.media_type != "image":
            text = ("Open a sample to segment it with clicks." if sample is None else
                    f"TinySAM segments images; this dataset's media type is {ctx.dataset.media_type!r}.")
            panel.md(text, name="intro")
            return types.Property(panel, view=types.GridView(orientation="vertical"))
        choice = policy.resolve_model(policy.AUTO)
        model_text = f"**Model:** {choice.name}"
        if choice.note:
            model_text += f" — {choice.note}"
        panel.md(model_text, name="model")

        controls = panel.h_stack("controls", align_x="left", gap=2)
        controls.enum("mode", ["points", "box"], default="points", label="Prompt",
                      view=types.RadioGroup(orientation="horizontal"), on_change=self.on_change_mode)
        controls.bool("negative", default=False, label="Negative points (or Shift+click)",
                      view=types.SwitchView())
        controls.btn("undo", label="Undo", on_click=self.undo, variant="outlined")
        controls.btn("clear", label="Clear", on_click=self.clear, variant="outlined")
        controls.btn("save", label="Save", on_click=self.save, variant="contained")

        points, box = self._prompts(ctx)
        result = self._segment(ctx, sample, points, box)
        if result is not None:
            traces, layout = plot_figure(result, ctx.panel.state.get("controls.mode") == "box")
            panel.plot("canvas", data=traces, layout=layout, config={"displayModeBar": False,
                                                                     "scrollZoom": False},
                       on_click=self.on_click_image, on_selected=self.on_select_box, height=f"{PLOT_HEIGHT}px")

        n_pos = sum(1 for p in points if p[2])
        status = f"{n_pos} positive, {len(points) - n_pos} negative point(s)" + (", a box" if box else "")
        if result is not None and result["score"] is not None:
            status += f"; mask score {result['score']:.2f}, {int(result['mask'].sum())} px"
        if result is not None and result["saved"]:
            status += f" — {result['saved']} saved in '{self._field(ctx)}' (orange outlines)"
        message = ctx.panel.state.message
        panel.md(status + (f"\n\n{message}" if message else ""), name="status")

        fields = panel.h_stack("fields", align_x="left", gap=2)
        fields.str("label", default=DEFAULT_LABEL, label="Label")
        fields.str("field", default=DEFAULT_FIELD, label="Output field (Detections)")
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1))


PANELS = [ClickToSegmentPanel]
