"""Reading and writing checkpoints in the official TinySAM format (a flat name → tensor mapping)."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from tinysam_kit.models.config import ModelConfig
from tinysam_kit.models.errors import CheckpointError
from tinysam_kit.models.sam import TinySam, build_model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint without executing pickled code (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a loadable weights file (truncated download, or it needs pickled code, "
            f"which is refused for safety): {first_line}"
        ) from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat mapping of parameter names to tensors")
    return obj


def check_state_dict(model: TinySam, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict comparison with a precise message naming the first offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected key(s) {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        problems.append(f"wrong shape for {', '.join(wrong[:5])}")
    if problems:
        raise CheckpointError(f"{source} does not match the model architecture: " + "; ".join(problems))


def load_weights(model: TinySam, state: dict[str, torch.Tensor], source: str = "checkpoint") -> TinySam:
    check_state_dict(model, state, source)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.eval()
    return model


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None) -> TinySam:
    """Build the architecture described by `config` (default: TinySAM vit_t) and load `path` strictly."""
    state = read_state_dict(path)
    return load_weights(build_model(config), state, source=str(path))


def save_checkpoint(model: TinySam, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the official flat layout, atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = OrderedDict(
        (k, v.detach().to("cpu", dtype) if (dtype is not None and v.is_floating_point()) else v.detach().cpu())
        for k, v in model.state_dict().items()
    )
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
