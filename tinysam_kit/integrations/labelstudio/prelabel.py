"""Pre-label a whole Label Studio project through its API (`tinysam ls-prelabel`).

Resumable by construction: every task's prediction is pushed as soon as it is computed, and tasks that
already carry a non-empty prediction of the same `model_version` are skipped, so a rerun after an
interruption continues where the last one stopped (at most the task in flight is recomputed). The
`model_version` names the model and every batch setting, so a rerun with other settings predicts again.
A task where nothing was found gets no prediction (an empty one would only hide it from the next run).
`--embeddings-only` (`warm_embeddings`) only fills the embedding store, skipping images stored already.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from tinysam_kit.integrations.labelstudio.backend import BadRequest, TinySamBackend, batch_label
from tinysam_kit.integrations.labelstudio.fetch import ImageFetchError, LabelStudioAuth
from tinysam_kit.integrations.labelstudio.label_config import LabelConfig, LabelConfigError, parse_label_config

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


def prelabel_project(backend: TinySamBackend, client: LabelStudioClient, project_id: int, *,
                     page_size: int = 50, limit: int | None = None, progress: bool = True) -> PrelabelStats:
    from tqdm import tqdm

    config = _project_config(client, project_id)
    try:
        batch_label(config.output_for(), backend.settings.batch_label)
    except BadRequest as exc:
        raise LabelStudioAPIError(f"project {project_id}: {exc}") from exc
    version = backend.model_version
    stats = PrelabelStats()
    start = time.perf_counter()
    bar = tqdm(total=None, unit="task", desc=f"project {project_id}", disable=not progress)
    try:
        for task in _project_tasks(client, project_id, page_size, limit, bar):
            stats.seen += 1
            if has_version(task, version):
                stats.skipped += 1
            else:
                try:
                    prediction = backend.everything(task, config)
                    if prediction["result"]:
                        client.create_prediction(task["id"], prediction)
                        stats.predicted += 1
                        stats.regions += len(prediction["result"])
                    else:
                        stats.empty += 1
                except BadRequest as exc:
                    stats.failed += 1
                    stats.errors.append(f"task {task.get('id')}: {exc}")
                    log.warning("task %s: %s", task.get("id"), exc)
            bar.update(1)
            bar.set_postfix(predicted=stats.predicted, empty=stats.empty, skipped=stats.skipped, failed=stats.failed)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats


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
                    stats.failed += 1
                    stats.errors.append(f"task {task.get('id')}: {exc}")
                    log.warning("task %s: %s", task.get("id"), exc)
            bar.update(1)
            bar.set_postfix(encoded=stats.encoded, stored=stats.stored, failed=stats.failed)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats
