"""Backend configuration from the environment variables Label Studio ML backends conventionally use."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


class SettingsError(ValueError):
    """An environment variable has a value the backend cannot use; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
    if not value >= minimum:  # also rejects NaN
        raise SettingsError(f"{name} must be >= {minimum:g}, got {raw}")
    return value


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
    # Model
    model: str = "tinysam"
    engine: str = "torch"
    precision: str = "fp32"
    device: str = "auto"
    threads: int = 0  # 0: library default
    cache_bytes: int = 512 * 1024 * 1024
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
    batch_label: str = ""  # brush label given to everything-mode regions; default: the first label
    max_regions: int = 20
    min_region_area: int = 100
    points_per_side: int = 16
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.9
    everything_mode: str = "hierarchical"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> BackendSettings:
        env = os.environ if env is None else env
        values = dict(
            label_studio_url=env.get("LABEL_STUDIO_URL", env.get("LABEL_STUDIO_HOST", "")).strip(),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", env.get("LABEL_STUDIO_ACCESS_TOKEN", "")).strip(),
            basic_auth_user=env.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            model=env.get("TINYSAM_MODEL", "").strip() or "tinysam",
            engine=env.get("TINYSAM_ENGINE", "").strip() or "torch",
            precision=env.get("TINYSAM_PRECISION", "").strip() or "fp32",
            device=env.get("TINYSAM_DEVICE", "").strip() or "auto",
            threads=_int(env, "TINYSAM_THREADS", 0),
            cache_bytes=_int(env, "TINYSAM_CACHE_MB", 512, minimum=1) * 1024 * 1024,
            allowed_hosts=_list(env, "TINYSAM_ALLOWED_HOSTS"),
            local_files_root=env.get("LOCAL_FILES_DOCUMENT_ROOT", "").strip(),
            max_image_bytes=_int(env, "TINYSAM_MAX_IMAGE_MB", 64, minimum=1) * 1024 * 1024,
            fetch_timeout=_float(env, "TINYSAM_FETCH_TIMEOUT", 30.0, minimum=0.1),
            max_request_bytes=_int(env, "TINYSAM_MAX_REQUEST_MB", 64, minimum=1) * 1024 * 1024,
            batch_label=env.get("TINYSAM_BATCH_LABEL", "").strip(),
            max_regions=_int(env, "TINYSAM_MAX_REGIONS", 20, minimum=1),
            min_region_area=_int(env, "TINYSAM_MIN_REGION_AREA", 100),
            points_per_side=_int(env, "TINYSAM_POINTS_PER_SIDE", 16, minimum=1),
            pred_iou_thresh=_float(env, "TINYSAM_PRED_IOU_THRESH", 0.8),
            stability_score_thresh=_float(env, "TINYSAM_STABILITY_THRESH", 0.9),
            everything_mode=env.get("TINYSAM_EVERYTHING_MODE", "").strip() or "hierarchical",
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.everything_mode not in ("hierarchical", "dense"):
            raise SettingsError(f"TINYSAM_EVERYTHING_MODE must be 'hierarchical' or 'dense', "
                                f"got {self.everything_mode!r}")
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise SettingsError(f"LABEL_STUDIO_URL must start with http:// or https://, "
                                f"got {self.label_studio_url!r}")

    def public_dict(self) -> dict:
        """Settings without secrets, for logs and /health."""
        hidden = {"label_studio_api_key", "basic_auth_pass", "extra"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
