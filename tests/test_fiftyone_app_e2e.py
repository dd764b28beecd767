"""End to end in the real App: FiftyOne's server on 127.0.0.1, Debian's Chromium driven by Playwright.
Open the operator browser, schedule "TinySAM: Segment everything" on a two-sample dataset, let the
delegated-operation service run it, and see the masks field appear. A screenshot is kept in test-artifacts/."""

from __future__ import annotations

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


@pytest.mark.e2e
@pytest.mark.slow
def test_segment_everything_from_the_app(tmp_path, tiny_random_checkpoint):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium; see .ci/setup_fiftyone.sh)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
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
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            try:
                page.goto(f"http://127.0.0.1:{port}/datasets/{name}")
                page.wait_for_selector("[data-cy=looker]", timeout=180_000)
                if page.get_by_text("Dismiss", exact=True).count():
                    page.get_by_text("Dismiss", exact=True).click()
                page.click("[data-cy=action-browse-operations]")
                page.keyboard.type("Segment everything")
                page.get_by_text("TinySAM: Segment everything").first.click()
                field_input(page, "Model").wait_for(timeout=60_000)
                field_input(page, "Model").fill(str(tiny_random_checkpoint))
                field_input(page, "Points per side").fill("8")
                field_input(page, "Predicted IoU threshold").fill("0")
                field_input(page, "Stability threshold").fill("0")
                field_input(page, "Output field").fill("sam_e2e")
                page.wait_for_timeout(1500)  # the dynamic form re-resolves after edits
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
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "fiftyone_segment_everything_failure.png"))
                raise
            finally:
                browser.close()
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
