"""Decisions every front end shares, made here once.

* which model `auto` means, whether the network may be used to fetch it, and what to tell the user;
* everything-mode parameters: an explicit value beats the model's registered value, which beats SAM's default;
* which of TinySAM's masks a prompt returns, and how its score is reported;
* which everything-mode masks pre-labelling keeps (near-whole-image masks are dropped);
* the identity of a run, which decides whether earlier results count as done.

The FiftyOne plugin, the Label Studio backend, the CLI and the Python API call these functions; none of
them declares a default of its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, fields, replace

from tinysam_kit.inference.embedding_store import DEFAULT_MAX_BYTES, EmbeddingStore
from tinysam_kit.models.registry import MODELS, ModelNotAvailableError, cache_dir, resolve_weights
from tinysam_kit.runtime import ENGINES, PRECISIONS
from tinysam_kit.runtime.base import BEST_MULTIMASK, SINGLE_MASK_TOKENS, EngineInfo

AUTO = "auto"
DEMO = "demo"
MODEL_ENV = "TINYSAM_MODEL"
OFFLINE_ENV = "TINYSAM_OFFLINE"
CONFIG_NAME = "config.json"
DEMO_NOTE = ("using the bundled demo model instead (trained on synthetic shapes only; fine for trying the tools, "
             "not for real annotation work)")

# Everything-mode masks covering more than this fraction of the image are background or "the whole scene":
# pre-labelling drops them, because a region that large swallows the annotator's clicks.
MAX_AREA_FRACTION = 0.8
# Everything-mode parameters a user may set in any front end, with SAM's / TinySAM's defaults.
EVERYTHING_DEFAULTS = {
    "points_per_side": 32,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "min_mask_region_area": 0,
    "max_masks": None,
    "max_area_fraction": MAX_AREA_FRACTION,
}


class PolicyError(ValueError):
    """A setting cannot be used as given; the message names it."""


# ------------------------------------------------------------------------------------------ configuration
def user_config() -> dict:
    """`$TINYSAM_HOME/config.json` (default `~/.cache/tinysam/config.json`): {"offline": true, "model": "..."}."""
    path = cache_dir() / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path} must hold a JSON object, e.g. {{\"offline\": true}}")
    return data


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when TINYSAM_OFFLINE is set (1/true/yes/on) or the config file says {"offline": true}:
    `auto` then never contacts the network."""
    env = os.environ.get(OFFLINE_ENV)
    if env is not None and env.strip():
        return _truthy(env)
    return _truthy(user_config().get("offline", False))


def preferred_model() -> str:
    """The model `auto` stands for: TINYSAM_MODEL, else the config file's "model", else official TinySAM."""
    return (os.environ.get(MODEL_ENV) or "").strip() or str(user_config().get("model") or "tinysam")


# ---------------------------------------------------------------------------------------- model choice
@dataclass(frozen=True)
class ModelChoice:
    """The model a request resolved to, and why, in words a user can act on."""

    name: str  # registered name or checkpoint path
    requested: str
    note: str | None = None  # set when `auto` fell back to the demo model

    @property
    def is_fallback(self) -> bool:
        return self.note is not None


@functools.lru_cache(maxsize=8)
def _resolve_auto(preferred: str, offline: bool) -> ModelChoice:
    try:
        resolve_weights(preferred, download=not offline, progress=False)
        return ModelChoice(preferred, AUTO)
    except ModelNotAvailableError as exc:
        if DEMO not in MODELS:
            raise
        why = str(exc).rstrip(". ")
        if offline:
            why += f" ({OFFLINE_ENV} is set, so nothing was downloaded)"
        return ModelChoice(DEMO, AUTO, f"{why}; {DEMO_NOTE}. Pass --model demo (or model='demo') to choose it "
                                       "explicitly, or put the official weights where this message says")


def resolve_model(model: str | os.PathLike | None = AUTO, *, offline: bool | None = None) -> ModelChoice:
    """`auto` → the preferred model when its weights are here (or downloadable while online), else the bundled
    demo model with a note saying why. Anything else is used as given. Decided once per process."""
    model = str(model or AUTO)
    if model != AUTO:
        return ModelChoice(model, model)
    return _resolve_auto(preferred_model(), is_offline() if offline is None else offline)


_NOTES_SAID: set[str] = set()
_NOTES_LOCK = threading.Lock()


def announce(choice: ModelChoice, say) -> None:
    """Say why `auto` fell back to the demo model, once per process, through whoever asks first (a command's
    stderr, a server's log): `say(note)`."""
    if not choice.note:
        return
    with _NOTES_LOCK:
        if choice.note in _NOTES_SAID:
            return
        _NOTES_SAID.add(choice.note)
    say(choice.note)


@dataclass(frozen=True)
class EngineOptions:
    """How to run the model: one type for every front end (forms, settings, command-line flags)."""

    model: str = AUTO
    engine: str = "torch"
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise PolicyError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.precision not in PRECISIONS:
            raise PolicyError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise PolicyError(f"threads must be a positive integer, got {self.threads!r}")

    @classmethod
    def from_mapping(cls, values: dict) -> EngineOptions:
        """From a form or settings mapping; missing, empty and None values take the defaults."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in known and v not in (None, "")}
        if "threads" in given:
            try:
                given["threads"] = int(given["threads"]) or None
            except (TypeError, ValueError) as exc:
                raise PolicyError(f"threads must be an integer, got {given['threads']!r}") from exc
        return cls(**{k: str(v) if k != "threads" else v for k, v in given.items()})

    def resolved(self) -> tuple[EngineOptions, ModelChoice]:
        choice = resolve_model(self.model)
        return replace(self, model=choice.name), choice

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------- everything mode
def registered_everything_params(model_name: str) -> dict:
    """Everything-mode values registered for a model (its IoU head and stability may run lower than SAM's)."""
    spec = MODELS.get(model_name)
    return dict(spec.everything_defaults) if spec is not None else {}


def everything_params(model_name: str, explicit: dict | None = None, *, prelabel: bool = False) -> dict:
    """The parameters an everything-mode run uses: explicit (non-None) values beat the model's registered
    values, which beat SAM's defaults. `prelabel=True` (every front end) also drops near-whole-image masks
    unless `max_area_fraction` is given; the plain Python API keeps SAM's behaviour."""
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    params = {**registered_everything_params(model_name), **explicit}
    if prelabel:
        params = {**{k: v for k, v in EVERYTHING_DEFAULTS.items() if v is not None},
                  **registered_everything_params(model_name), **explicit}
    return params


def everything_summary(model_name: str, explicit: dict | None = None) -> dict:
    """Every front-end everything-mode parameter with the value a run would use (for forms and run records)."""
    return {**EVERYTHING_DEFAULTS, **everything_params(model_name, explicit, prelabel=True)}


def keep_record(record: dict, height: int, width: int, max_area_fraction: float | None) -> bool:
    """Pre-labelling keeps an everything-mode mask unless it covers more than `max_area_fraction` of the image."""
    if max_area_fraction is None or max_area_fraction >= 1.0:
        return True
    return int(record["area"]) <= max_area_fraction * height * width


POSTPROCESS_CHOICES = ("auto", "host", "device")


def postprocess_on_device(info: EngineInfo, choice: str = "auto") -> bool:
    """Whether everything-mode post-processing runs on the engine's device. `auto`: on an accelerator (a
    PyTorch engine on CUDA), so that only compact masks cross to the host; on the CPU the host path, whose
    windowed resize is faster there. `device` on a CPU engine runs the device code on the CPU."""
    if choice not in POSTPROCESS_CHOICES:
        raise PolicyError(f"postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "device"
    return info.engine == "torch" and info.device.startswith("cuda")


# -------------------------------------------------------------------------------------- embedding store
STORE_ENV = "TINYSAM_EMBEDDING_STORE"  # a folder, or "off"
STORE_MB_ENV = "TINYSAM_EMBEDDING_STORE_MB"


def embedding_store() -> EmbeddingStore | None:
    """The persistent embedding store the front ends share (FiftyOne operators, the Label Studio backend,
    `--embeddings-only` warm-ups): `$TINYSAM_HOME/embeddings`, 4 GiB, unless TINYSAM_EMBEDDING_STORE names
    another folder or "off" and TINYSAM_EMBEDDING_STORE_MB another bound."""
    where = (os.environ.get(STORE_ENV) or "").strip()
    if where.lower() in ("off", "0", "false", "no", "none"):
        return None
    raw = (os.environ.get(STORE_MB_ENV) or "").strip()
    try:
        max_bytes = int(raw) * 1024 * 1024 if raw else DEFAULT_MAX_BYTES
    except ValueError as exc:
        raise PolicyError(f"{STORE_MB_ENV} must be a number of megabytes, got {raw!r}") from exc
    if max_bytes < 1:
        raise PolicyError(f"{STORE_MB_ENV} must be positive, got {raw!r}")
    return EmbeddingStore(where or cache_dir() / "embeddings", max_bytes)


# ------------------------------------------------------------------------------------------------ prompts
def prompt_tokens(n_points: int, has_box: bool) -> tuple[int, ...]:
    """Which mask answers a prompt. A single click is ambiguous (part or whole?): the best of TinySAM's three
    masks by predicted IoU. Several clicks or a box pin the object down: SAM's single-mask output."""
    return (BEST_MULTIMASK,) if n_points == 1 and not has_box else SINGLE_MASK_TOKENS


def report_score(predicted_iou: float) -> float:
    """A mask's score as tools show it: the predicted IoU clamped to [0, 1] (the IoU head can exceed 1)."""
    value = float(predicted_iou)
    if value != value:  # NaN
        return 0.0
    return min(max(value, 0.0), 1.0)


# ------------------------------------------------------------------------------------------------- runs
def run_identity(model_version: str, task: str, params: dict | None = None) -> str:
    """Identity of a run's results: model, engine, precision and every parameter. Results with another identity
    are not "done" for this run."""
    blob = json.dumps({"task": task, "params": params or {}}, sort_keys=True, default=str)
    return f"{model_version}-{task}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def changed_settings(old: dict | None, new: dict) -> list[str]:
    """Names of the settings whose values differ between two run records (nested dicts by dotted name)."""
    old = old or {}
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{sub}" for sub in changed_settings(a, b)]
        elif a != b:
            out.append(key)
    return out


def registered_weights(name: str) -> tuple[os.PathLike, dict]:
    """The checksum-verified weights file of a registered model (downloaded unless offline) and its architecture,
    for tools that keep their own copy (FiftyOne's model zoo)."""
    path, spec = resolve_weights(name, download=not is_offline())
    return path, spec.config.to_dict()
