"""A delegated everything-mode run killed half-way (SIGTERM to the `fiftyone delegated launch` worker): its run
summary then says it is stale and how to continue, and the re-run ends with exactly the field an uninterrupted
run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fiftyone_helpers import PLUGIN_URI, fiftyone_env, make_images

N_IMAGES = 10
# Written two samples at a time, each taking a noticeable moment (a 32² grid), so the first write is seen
# well before the last image is done however fast the machine is.
PARAMS = {"points_per_side": 32, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "write_batch": 2}


def content(dataset, field):
    out = {}
    for sample in dataset:
        dets = sample[field]
        out[sample.filepath] = None if dets is None else [
            (d.label, tuple(d.bounding_box), d.confidence, d.get_mask().tobytes()) for d in dets.detections]
    return out


@pytest.mark.slow
def test_killed_delegated_run_resumes_to_the_uninterrupted_result(fo, tmp_path, tiny_random_checkpoint):
    from fiftyone.operators import execute_operator
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    from tinysam_kit.integrations.fiftyone.runner import load_summary

    env = fiftyone_env()["env"]
    images = make_images(tmp_path / "images", N_IMAGES, size=(120, 160), seed=3)
    dataset = fo.Dataset(f"kill-test-{os.getpid()}", persistent=True)  # the worker loads it by name
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in images], progress=False)
    reference = dataset.clone(f"kill-test-ref-{os.getpid()}", persistent=True)
    uri = f"{PLUGIN_URI}/segment_everything"
    params = {"model": str(tiny_random_checkpoint), "label_field": "auto", **PARAMS}
    log = open(tmp_path / "worker.log", "wb")
    worker = None
    try:
        execute_operator(uri, dataset=reference, params=params)  # uninterrupted, immediate
        expected = content(reference, "auto")
        assert all(v is not None for v in expected.values())

        queued = execute_operator(uri, dataset=dataset, params=params, request_delegation=True)
        assert queued.delegated
        worker = subprocess.Popen([str(Path(sys.executable).parent / "fiftyone"), "delegated", "launch"],
                                  env={**os.environ, **env, "OMP_NUM_THREADS": str(torch.get_num_threads())},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(dataset.exists("auto")) == 0:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker wrote nothing in 300 s"
            time.sleep(0.2)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        done = len(dataset.exists("auto"))
        assert 0 < done < N_IMAGES, f"kill came too late to test resuming ({done}/{N_IMAGES} done)"
        partial = content(dataset, "auto")
        assert all(v is None or v == expected[k] for k, v in partial.items())  # no half-written sample

        service = DelegatedOperationService()
        running = service.list_operations(operator=uri, dataset_name=dataset.name)
        assert [op.run_state for op in running] == [ExecutionRunState.RUNNING]  # what a killed worker leaves

        # The run summary knows better: its process is gone, and it says how to continue.
        op_id = str(running[0].id)
        summary = load_summary(dataset, "auto")
        assert summary["status"] == "stale" and "has exited" in summary["stale_reason"]
        assert f"fiftyone delegated fail {op_id}" in summary["how_to_continue"]
        shown = execute_operator(f"{PLUGIN_URI}/show_run_summary", dataset=dataset, params={"label_field": "auto"})
        assert shown.result["status"].startswith("stale: the run stopped without finishing")
        failed = subprocess.run([str(Path(sys.executable).parent / "fiftyone"), "delegated", "fail", op_id],
                                env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert failed.returncode == 0, failed.stderr
        assert service.get(running[0].id).run_state == ExecutionRunState.FAILED

        execute_operator(uri, dataset=dataset, params=params, request_delegation=True)
        results = service.execute_queued_operations(operator=uri, dataset_name=dataset.name)
        assert len(results) == 1 and results[0].error is None, results[0].error
        assert results[0].result["already_done"] == done
        assert results[0].result["processed"] == N_IMAGES - done
        assert content(dataset, "auto") == expected
        assert load_summary(dataset, "auto")["status"] == "completed"
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
        dataset.delete()
        reference.delete()
