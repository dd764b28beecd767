"""End to end in the real App: the "TinySAM: Click to segment" panel in the sample modal, driven by Debian's
Chromium through Playwright, with the bundled demo model (what `auto` resolves to offline).

Open a sample, open the panel, click on the red rectangle (the panel's picture shows the mask), Shift+click
the background (a negative point), name the label and save (the panel outlines the saved mask, the sidebar
gets the new field and the modal's Sample tab draws the saved mask), drag a box around the blue rectangle in
box mode, then see the mask in the grid and the field in the reopened modal, all without reloading the page.
Screenshots go to $TINYSAM_TEST_ARTIFACTS/panel (default test-artifacts/panel); the test prints the folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from fiftyone_helpers import REPO, fiftyone_env
from test_fiftyone_app_e2e import (
    AppServer,
    app_page,
    colour,
    differs,
    on_screen,
    open_dataset,
    require_browser,
    scene,
    screenshot_until,
)

ARTIFACTS = Path(os.environ.get("TINYSAM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "panel"
RED_RECT = (30, 40, 140, 120)  # x0, y0, x1, y1 (exclusive) of the red rectangle in `scene`'s 320×240 image


def picture_to_screen(page, xy: tuple[float, float], size=(320, 240)) -> tuple[float, float]:
    """Screen position of an image pixel in the panel's picture (the Plotly layout image)."""
    frame = page.locator("[data-cy=modal] .js-plotly-plot svg image").first.bounding_box()
    return frame["x"] + xy[0] / size[0] * frame["width"], frame["y"] + xy[1] / size[1] * frame["height"]


def close_modal(page) -> None:
    """Escape closes the modal once the sample view (not a panel's control) has the keyboard focus."""
    frame = page.locator("[data-cy=modal-looker-container]").first.bounding_box()
    page.mouse.click(frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] - 5)
    for _ in range(2):
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
        if not page.locator("[data-cy=modal]").count():
            return


def pixel(path: Path, xy: tuple[float, float]) -> tuple[float, ...]:
    return colour(path, xy, r=0)


def changed(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a pixel of the picture changed colour (the panel tints masked pixels towards blue)."""
    return sum(abs(a - b) for a, b in zip(before[:3], after[:3])) > 40


def test_panel_geometry_and_save_without_the_app(tmp_path, monkeypatch):
    """The panel's parts the App calls into: click and box mapping, segmentation with the shared predictor, and
    saving (append, refuse a field of another type, refuse an empty mask)."""
    monkeypatch.setenv("TINYSAM_OFFLINE", "1")
    fiftyone_env()
    import fiftyone as fo

    from tinysam_kit.inference.predictor import PromptError
    from tinysam_kit.integrations.fiftyone.labels import tight_box
    from tinysam_kit.integrations.fiftyone.plugin import panel as P
    from tinysam_kit.integrations.fiftyone.runner import RunError

    assert P.click_to_pixel(-3, 500, 320, 240) == (0.0, 240.0)
    step = 320 / P.BOX_GRID
    box = P.selection_to_box([{"x": 177.5, "y": 127.5}, {"x": 302.5, "y": 212.5}, {"x": None, "y": 1}], 320, 240)
    assert box == pytest.approx([177.5 - step / 2, 127.5 - step / 2, 302.5 + step / 2, 212.5 + step / 2])
    assert P.selection_to_box([], 320, 240) is None

    scene(tmp_path / "scene.png")
    dataset = fo.Dataset()
    sample = fo.Sample(filepath=str(tmp_path / "scene.png"), note=fo.Classification(label="x"))
    dataset.add_sample(sample)
    result = P.segment_clicks(sample.filepath, [[85.0, 80.0, 1]], None)
    assert result["mask"][RED_RECT[1] + 5 : RED_RECT[3] - 5, RED_RECT[0] + 5 : RED_RECT[2] - 5].all()
    assert not result["mask"][200:, :100].any() and 0 <= result["score"] <= 1
    assert result["picture"].startswith("data:image/png;base64,")
    assert P.segment_clicks(sample.filepath, [[85.0, 80.0, 1]], None) is result  # re-renders reuse it
    trace_types = [t["type"] for t in P.plot_figure(result, box_mode=True)[0]]
    assert trace_types == ["heatmap", "scatter"]

    P.save_mask(sample, "clicks", result["mask"], "red", result["score"], result["predicted_iou"])
    P.save_mask(sample, "clicks", result["mask"], "again", result["score"], result["predicted_iou"])
    sample.reload()
    assert [d.label for d in sample.clicks.detections] == ["red", "again"]
    x0, y0, x1, y1 = tight_box(result["mask"])  # stored cropped to its box, as every TinySAM tool writes masks
    assert np.array_equal(sample.clicks.detections[0].mask, result["mask"][y0 : y1 + 1, x0 : x1 + 1])
    assert set(P.saved_masks(sample, "clicks")) == {d.id for d in sample.clicks.detections}
    with pytest.raises(RunError, match="already exists as Classification"):
        P.save_mask(sample, "note", result["mask"], "red", 1.0, 1.0)
    with pytest.raises(PromptError, match="empty"):
        P.save_mask(sample, "clicks", np.zeros_like(result["mask"]), "red", 1.0, 1.0)
    dataset.delete()


@pytest.mark.e2e
@pytest.mark.slow
def test_click_to_segment_panel_saves_a_mask(tmp_path):
    require_browser()
    info = fiftyone_env()
    import fiftyone as fo

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {ARTIFACTS}")
    shots = {k: ARTIFACTS / f"{k}.png" for k in ("modal_before", "panel_open", "positive_click", "negative_click",
                                                 "saved_panel", "saved_sample_tab", "box_drag", "saved_grid",
                                                 "reopened_modal", "failure")}
    scene(tmp_path / "scene.png")
    name = f"app-panel-{os.getpid()}"
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_sample(fo.Sample(filepath=str(tmp_path / "scene.png")))
    server = AppServer(tmp_path, {**info["env"], "TINYSAM_OFFLINE": "1"})
    red_centre = ((RED_RECT[0] + RED_RECT[2]) / 2, (RED_RECT[1] + RED_RECT[3]) / 2)
    background = (250, 60)
    try:
        with app_page(shots["failure"]) as page:
            open_dataset(page, server.port, name)
            page.locator("[data-cy=looker]").first.click()
            page.wait_for_selector("[data-cy=modal-looker-container] canvas", timeout=60_000)
            page.wait_for_timeout(1500)
            page.evaluate("() => { window.__tinysamNoReload = true; }")  # a reload would drop it
            red_box = [RED_RECT[0] / 320, RED_RECT[1] / 240, (RED_RECT[2] - RED_RECT[0]) / 320,
                       (RED_RECT[3] - RED_RECT[1]) / 240]
            page.screenshot(path=str(shots["modal_before"]))
            sample_red_before = colour(shots["modal_before"], on_screen(page, red_box))

            # The panel is a tab of the modal, next to "Sample".
            page.locator("[data-cy=modal] [data-cy=panel-tab-click_to_segment]").first.click()
            picture = page.locator("[data-cy=modal] .js-plotly-plot svg image").first
            picture.wait_for(timeout=120_000)
            page.get_by_text("Model: demo", exact=False).first.wait_for(timeout=10_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots["panel_open"]))
            inside_xy = (RED_RECT[0] + 15, RED_RECT[1] + 15)
            original = {xy: pixel(shots["panel_open"], picture_to_screen(page, xy))
                        for xy in (red_centre, inside_xy, background)}
            assert original[red_centre][:3] == (220, 40, 40), original

            # A click on the red rectangle: a positive point and the mask in the picture.
            page.mouse.click(*picture_to_screen(page, red_centre))
            page.get_by_text("1 positive, 0 negative point(s); mask score").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots["positive_click"]))
            inside = pixel(shots["positive_click"], picture_to_screen(page, inside_xy))
            outside = pixel(shots["positive_click"], picture_to_screen(page, background))
            assert changed(original[inside_xy], inside), f"no mask over the red rectangle in the panel ({inside})"
            assert not changed(original[background], outside), f"the mask spills onto the background ({outside})"

            # Shift+click on the background: a negative point; the mask stays on the rectangle.
            page.keyboard.down("Shift")
            page.mouse.click(*picture_to_screen(page, background))
            page.keyboard.up("Shift")
            page.get_by_text("1 positive, 1 negative point(s); mask score").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots["negative_click"]))
            after = pixel(shots["negative_click"], picture_to_screen(page, inside_xy))
            assert changed(original[inside_xy], after), f"the mask left the red rectangle ({after})"

            # Save: a notification; the panel outlines the saved mask and the new field is in the sidebar.
            page.locator("[data-cy=modal] input[value=object]").first.fill("red box")
            page.wait_for_timeout(1000)  # the panel's state learns the edit
            page.get_by_role("button", name="Save", exact=True).click()
            page.get_by_text("Saved 'red box' to 'tinysam_clicks'").first.wait_for(timeout=60_000)
            page.get_by_text("1 saved in 'tinysam_clicks'", exact=False).first.wait_for(timeout=60_000)
            page.wait_for_selector("[data-cy=sidebar-field-tinysam_clicks]", timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots["saved_panel"]))
            after_save = pixel(shots["saved_panel"], picture_to_screen(page, inside_xy))
            assert not changed(original[inside_xy], after_save), "the clicks were not cleared after saving"

            # The modal's Sample tab draws the saved mask (no reload, no reopening).
            page.locator("[data-cy=modal] [data-cy=panel-tab-fo-sample-modal-plugin]").first.click()
            page.wait_for_selector("[data-cy=modal-looker-container] canvas", timeout=30_000)
            now = screenshot_until(page, shots["saved_sample_tab"],
                                   {"red": (on_screen(page, red_box), sample_red_before)}, time.monotonic() + 5)
            assert differs(now["red"], sample_red_before), \
                f"the Sample tab does not draw the saved mask ({sample_red_before} → {now['red']})"
            assert page.evaluate("() => window.__tinysamNoReload === true"), "the page was reloaded"
            page.locator("[data-cy=modal] [data-cy=panel-tab-click_to_segment]").first.click()
            picture.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)

            # Box mode: a drag around the blue rectangle selects a box, whose mask the picture shows.
            page.locator("[data-cy=modal]").get_by_label("box", exact=True).check()
            page.wait_for_timeout(1500)  # the panel re-renders with the selection grid
            blue_xy = (240, 170)
            blue_before = pixel(shots["saved_panel"], picture_to_screen(page, blue_xy))
            page.mouse.move(*picture_to_screen(page, (172, 122)))
            page.mouse.down()
            page.mouse.move(*picture_to_screen(page, (240, 170)), steps=5)
            page.mouse.move(*picture_to_screen(page, (308, 218)), steps=5)
            page.mouse.up()
            page.get_by_text("0 positive, 0 negative point(s), a box; mask score").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots["box_drag"]))
            blue_after = pixel(shots["box_drag"], picture_to_screen(page, blue_xy))
            assert changed(blue_before, blue_after), f"no mask over the blue rectangle ({blue_after})"
            page.get_by_role("button", name="Clear", exact=True).click()
            page.get_by_text("0 positive, 0 negative point(s) — 1 saved").wait_for(timeout=30_000)

            # The grid draws the new mask without a page reload.
            page.locator("[data-cy=modal] [data-cy=panel-tab-fo-sample-modal-plugin]").first.click()
            page.wait_for_timeout(500)
            close_modal(page)
            page.wait_for_selector("[data-cy=modal]", state="detached", timeout=30_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(shots["saved_grid"]))
            tile = page.locator("[data-cy=looker]").first.bounding_box()
            scale = min(tile["width"] / 320, tile["height"] / 240)
            grid_xy = (tile["x"] + (tile["width"] - 320 * scale) / 2 + inside_xy[0] * scale,
                       tile["y"] + (tile["height"] - 240 * scale) / 2 + inside_xy[1] * scale)
            grid_rgb = pixel(shots["saved_grid"], grid_xy)
            assert grid_rgb[:3] != (220, 40, 40), f"no mask drawn over the red rectangle in the grid ({grid_rgb})"

            # The modal, opened again, lists the new field with its label.
            page.locator("[data-cy=looker]").first.click()
            page.wait_for_selector("[data-cy=modal] [data-cy=sidebar-field-tinysam_clicks]", timeout=30_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots["reopened_modal"]))
        dataset.reload()
        detections = dataset.first().tinysam_clicks.detections
        assert [d.label for d in detections] == ["red box"]
        det = detections[0]
        x, y, w, h = det.bounding_box
        mask = np.zeros((240, 320), dtype=bool)
        x0, y0 = round(x * 320), round(y * 240)
        mask[y0 : y0 + det.mask.shape[0], x0 : x0 + det.mask.shape[1]] = det.mask
        truth = np.zeros_like(mask)
        truth[RED_RECT[1] : RED_RECT[3], RED_RECT[0] : RED_RECT[2]] = True
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.8, f"saved mask IoU with the red rectangle: {iou:.2f}"
        assert 0 <= det.confidence <= 1 and det["predicted_iou"] is not None
    finally:
        server.stop()
        dataset.delete()
