"""Which torch device a model runs on."""

from __future__ import annotations

import torch


class EngineUnavailableError(RuntimeError):
    """The requested engine, device, precision or provider cannot run on this machine."""

def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is a one-line error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EngineUnavailableError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineUnavailableError(
                f"device {device!r} requested but CUDA is not available here (torch {torch.__version__}); use cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EngineUnavailableError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise EngineUnavailableError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev
