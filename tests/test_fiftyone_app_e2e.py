"""End to end in the real App: FiftyOne's server on 127.0.0.1, Debian's Chromium driven by Playwright.

* Open the operator browser, schedule "TinySAM: Segment everything" on a two-sample dataset, let the
  delegated-operation service run it, and see the masks field appear.
* In the sample modal, select a box, run "TinySAM: Segment selected labels", and see the mask in the open
  modal without reloading the page: first into a new field, then into that existing field.

Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from fiftyone_helpers import PLUGIN_URI, REPO, fiftyone_env, free_port, make_images

CHROMIUM = Path(os.environ.get("TINYSAM_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts"


def require_browser():
    """Playwright's sync API, or a skip naming what to install (.ci/setup_fiftyone.sh sets up Chromium and
    Playwright; a developer machine may lack them)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium; see .ci/setup_fiftyone.sh)")
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@contextlib.contextmanager
def app_page(failure_shot: Path, errors: list[str] | None = None):
    """A 1400×900 Chromium page for the App; a screenshot to `failure_shot` when the block fails; the page's
    console errors and uncaught exceptions appended to `errors` when given."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        if errors is not None:
            page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
        try:
            yield page
        except Exception:
            page.screenshot(path=str(failure_shot))
            raise
        finally:
            browser.close()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"App server did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.5)


def field_input(page, label: str):
    return page.locator(f"xpath=//p[normalize-space()='{label}']/following::input[1]")


class AppServer:
    """FiftyOne's App server for the test session's database, on a free 127.0.0.1 port."""

    def __init__(self, tmp_path: Path, env: dict) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "server.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fiftyone.server.main", "--address", "127.0.0.1",
                                      "--port", str(self.port)], env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.port}/", self.proc, self.log_path)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_segment_everything_from_the_app(tmp_path, tiny_random_checkpoint):
    playwright = require_browser()
    info = fiftyone_env()
    import fiftyone as fo
    from fiftyone.operators.delegated import DelegatedOperationService

    name = f"app-e2e-{os.getpid()}"
    dataset = fo.Dataset(name, persistent=True)  # the server process loads it by name
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in make_images(tmp_path / "imgs", 2, seed=7)],
                        progress=False)
    port = free_port()
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    server = subprocess.Popen([sys.executable, "-m", "fiftyone.server.main", "--address", "127.0.0.1",
                               "--port", str(port)], env={**os.environ, **info["env"]}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "fiftyone_segment_everything.png"
    try:
        wait_http(f"http://127.0.0.1:{port}/", server, log_path)
        with app_page(ARTIFACTS / "fiftyone_segment_everything_failure.png") as page:
            open_dataset(page, port, name)
            fill_everything_form(page, tiny_random_checkpoint, "8", "sam_e2e")
            page.get_by_role("button", name="Schedule").click()

            service = DelegatedOperationService()
            uri = f"{PLUGIN_URI}/segment_everything"
            deadline = time.monotonic() + 60
            while not service.list_operations(operator=uri, dataset_name=name):
                assert time.monotonic() < deadline, "the App did not schedule the operation"
                time.sleep(0.5)
            # Playwright's sync API owns this thread's event loop; the service runs its own in a thread.
            results = []
            worker = threading.Thread(target=lambda: results.extend(
                service.execute_queued_operations(operator=uri, dataset_name=name)))
            worker.start()
            worker.join(600)
            assert len(results) == 1 and results[0].error is None, results[0].error

            page.reload()
            page.wait_for_selector("[data-cy=sidebar-field-sam_e2e]", timeout=120_000)
            page.wait_for_selector("[data-cy=looker]", timeout=120_000)
            page.click("[data-cy=checkbox-sam_e2e]")  # show the masks on the grid
            try:
                page.wait_for_selector("[data-cy=checkbox-sam_e2e] [data-testid=CheckBoxIcon]", timeout=10_000)
            except playwright.TimeoutError:
                page.click("[data-cy=checkbox-sam_e2e]")  # the first click can land before the grid is live
            page.wait_for_timeout(3000)
            page.screenshot(path=str(shot))
        dataset.reload()
        assert len(dataset.exists("sam_e2e")) == 2
        assert all(d.mask is not None for s in dataset for d in s.sam_e2e.detections)
        assert dataset.get_run_info("tinysam_sam_e2e").config.serialize()["parameters"]["everything"][
            "points_per_side"] == 8
        assert shot.is_file() and shot.stat().st_size > 10_000
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        dataset.delete()


def scene(path: Path) -> tuple[list[float], list[float]]:
    """A 320×240 image with two solid rectangles on a grey background; their relative boxes."""
    import numpy as np
    from PIL import Image

    img = np.full((240, 320, 3), 128, dtype=np.uint8)
    img[40:120, 30:140] = (220, 40, 40)
    img[130:210, 180:300] = (40, 60, 220)
    Image.fromarray(img).save(path)
    return [26 / 320, 36 / 240, 118 / 320, 88 / 240], [176 / 320, 126 / 240, 128 / 320, 88 / 240]


def open_dataset(page, port: int, name: str) -> None:
    """The App's grid of dataset `name`, loaded, with the first-visit banner dismissed."""
    page.goto(f"http://127.0.0.1:{port}/datasets/{name}")
    page.wait_for_selector("[data-cy=looker]", timeout=180_000)
    if page.get_by_text("Dismiss", exact=True).count():
        page.get_by_text("Dismiss", exact=True).click()


def fill_everything_form(page, model, points_per_side: str, field: str) -> None:
    """Open "Segment everything" from the operator browser and fill it: no score filters, a small grid."""
    page.click("[data-cy=action-browse-operations]")
    page.keyboard.type("Segment everything")
    page.get_by_text("TinySAM: Segment everything").first.click()
    field_input(page, "Model").wait_for(timeout=60_000)
    field_input(page, "Model").fill(str(model))
    field_input(page, "Points per side").fill(points_per_side)
    field_input(page, "Predicted IoU threshold").fill("0")
    field_input(page, "Stability threshold").fill("0")
    field_input(page, "Output field").fill(field)
    page.wait_for_timeout(1500)  # the dynamic form re-resolves after edits


def on_screen(page, box: list[float], size=(320, 240)) -> tuple[float, float]:
    """Screen position of a relative box's centre in the modal's image (the image is fitted, centred)."""
    frame = page.locator("[data-cy=modal-looker-container] canvas").first.bounding_box()
    w, h = size
    scale = min(frame["width"] / w, frame["height"] / h)
    x0 = frame["x"] + (frame["width"] - w * scale) / 2
    y0 = frame["y"] + (frame["height"] - h * scale) / 2
    return x0 + (box[0] + box[2] / 2) * w * scale, y0 + (box[1] + box[3] / 2) * h * scale


def colour(path: Path, xy: tuple[float, float], r: int = 4) -> tuple[float, ...]:
    """Mean RGB of the (2r+1)² pixels around `xy` in a screenshot."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    x, y = round(xy[0]), round(xy[1])
    return tuple(img[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3).mean(axis=0).round(1))


def differs(a: tuple[float, ...], b: tuple[float, ...], tol: float = 10) -> bool:
    return max(abs(u - v) for u, v in zip(a, b)) > tol


def screenshot_until(page, path: Path, points: dict, deadline: float) -> dict:
    """Screenshots of the page until the colour at every point of `points` ({name: (xy, colour before)})
    differs from its colour before, or the monotonic `deadline` passes; the colours of the last one."""
    while True:
        page.screenshot(path=str(path))
        now = {k: colour(path, xy) for k, (xy, _) in points.items()}
        if all(differs(now[k], before) for k, (_, before) in points.items()) or time.monotonic() > deadline:
            return now
        page.wait_for_timeout(100)


def app_errors(messages: list[str]) -> list[str]:
    """The App's console errors and uncaught exceptions, less failed loads of remote resources (web fonts,
    analytics: this machine may be offline)."""
    return [m for m in messages if "Failed to load resource" not in m]


def run_selected_labels(page, n: int = 1) -> float:
    """Open the operator browser in the modal, run "Segment selected labels" on `n` selected labels with the
    form's defaults; returns the time its success notification appeared."""
    page.keyboard.press("`")
    page.keyboard.type("Segment selected")
    page.get_by_text("TinySAM: Segment selected labels").first.click()
    page.get_by_text(f"Will segment {n} selected label(s) on 1 sample(s)").wait_for(timeout=60_000)
    field_input(page, "Model").fill("demo")
    page.wait_for_timeout(1000)  # the dynamic form re-resolves after edits
    page.get_by_role("button", name="Execute").click()
    page.get_by_text("mask(s) written to 'tinysam_masks'").first.wait_for(timeout=120_000)
    return time.monotonic()


@pytest.mark.e2e
@pytest.mark.slow
def test_selected_label_masks_show_in_the_open_modal(tmp_path):
    """The defect: the toast said masks were written but the open modal showed nothing until a page reload.
    The mask must show in the open modal within 2 s of the notification, the new field listed in the modal's
    sidebar, without reloading the page and without errors in the browser console."""
    require_browser()
    info = fiftyone_env()
    import fiftyone as fo

    red, blue = scene(tmp_path / "scene.png")
    name = f"app-modal-{os.getpid()}"
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_sample(fo.Sample(filepath=str(tmp_path / "scene.png"), gt=fo.Detections(detections=[
        fo.Detection(label="red", bounding_box=red), fo.Detection(label="blue", bounding_box=blue)])))
    ARTIFACTS.mkdir(exist_ok=True)
    shots = {k: ARTIFACTS / f"fiftyone_modal_{k}.png" for k in ("before", "new_field", "existing_field",
                                                                        "reopened")}
    errors: list[str] = []
    server = AppServer(tmp_path, info["env"])
    try:
        with app_page(ARTIFACTS / "fiftyone_modal_failure.png", errors) as page:
            open_dataset(page, server.port, name)
            assert page.evaluate("() => [...document.scripts].some(s => s.src.includes('/js/tinysam.js'))"), \
                "the App did not load the plugin's script"
            page.locator("[data-cy=looker]").first.click()
            page.wait_for_selector("[data-cy=modal-looker-container] canvas", timeout=60_000)
            page.wait_for_timeout(2000)
            page.evaluate("() => { window.__tinysamNoReload = true; }")  # a reload would drop it
            red_xy, blue_xy = on_screen(page, red), on_screen(page, blue)

            # 1. A new output field: select the red box, run; the field joins the modal's sidebar and the
            #    mask is drawn over the red rectangle (only there).
            page.mouse.click(*red_xy)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots["before"]))
            red_before, blue_before = colour(shots["before"], red_xy), colour(shots["before"], blue_xy)
            done = run_selected_labels(page)
            page.wait_for_selector("[data-cy=modal] [data-cy=sidebar-field-tinysam_masks]",
                                   timeout=max(0.1, done + 2.0 - time.monotonic()) * 1000)
            now = screenshot_until(page, shots["new_field"], {"red": (red_xy, red_before)}, done + 2.0)
            assert differs(now["red"], red_before), f"no mask over the red box ({red_before} → {now['red']})"
            assert not differs(colour(shots["new_field"], blue_xy), blue_before), "the blue box changed"

            # 2. The same field, now existing: select the blue box as well; its mask shows too.
            page.mouse.click(*blue_xy)
            page.wait_for_timeout(500)
            done = run_selected_labels(page, n=2)
            now = screenshot_until(page, shots["existing_field"], {"blue": (blue_xy, blue_before)}, done + 2.0)
            assert differs(now["blue"], blue_before), f"no mask over the blue box ({blue_before} → {now['blue']})"
            assert differs(colour(shots["existing_field"], red_xy), red_before), "the red box's mask went away"
            assert page.evaluate("() => window.__tinysamNoReload === true"), "the page was reloaded"

            # 3. Closed and opened again, the sample shows both masks (no stale copy of it is left).
            for _ in range(3):  # the first Escape clears the label selection, the next closes the modal
                if not page.locator("[data-cy=modal-looker-container]").count():
                    break
                page.keyboard.press("Escape")
                page.wait_for_timeout(1000)
            page.wait_for_selector("[data-cy=modal-looker-container]", state="detached", timeout=10_000)
            page.locator("[data-cy=looker]").first.click()
            page.wait_for_selector("[data-cy=modal-looker-container] canvas", timeout=60_000)
            now = screenshot_until(page, shots["reopened"], {"red": (red_xy, red_before),
                                                             "blue": (blue_xy, blue_before)},
                                   time.monotonic() + 5.0)
            assert differs(now["red"], red_before) and differs(now["blue"], blue_before), now
        assert not app_errors(errors), app_errors(errors)
        dataset.reload()
        assert sorted(d.label for d in dataset.first().tinysam_masks.detections) == ["blue", "red"]
    finally:
        server.stop()
        dataset.delete()


@pytest.mark.e2e
@pytest.mark.slow
def test_immediate_run_shows_progress_in_the_app(tmp_path, tiny_random_checkpoint):
    """*Execute* (not Schedule), in two model processes started by the App server: the operator's panel shows
    FiftyOne's progress bar with "n/total images segmented" while it runs, then the summary and a notification."""
    require_browser()
    info = fiftyone_env()
    import fiftyone as fo

    name = f"app-progress-{os.getpid()}"
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in make_images(tmp_path / "imgs", 12, seed=9)],
                        progress=False)
    ARTIFACTS.mkdir(exist_ok=True)
    shots = {k: ARTIFACTS / f"fiftyone_immediate_{k}.png" for k in ("progress", "done")}
    server = AppServer(tmp_path, info["env"])
    try:
        with app_page(ARTIFACTS / "fiftyone_immediate_failure.png") as page:
            open_dataset(page, server.port, name)
            fill_everything_form(page, tiny_random_checkpoint, "16", "sam_now")
            field_input(page, "Model processes").fill("2")
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Schedule").locator("xpath=following-sibling::*[1]").click()
            page.get_by_text("Run this operation synchronously").click()
            page.get_by_role("button", name="Execute").first.click()
            page.get_by_text("images segmented").first.wait_for(timeout=120_000)
            page.screenshot(path=str(shots["progress"]))
            page.get_by_text("sample(s) segmented into 'sam_now'").first.wait_for(timeout=300_000)
            page.get_by_text("2 model processes").first.wait_for(timeout=10_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots["done"]))
        dataset.reload()
        assert len(dataset.exists("sam_now")) == 12
    finally:
        server.stop()
        dataset.delete()
