"""Inference engines. `create_engine` is the single switch between PyTorch and ONNX Runtime."""

from __future__ import annotations

from tinysam_kit.models.device import resolve_device
from tinysam_kit.runtime.base import (
    ALL_TOKENS,
    BEST_MULTIMASK,
    MULTIMASK_TOKENS,
    SINGLE_MASK_TOKENS,
    Engine,
    EngineInfo,
    EngineUnavailableError,
)
from tinysam_kit.runtime.torch_engine import TorchEngine

ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def create_engine(model: str = "tinysam", *, engine: str = "torch", precision: str = "fp32",
                  device: str = "auto", threads: int | None = None, **options) -> Engine:
    """Load `model` (registry name or checkpoint path) and wrap it in the requested engine.

    `options` go to the engine: torch takes `exact`, `channels_last`; onnx takes `export_dir`.
    Unavailable devices, precisions or providers raise a one-line EngineUnavailableError.
    """
    from tinysam_kit.models.registry import load_model_with_info

    if engine not in ENGINES:
        raise EngineUnavailableError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if precision not in PRECISIONS:
        raise EngineUnavailableError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if engine == "torch":
        resolve_device(device)  # fail fast, before loading weights
    if engine == "onnx":
        from tinysam_kit.runtime.onnx_engine import OnnxEngine  # optional dependency

        return OnnxEngine.from_model(model, precision=precision, device=device, threads=threads, **options)
    net, name, sha = load_model_with_info(model, device="cpu")
    return TorchEngine(net, device=device, precision=precision, model_name=name, model_sha256=sha,
                       threads=threads, **options)


__all__ = ["ALL_TOKENS", "BEST_MULTIMASK", "MULTIMASK_TOKENS", "SINGLE_MASK_TOKENS", "Engine", "EngineInfo",
           "EngineUnavailableError", "TorchEngine", "create_engine", "resolve_device"]
