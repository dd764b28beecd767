"""Pre-label a whole Label Studio project through its API (`tinysam ls-prelabel`).

Resumable by construction: every task's prediction is pushed as soon as it is computed, and tasks that
already carry a non-empty prediction of the same `model_version` are skipped, so a rerun after an
interruption continues where the last one stopped (at most the task in flight is recomputed). The
`model_version` names the model and every batch setting, so a rerun with other settings predicts again.
A task where nothing was found gets no prediction (an empty one would only hide it from the next run).
`--embeddings-only` (`warm_embeddings`) only fills the embedding store, skipping images stored already.

With `workers` above 1 (or 'auto', as `inference.batch.auto_workers` decides for the tasks to do), everything
mode runs in that many model processes on this machine; with a Ray address, on the cluster's model actors.
Either way this process lists the tasks, the model processes download the images themselves
(`TaskImageLoader`: the backend's allow-list, token and limits), and this process alone pushes each task's
prediction as its result arrives — the same predictions as a run in this process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import httpx

from tinysam_kit.integrations.labelstudio.backend import BadRequest, TinySamBackend, batch_label
from tinysam_kit.integrations.labelstudio.fetch import ImageFetchError, LabelStudioAuth, TaskImageLoader
from tinysam_kit.integrations.labelstudio.label_config import LabelConfig, LabelConfigError, parse_label_config

if TYPE_CHECKING:
    from tinysam_kit.inference.batch import PrelabelResult

log = logging.getLogger("tinysam_kit.integrations.labelstudio.prelabel")


class LabelStudioAPIError(RuntimeError):
    """Label Studio answered an API call with an error; the message has the status and its detail."""


class LabelStudioClient:
    """The few Label Studio REST calls pre-labelling needs, with the backend's token handling."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0) -> None:
        if not url:
            raise LabelStudioAPIError("Label Studio URL is not set (--url or LABEL_STUDIO_URL)")
        if not api_key:
            raise LabelStudioAPIError("Label Studio API key is not set (--api-key or LABEL_STUDIO_API_KEY)")
        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=timeout)
        self.auth = LabelStudioAuth(self.url, api_key, self.client)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(2):
            try:
                headers = self.auth.headers()
            except ImageFetchError as exc:
                raise LabelStudioAPIError(str(exc)) from exc
            try:
                resp = self.client.request(method, self.url + path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                raise LabelStudioAPIError(f"{method} {self.url}{path} failed: {exc}") from exc
            if resp.status_code == 401 and attempt == 0 and self.auth.is_personal_token:
                self.auth.invalidate()  # the access token expired between refresh and use
                continue
            return resp
        return resp

    def json(self, method: str, path: str, ok=(200, 201), **kwargs):
        resp = self.request(method, path, **kwargs)
        if resp.status_code not in ok:
            raise LabelStudioAPIError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def project(self, project_id: int) -> dict:
        return self.json("GET", f"/api/projects/{project_id}")

    def iter_tasks(self, project_id: int, page_size: int = 50) -> Iterator[tuple[dict, int]]:
        """(task with its predictions, project task total) for every task, page by page."""
        page = 1
        while True:
            resp = self.request("GET", "/api/tasks", params={"project": project_id, "page": page,
                                                             "page_size": page_size, "fields": "all"})
            if resp.status_code == 404 and page > 1:
                return  # Label Studio answers "Invalid page." past the last page
            if resp.status_code != 200:
                raise LabelStudioAPIError(f"listing tasks of project {project_id}: HTTP {resp.status_code}: "
                                          f"{resp.text[:300]}")
            body = resp.json()
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            total = int(body.get("total", 0)) if isinstance(body, dict) else 0
            if not tasks:
                return
            for task in tasks:
                yield task, total
            if len(tasks) < page_size:
                return
            page += 1

    def create_prediction(self, task_id: int, prediction: dict) -> dict:
        body = {"task": task_id, "result": prediction["result"], "score": prediction.get("score"),
                "model_version": prediction["model_version"]}
        return self.json("POST", "/api/predictions", json=body)


def has_version(task: dict, model_version: str) -> bool:
    """Whether the task is done for this run: it has a prediction of `model_version` with at least one region."""
    predictions = task.get("predictions")
    if isinstance(predictions, list):
        return any(isinstance(p, dict) and p.get("model_version") == model_version and p.get("result")
                   for p in predictions)
    versions = task.get("predictions_model_versions") or ""
    return model_version in [v.strip() for v in str(versions).split(",")]


@dataclass
class PrelabelStats:
    seen: int = 0
    predicted: int = 0
    empty: int = 0  # nothing found: no prediction pushed
    skipped: int = 0
    failed: int = 0
    regions: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    cluster: str | None = None  # what the Ray cluster did, for runs on one
    workers: int = 1  # model processes on this machine that ran everything mode (1: this process)


def _project_config(client: LabelStudioClient, project_id: int) -> LabelConfig:
    project = client.project(project_id)
    try:
        return parse_label_config(project.get("label_config", ""))
    except LabelConfigError as exc:
        raise LabelStudioAPIError(f"project {project_id}: {exc}") from exc


def _project_tasks(client: LabelStudioClient, project_id: int, page_size: int, limit: int | None,
                   bar) -> Iterator[dict]:
    """The project's tasks (at most `limit`), sizing the progress bar from the first page."""
    seen = 0
    for task, total in client.iter_tasks(project_id, page_size):
        if bar.total is None and total:
            bar.total = min(total, limit) if limit else total
            bar.refresh()
        if limit is not None and seen >= limit:
            return
        seen += 1
        yield task


def _task_failed(stats, task_id, reason) -> None:
    stats.failed += 1
    stats.errors.append(f"task {task_id}: {reason}")
    log.warning("task %s: %s", task_id, reason)


def _push(client: LabelStudioClient, stats: PrelabelStats, task_id: int, prediction: dict) -> None:
    """Store a task's prediction; one without regions is not stored (it would mark the task done)."""
    if prediction["result"]:
        client.create_prediction(task_id, prediction)
        stats.predicted += 1
        stats.regions += len(prediction["result"])
    else:
        stats.empty += 1


def prelabel_project(backend: TinySamBackend, client: LabelStudioClient, project_id: int, *,
                     page_size: int = 50, limit: int | None = None, progress: bool = True,
                     ray_address: str | None = None, ray_actors: int | None = None,
                     batch_size: int = 1, workers: int | str = 1) -> PrelabelStats:
    """Predict every task of the project not done with this `model_version`: in this process, in `workers`
    model processes on this machine ('auto': `inference.batch.auto_workers`' choice for the tasks to do), or
    (with `ray_address`, which overrides `workers`) on a Ray cluster's model actors (`ray_actors` at most,
    `batch_size` images per encoder call). This process alone talks to Label Studio."""
    from tqdm import tqdm

    from tinysam_kit.inference.batch import resolve_workers

    config = _project_config(client, project_id)
    try:
        batch_label(config.output_for(), backend.settings.batch_label)
    except BadRequest as exc:
        raise LabelStudioAPIError(f"project {project_id}: {exc}") from exc
    version = backend.model_version
    stats = PrelabelStats()
    start = time.perf_counter()
    bar = tqdm(total=None, unit="task", desc=f"project {project_id}", disable=not progress)

    def step() -> None:
        bar.update(1)
        bar.set_postfix(predicted=stats.predicted, empty=stats.empty, skipped=stats.skipped, failed=stats.failed)

    def predict_here(task: dict) -> None:
        try:
            _push(client, stats, task["id"], backend.everything(task, config))
        except BadRequest as exc:
            _task_failed(stats, task.get("id"), exc)
        step()

    # Elsewhere (Ray, or possibly several model processes): list every task first, then predict those to do.
    collect = bool(ray_address) or workers != 1
    todo: dict[str, str] = {}  # task id -> resolved image URL
    tasks: dict[str, dict] = {}  # task id -> what `backend.everything` reads, should one process do them here
    streams: list = []  # closed at the end, stopping the model processes of an interrupted run at once
    try:
        for task in _project_tasks(client, project_id, page_size, limit, bar):
            stats.seen += 1
            if has_version(task, version):
                stats.skipped += 1
                step()
            elif not collect:
                predict_here(task)
            else:
                try:
                    todo[str(task["id"])] = backend.batch_image_url(task, config)  # counted when predicted
                    if not ray_address:
                        tasks[str(task["id"])] = {"id": task["id"], "data": task.get("data")}
                except BadRequest as exc:
                    _task_failed(stats, task.get("id"), exc)
                    step()
        if ray_address and todo:
            streams.append(_results_on_ray(backend, todo, ray_address, ray_actors, batch_size, stats))
            where = "the cluster's"
        elif todo:
            stats.workers = resolve_workers(workers, len(todo), device=backend.predictor.engine.info.device,
                                            threads=backend.settings.engine_options().threads)
            if stats.workers == 1:
                for task in tasks.values():
                    predict_here(task)
                return stats
            streams.append(_results_in_workers(backend, todo, stats.workers))
            where = "the workers'"
        else:
            return stats
        tasks.clear()
        streams.append(_predictions(backend, config, streams[0], where))
        for task_id, prediction in streams[-1]:
            if isinstance(prediction, str):
                _task_failed(stats, task_id, prediction)
            else:
                _push(client, stats, int(task_id), prediction)
            step()
    finally:
        for stream in reversed(streams):
            stream.close()
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats


def _predictions(backend: TinySamBackend, config: LabelConfig, results: Iterable[tuple[str, PrelabelResult]],
                 where: str) -> Iterator[tuple[str, dict | str]]:
    """(task id, prediction or why it failed) for each everything-mode result computed outside this process
    (records as RLE), in arrival order. A result of another model than this process's stops the run: its
    predictions would carry a `model_version` that does not describe them."""
    from tinysam_kit.inference.encodings.coco import with_binary_masks

    expected = backend.predictor.model_version
    for task_id, result in results:
        if result.error is not None:
            yield task_id, result.error
        elif result.model_version != expected:
            raise LabelStudioAPIError(f"{where} model is {result.model_version}, this process's is {expected}: "
                                      "give every model process the same weights")
        else:
            yield task_id, backend.prediction_from_records(with_binary_masks(result.records), config)


def _worker_options(backend: TinySamBackend, **changes):
    """The engine options model processes load: the model this process resolved (so `auto` cannot resolve
    differently there), with the backend's engine settings and `changes`."""
    return replace(backend.settings.engine_options(), model=backend.model_choice.name, **changes)


def _results_in_workers(backend: TinySamBackend, todo: dict[str, str],
                        workers: int) -> Iterator[tuple[str, PrelabelResult]]:
    """(task id, result) per task as `workers` model processes on this machine finish them, each with the
    backend's threads or its share of the cores. A task whose process died comes back failed ("lost: ...")."""
    from tinysam_kit.inference.batch import PrelabelResult, WorkerError, run_everything_workers, worker_threads

    threads = worker_threads(backend.settings.engine_options().threads, workers)
    try:
        for outcome in run_everything_workers(
                _worker_options(backend, threads=threads), list(todo.items()), None, workers=workers,
                mode=backend.settings.everything_mode, load=TaskImageLoader.like(backend.fetcher),
                output_mode="coco_rle", **backend.everything_params):
            yield outcome.key, (outcome.result if outcome.result is not None
                                else PrelabelResult(outcome.item, None, outcome.error or "no result"))
    except WorkerError as exc:
        raise LabelStudioAPIError(str(exc)) from exc


def _results_on_ray(backend: TinySamBackend, todo: dict[str, str], address: str, max_actors: int | None,
                    batch_size: int, stats: PrelabelStats) -> Iterator[tuple[str, PrelabelResult]]:
    """(task id, result) per task as the cluster's actors finish them; `stats.cluster` says what it did."""
    from tinysam_kit.integrations.ray import (
        Failure,
        RayRunError,
        RaySummary,
        RayUnavailableError,
        iter_everything_on_ray,
    )

    summary = RaySummary(len(todo))
    start = time.perf_counter()
    try:
        for task_id, result in iter_everything_on_ray(
                todo, address=address, options=_worker_options(backend), mode=backend.settings.everything_mode,
                params=backend.everything_params, batch_size=batch_size, max_actors=max_actors,
                output_mode="coco_rle", load=TaskImageLoader.like(backend.fetcher), summary=summary):
            if result.error is None:
                summary.written += 1
            else:
                summary.failures.append(Failure(task_id, todo[task_id], result.error))
            summary.masks += len(result.records or [])
            summary.seconds = time.perf_counter() - start
            stats.cluster = summary.describe()
            yield task_id, result
    except (RayUnavailableError, RayRunError) as exc:
        raise LabelStudioAPIError(str(exc)) from exc


@dataclass
class WarmStats:
    tasks: int = 0
    encoded: int = 0  # images encoded into the store by this run
    stored: int = 0  # images whose embedding was stored already (skipped)
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def warm_embeddings(backend: TinySamBackend, client: LabelStudioClient, project_id: int, *,
                    page_size: int = 50, limit: int | None = None, progress: bool = True) -> WarmStats:
    """Encode every task image of a project into the embedding store, predicting nothing (`--embeddings-only`).

    Resumable: images already stored are skipped without a download. The store is the one the backend reads
    (`policy.embedding_store()`), keyed by model and resolved image URL: warm with the same model and
    LABEL_STUDIO_URL the backend uses.
    """
    from tqdm import tqdm

    if backend.predictor.store is None:
        raise LabelStudioAPIError("the embedding store is off (TINYSAM_EMBEDDING_STORE=off): --embeddings-only "
                                  "has nowhere to keep the embeddings")
    config = _project_config(client, project_id)
    stats = WarmStats()
    start = time.perf_counter()
    bar = tqdm(total=None, unit="task", desc=f"project {project_id} embeddings", disable=not progress)
    try:
        for task in _project_tasks(client, project_id, page_size, limit, bar):
            stats.tasks += 1
            data = task.get("data") if isinstance(task.get("data"), dict) else {}
            for image_name in config.images:
                try:
                    url_value = data.get(config.image_key(image_name))
                    if not isinstance(url_value, str):
                        raise BadRequest(f"no image in data field {config.image_key(image_name)!r}")
                    if backend.store_embedding(task, url_value):
                        stats.encoded += 1
                    else:
                        stats.stored += 1
                except BadRequest as exc:
                    _task_failed(stats, task.get("id"), exc)
            bar.update(1)
            bar.set_postfix(encoded=stats.encoded, stored=stats.stored, failed=stats.failed)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats
