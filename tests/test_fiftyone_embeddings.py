"""The *Compute TinySAM embeddings* operator through FiftyOne's executor: it fills the shared embedding store
(the test session's own, see fiftyone_helpers), skips what is stored, and the interactive operator then answers
without encoding."""

from __future__ import annotations

import pytest
from fiftyone_helpers import PLUGIN_URI, fiftyone_env, make_images


@pytest.fixture
def dataset(fo, tmp_path):
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=str(p)) for p in make_images(tmp_path / "images", 3, seed=11)],
                   progress=False)
    yield ds
    ds.delete()


@pytest.fixture
def predictor(fo, tiny_random_checkpoint):
    from tinysam_kit.inference.policy import EngineOptions
    from tinysam_kit.integrations.fiftyone.predictors import get_predictor

    return get_predictor(EngineOptions(model=str(tiny_random_checkpoint)))


@pytest.fixture
def encoder_calls(predictor, monkeypatch):
    calls = []
    encode = predictor.engine.encode

    def counted(tensor):
        calls.append(tensor.shape)
        return encode(tensor)

    monkeypatch.setattr(predictor.engine, "encode", counted)
    return calls


def run(operator: str, dataset, params: dict, **ctx):
    from fiftyone.operators import execute_operator

    return execute_operator(f"{PLUGIN_URI}/{operator}", dataset=dataset, params=params, **ctx)


def test_operator_is_listed_and_delegated_by_default(fo):
    from fiftyone.operators import get_operator

    config = get_operator(f"{PLUGIN_URI}/compute_embeddings").config
    assert config.allow_delegated_execution and config.default_choice_to_delegated
    assert config.allow_immediate_execution


def test_embeddings_land_in_the_store_and_serve_the_selected_labels_operator(
        fo, dataset, tiny_random_checkpoint, predictor, encoder_calls):
    from tinysam_kit.integrations.fiftyone.predictors import image_key

    params = {"model": str(tiny_random_checkpoint)}
    result = run("compute_embeddings", dataset, params)
    assert result.error is None, result.error
    assert result.result["computed"] == 3 and result.result["already_stored"] == 0
    assert result.result["failed"] == 0 and len(encoder_calls) == 3
    assert predictor.store is not None
    assert str(predictor.store.root) == fiftyone_env()["env"]["TINYSAM_EMBEDDING_STORE"]
    predictor.cache.clear()  # only the persistent store remembers them now
    for path in dataset.values("filepath"):
        assert predictor.has_embedding(key=image_key(path))

    again = run("compute_embeddings", dataset, params)
    assert again.error is None, again.error
    assert again.result["computed"] == 0 and again.result["already_stored"] == 3
    assert len(encoder_calls) == 3

    sample = dataset.first()
    sample["gt"] = fo.Detections(detections=[fo.Detection(label="box", bounding_box=[0.1, 0.1, 0.5, 0.5])])
    sample.save()
    predictor.cache.clear()
    hits = predictor.store.hits
    selected = [{"label_id": sample.gt.detections[0].id, "sample_id": sample.id, "field": "gt"}]
    picked = run("segment_selected_labels", dataset, {**params, "label_field": "picked"},
                 selected_labels=selected)
    assert picked.error is None, picked.error
    assert picked.result["masks"] == 1
    assert len(encoder_calls) == 3 and predictor.store.hits == hits + 1  # decoded from the stored embedding


def test_edited_and_missing_files(fo, dataset, tiny_random_checkpoint, encoder_calls):
    import os

    params = {"model": str(tiny_random_checkpoint)}
    assert run("compute_embeddings", dataset, params).result["computed"] == 3
    first, second = dataset.values("filepath")[:2]
    stat = os.stat(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited file is a new image
    os.remove(second)
    result = run("compute_embeddings", dataset, params).result
    assert (result["computed"], result["already_stored"], result["failed"]) == (1, 1, 1)
    assert second in result["errors"][0]["filepath"] and len(encoder_calls) == 4


def test_delegated_run_reports_progress(fo, dataset, tiny_random_checkpoint):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    uri = f"{PLUGIN_URI}/compute_embeddings"
    queued = run("compute_embeddings", dataset, {"model": str(tiny_random_checkpoint)}, request_delegation=True)
    assert queued.delegated
    service = DelegatedOperationService()
    results = service.execute_queued_operations(operator=uri, dataset_name=dataset.name)
    assert len(results) == 1 and results[0].error is None, results[0].error
    op = service.list_operations(operator=uri, dataset_name=dataset.name)[0]
    assert op.run_state == ExecutionRunState.COMPLETED and op.status.progress == pytest.approx(1.0)


def test_store_off_is_a_clear_error(fo, dataset, tiny_random_checkpoint, monkeypatch):
    from tinysam_kit.integrations.fiftyone.predictors import clear_predictors

    monkeypatch.setenv("TINYSAM_EMBEDDING_STORE", "off")
    clear_predictors()
    try:
        with pytest.raises(Exception, match="embedding store is off"):
            run("compute_embeddings", dataset, {"model": str(tiny_random_checkpoint)})
    finally:
        clear_predictors()  # later tests get a predictor with the test store again
