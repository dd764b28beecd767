"""Backend configuration from the environment variables Label Studio ML backends conventionally use.

Model and everything-mode values left unset mean "what `tinysam_kit.inference.policy` decides" (the model
`auto` stands for, the model's own everything-mode thresholds); nothing here declares a default of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from tinysam_kit.inference.policy import EngineOptions, PolicyError

ENGINE_DEFAULTS = EngineOptions()
# Everything-mode parameters the backend passes to `policy.everything_params` (None: the model's own value).
EVERYTHING_SETTINGS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "max_area_fraction")


class SettingsError(ValueError):
    """An environment variable has a value the backend cannot use; the message names it."""


def _raw(env: Mapping[str, str], name: str) -> str:
    return str(env.get(name, "")).strip()


def _number(env: Mapping[str, str], name: str, default, kind: type, minimum):
    """The variable `name` as `kind` (int or float) at least `minimum`; `default` when unset or empty."""
    raw = _raw(env, name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from exc
    if not value >= minimum:  # also rejects NaN
        raise SettingsError(f"{name} must be >= {minimum:g}, got {raw}")
    return value


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    return _number(env, name, default, int, minimum)


def _float(env: Mapping[str, str], name: str, default: float | None, minimum: float = 0.0) -> float | None:
    return _number(env, name, default, float, minimum)


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").replace(";", ",").split(",") if part.strip())


@dataclass
class BackendSettings:
    """Everything the backend needs; `from_env()` reads the documented variables."""

    # Label Studio connection (the URL images are fetched from and the API is called on)
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    # Basic auth that Label Studio must present (set the same pair in the model's connection form)
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    # Model (see policy.EngineOptions; `auto` is resolved by policy.resolve_model)
    model: str = ENGINE_DEFAULTS.model
    engine: str = ENGINE_DEFAULTS.engine
    precision: str = ENGINE_DEFAULTS.precision
    device: str = ENGINE_DEFAULTS.device
    threads: int | None = ENGINE_DEFAULTS.threads
    cache_bytes: int = 512 * 1024 * 1024
    # Background encoding of new and opened tasks' images (0: off); the store is policy.embedding_store()
    preencode_queue: int = 1000
    # Image fetching
    allowed_hosts: tuple[str, ...] = ()
    local_files_root: str = ""  # LOCAL_FILES_DOCUMENT_ROOT: read /data/local-files/ from disk instead of HTTP
    max_image_bytes: int = 64 * 1024 * 1024
    fetch_timeout: float = 30.0
    # Requests
    max_request_bytes: int = 64 * 1024 * 1024
    max_context_regions: int = 512
    max_tasks_per_request: int = 256
    # Batch (everything-mode) pre-labelling
    batch_label: str = ""  # label given to everything-mode regions; default: the output control's first label
    max_regions: int = 20
    min_region_area: int = 100
    everything_mode: str = "hierarchical"
    points_per_side: int | None = None
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    max_area_fraction: float | None = None  # None: policy.MAX_AREA_FRACTION
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> BackendSettings:
        env = os.environ if env is None else env
        values = dict(
            label_studio_url=_raw(env, "LABEL_STUDIO_URL") or _raw(env, "LABEL_STUDIO_HOST"),
            label_studio_api_key=_raw(env, "LABEL_STUDIO_API_KEY") or _raw(env, "LABEL_STUDIO_ACCESS_TOKEN"),
            basic_auth_user=env.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            engine=_raw(env, "TINYSAM_ENGINE") or None,
            precision=_raw(env, "TINYSAM_PRECISION") or None,
            device=_raw(env, "TINYSAM_DEVICE") or None,
            threads=_int(env, "TINYSAM_THREADS", None) or None,
            cache_bytes=_int(env, "TINYSAM_CACHE_MB", 512, minimum=1) * 1024 * 1024,
            preencode_queue=_int(env, "TINYSAM_PREENCODE_QUEUE", None),
            allowed_hosts=_list(env, "TINYSAM_ALLOWED_HOSTS"),
            local_files_root=_raw(env, "LOCAL_FILES_DOCUMENT_ROOT"),
            max_image_bytes=_int(env, "TINYSAM_MAX_IMAGE_MB", 64, minimum=1) * 1024 * 1024,
            fetch_timeout=_float(env, "TINYSAM_FETCH_TIMEOUT", 30.0, minimum=0.1),
            max_request_bytes=_int(env, "TINYSAM_MAX_REQUEST_MB", 64, minimum=1) * 1024 * 1024,
            batch_label=_raw(env, "TINYSAM_BATCH_LABEL"),
            max_regions=_int(env, "TINYSAM_MAX_REGIONS", None, minimum=1),
            min_region_area=_int(env, "TINYSAM_MIN_REGION_AREA", None),
            everything_mode=_raw(env, "TINYSAM_EVERYTHING_MODE") or None,
            points_per_side=_int(env, "TINYSAM_POINTS_PER_SIDE", None, minimum=2),
            pred_iou_thresh=_float(env, "TINYSAM_PRED_IOU_THRESH", None),
            stability_score_thresh=_float(env, "TINYSAM_STABILITY_THRESH", None),
            max_area_fraction=_float(env, "TINYSAM_MAX_AREA_FRACTION", None),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**{k: v for k, v in values.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.everything_mode not in ("hierarchical", "dense"):
            raise SettingsError(f"TINYSAM_EVERYTHING_MODE must be 'hierarchical' or 'dense', "
                                f"got {self.everything_mode!r}")
        if self.max_area_fraction is not None and not 0.0 < self.max_area_fraction <= 1.0:
            raise SettingsError(f"TINYSAM_MAX_AREA_FRACTION must be in (0, 1] (1 keeps every mask), "
                                f"got {self.max_area_fraction:g}")
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise SettingsError(f"LABEL_STUDIO_URL must start with http:// or https://, "
                                f"got {self.label_studio_url!r}")
        self.engine_options()

    def engine_options(self) -> EngineOptions:
        try:
            return EngineOptions.from_mapping({f.name: getattr(self, f.name) for f in fields(EngineOptions)})
        except PolicyError as exc:
            raise SettingsError(str(exc)) from exc

    def everything_explicit(self) -> dict:
        """The everything-mode values set here (None: the model's own, see `policy.everything_params`)."""
        return {name: getattr(self, name) for name in EVERYTHING_SETTINGS}

    def public_dict(self) -> dict:
        """Settings without secrets, for logs and /health."""
        hidden = {"label_studio_api_key", "basic_auth_pass", "extra"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
