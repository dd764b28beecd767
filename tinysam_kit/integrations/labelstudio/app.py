"""HTTP side of the backend: Label Studio's ML-backend protocol on FastAPI.

FastAPI (Starlette + pydantic) was chosen over Flask 3 because it is asynchronous: `/health` and
`/setup` are answered on the event loop while model work runs in worker threads, so Label Studio's
1 s health check and 3 s setup check pass even during a long batch. Request bodies are validated and
described by pydantic models, which also gives an OpenAPI document the fuzz tests are driven from.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinysam_kit.integrations.labelstudio.backend import BadRequest, TinySamBackend
from tinysam_kit.integrations.labelstudio.settings import BackendSettings
from tinysam_kit.version import __version__

log = logging.getLogger("tinysam_kit.integrations.labelstudio")


def prebuilt_json(payload: dict) -> Response:
    """A JSON response serialised in one pass by pydantic-core.

    Brush RLE makes predictions long lists of small integers (150 000 for a ragged 1.2-MP mask); FastAPI's
    own path (response-model validation, then `json.dumps`) spends ~20 ms on such a list, this ~3 ms. The
    payload is built by our backend, so there is nothing to validate; the route's `response_model` still
    documents it.
    """
    return Response(content=to_json(payload), media_type="application/json")


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: str | int | None = Field(None, description='"<project id>.<created timestamp>"')
    label_schema: str | None = Field(None, alias="schema", description="the project's labeling config (XML)")
    hostname: str | None = Field(None, description="Label Studio's own URL")
    access_token: str | None = Field(None, description="legacy API token of the project's creator")
    extra_params: Any = None


class PredictParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = Field(None, description="smart-tool regions of an interactive request")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]] = Field(..., description="tasks, each with its `data`")
    label_config: str | None = Field(None, description="the project's labeling config (XML)")
    project: str | int | None = None
    params: PredictParams | None = None


class PredictResponse(BaseModel):
    results: list[dict[str, Any] | list[dict[str, Any]]] = Field(
        ..., description="per task: a prediction, an empty list when nothing was found (Label Studio stores no "
                         "prediction, so the task is not done), or an answer without `result` when it failed")
    model_version: str


class SetupResponse(BaseModel):
    model_version: str


class HealthResponse(BaseModel):
    status: str
    model_class: str
    model_version: str
    model: str | None = Field(None, description="the model serving (what `auto` resolved to)")
    model_requested: str | None = None
    model_note: str | None = Field(None, description="why another model than requested is serving, if it is")
    everything: dict[str, Any] | None = Field(None, description="the batch (everything-mode) settings in use")
    embeddings: dict[str, Any] | None = Field(
        None, description="the embedding store in use, encoder runs, and the background encoder's counters")


class VersionsResponse(BaseModel):
    versions: list[str]


class BodySizeLimit:
    """Refuse bodies over the limit before they are read into memory (413), declared or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        reason = f"request body larger than {self.max_bytes} bytes (TINYSAM_MAX_REQUEST_MB)"
        refused(scope.get("method", ""), scope.get("path", ""), 413, reason)
        body = json.dumps({"detail": reason}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ServerTiming:
    """Adds `Server-Timing: app;dur=<ms>` (request received → response started) to every HTTP answer.

    Plain ASGI on purpose: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) runs each request
    in its own task group with memory streams, measured at ~1 ms of event-loop time per request.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                elapsed = (time.perf_counter() - start) * 1000
                headers = [*message.get("headers", ()), (b"server-timing", f"app;dur={elapsed:.2f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


class _TooLarge(Exception):
    pass



def refused(method: str, path: str, status: int, reason: str) -> None:
    """Every 4xx answer's reason goes to the log, where Label Studio's error messages send users."""
    log.warning("%s %s -> %d: %s", method, path, status, reason)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        else:
            parts.append(f"{loc}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def create_app(settings: BackendSettings | None = None, backend: TinySamBackend | None = None) -> FastAPI:
    """The ASGI application. Loads the model now (once per process) unless `backend` is given."""
    settings = settings or BackendSettings.from_env()
    owns_backend = backend is None
    backend = backend or TinySamBackend(settings)
    schemas: dict[str, str] = {}  # project -> labeling config from /setup, for predicts that omit it

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if owns_backend:  # a backend passed in is shared; whoever made it closes it
            backend.close()

    app = FastAPI(title="TinySAM Label Studio ML backend", version=__version__, lifespan=lifespan,
                  description="Smart keypoint/rectangle clicks answered with brush masks; batch pre-labelling.")
    if settings.max_request_bytes:
        app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(ServerTiming)  # added last: outermost, so it times the size check too
    app.state.backend = backend
    app.state.settings = settings
    security = HTTPBasic(auto_error=False)

    def check_auth(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if not settings.basic_auth_user:
            return
        ok = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), settings.basic_auth_user.encode())
            & secrets.compare_digest(credentials.password.encode(), settings.basic_auth_pass.encode()))
        if not ok:
            raise HTTPException(401, "basic authentication required: set the user and password configured "
                                     "in BASIC_AUTH_USER/BASIC_AUTH_PASS in the model's connection settings",
                                headers={"WWW-Authenticate": 'Basic realm="tinysam"'})

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        refused(request.method, request.url.path, exc.status_code, str(exc))
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        reason = _describe_validation(exc)
        refused(request.method, request.url.path, 422, reason)
        return JSONResponse({"detail": reason}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if 400 <= exc.status_code < 500:
            refused(request.method, request.url.path, exc.status_code, str(exc.detail))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def health() -> dict:
        return {"status": "UP", "model_class": "TinySamBackend", "model_version": backend.model_version,
                **backend.describe()}

    app.get("/", response_model=HealthResponse, dependencies=[Depends(check_auth)])(health)
    app.get("/health", response_model=HealthResponse, dependencies=[Depends(check_auth)],
            summary="liveness; answered on the event loop even while predictions run")(health)

    @app.post("/setup", response_model=SetupResponse, dependencies=[Depends(check_auth)])
    def setup(body: SetupRequest) -> dict:
        if body.label_schema and body.project is not None:
            schemas[str(body.project)] = body.label_schema
        return backend.setup(body.label_schema, body.hostname, body.access_token)

    @app.post("/predict", response_model=PredictResponse, dependencies=[Depends(check_auth)])
    async def predict(body: PredictRequest) -> Response:
        label_config = body.label_config or schemas.get(str(body.project))
        if not label_config:
            raise BadRequest("label_config is missing and no /setup was received for this project")
        context = body.params.context if body.params is not None else None
        # model work runs in a worker thread so the event loop keeps answering /health
        answer = await run_in_threadpool(backend.predict, body.tasks, label_config, context)
        return prebuilt_json(answer)

    def webhook_config(payload: dict) -> str | None:
        """The labeling config of a webhook's project: in the payload, else the one /setup received."""
        project = payload.get("project")
        if isinstance(project, dict):
            if isinstance(project.get("label_config"), str) and project["label_config"]:
                return project["label_config"]
            project = project.get("id")
        prefix = f"{project}."
        return next((config for name, config in schemas.items() if name == str(project) or name.startswith(prefix)),
                    None)

    @app.post("/webhook", summary="TASKS_CREATED queues the new tasks' images for background encoding; other "
                                  "events are acknowledged (this model does not train)")
    async def webhook(request: Request, credentials: HTTPBasicCredentials | None = Depends(security)) -> dict:
        try:
            payload = json.loads(await request.body() or b"null")
        except ValueError:
            payload = None
        action = payload.get("action") if isinstance(payload, dict) else None
        action = action if isinstance(action, str) else None
        if action != "TASKS_CREATED":
            return {"status": "ok", "action": action, "queued": 0,
                    "detail": "event received; TinySAM is not trained from annotations"}
        # Work is only queued for a caller that passes basic auth (when it is on): add the Authorization header
        # to the backend's webhook in Label Studio's project settings.
        check_auth(credentials)
        label_config = webhook_config(payload)
        if not label_config:
            raise BadRequest("TASKS_CREATED without the project's label_config, and no /setup was received for it")
        queued = backend.preencode(payload.get("tasks"), label_config)  # string work only: answers at once
        return {"status": "ok", "action": action, "queued": queued,
                "detail": f"{queued} image(s) queued for background encoding"}

    @app.get("/versions", response_model=VersionsResponse, dependencies=[Depends(check_auth)])
    def versions() -> dict:
        return {"versions": [backend.model_version]}

    return app
