"""int8 image encoder for the PyTorch engine on x86 CPUs with int8 matrix instructions (VNNI, AMX).

Static post-training quantization in PyTorch's export path (torchao's PT2E flow with its
`X86InductorQuantizer`: uint8 activations calibrated per tensor on images, int8 per-channel weights),
compiled by Inductor with frozen weights, which lowers the quantized products to oneDNN's int8 kernels.
ONNX Runtime's int8 encoder keeps every convolution and activation in fp32 and runs 0.44× the exact
encoder's time; this one runs 0.16–0.20× (benchmarks/bench_core.py, docs/runtime.md).

The stem and stage 0 (patch embedding and MBConv blocks at 1/4 resolution) and the downsampling
convolutions stay in float — bf16 where the CPU has bf16 matrix units — as do LayerNorm, softmax and GELU:
quantizing the stem and downsampling costs most of the fidelity (random TinySAM weights, embedding cosine
vs fp32: 0.9917 with everything int8, 0.9971 with them in float) and, in bf16, they are no slower.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import shutil
import warnings

import torch
from torch import nn

from .base import EngineUnavailableError

LOG = logging.getLogger(__name__)

# Encoder modules (name prefixes or parts) left in float; SAM ViT encoders only match `patch_embed`.
FLOAT_MODULES = ("patch_embed", "layers.0.", "downsample")
CALIBRATION_IMAGES = 4
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_int8_matmul(flags: frozenset[str] | None = None) -> bool:
    """oneDNN's int8 kernels need VNNI (AVX-512 or AVX) or AMX; without them int8 is emulated and slow."""
    from .torch_engine import cpu_flags

    flags = cpu_flags() if flags is None else flags
    return bool(INT8_FLAGS & flags)


def check_int8(device: torch.device, flags: frozenset[str] | None = None, machine: str | None = None) -> None:
    """One-line EngineUnavailableError unless the torch engine can run int8 here."""
    if device.type != "cpu":
        raise EngineUnavailableError(
            "int8 on the torch engine runs on x86 CPUs; on CUDA use fp16 or bf16, or engine='onnx' precision='int8'")
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ("x86_64", "amd64") or not cpu_has_int8_matmul(flags):
        raise EngineUnavailableError(
            "int8 on the torch engine needs an x86 CPU with VNNI or AMX int8 instructions, which this one lacks; "
            "use engine='onnx' precision='int8', or fp32")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise EngineUnavailableError(
            "int8 on the torch engine compiles its kernels with torch.compile, which needs a C++ compiler (g++) "
            "on PATH; install one, or use engine='onnx' precision='int8'")
    _torchao()


def _torchao():
    """torchao's PT2E quantization API; its import logs warnings about CUDA-only kernels, kept quiet here."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as exc:
        raise EngineUnavailableError(
            "int8 on the torch engine needs torchao (pip install 'tinysam-kit[int8]'); "
            f"or use engine='onnx' precision='int8' ({exc})") from exc
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return prepare_pt2e, convert_pt2e, x86


def quantize_encoder(encoder: nn.Module, calibration: list[torch.Tensor],
                     float_modules: tuple[str, ...] = FLOAT_MODULES) -> nn.Module:
    """Exported, calibrated and converted copy of `encoder` (fp32, eval) for one (1, 3, S, S) image at a time.

    Returns the reference form (quantize/dequantize around int8 products, computed in float): run it
    eagerly to measure fidelity, or compile it (`Int8Encoder`) for the int8 kernels.
    """
    if not calibration:
        raise ValueError("int8 quantization needs at least one calibration image")
    prepare_pt2e, convert_pt2e, x86 = _torchao()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    for name, _ in encoder.named_modules():
        if name and any(part in name for part in float_modules):
            quantizer.set_module_name_qconfig(name, None)
    with torch.no_grad():
        graph = torch.export.export(encoder.eval(), (calibration[0],)).module()
        prepared = prepare_pt2e(graph, quantizer)
        for image in calibration:
            prepared(image)
        return convert_pt2e(prepared)


class Int8Encoder(nn.Module):
    """The quantized encoder compiled by Inductor (frozen weights: oneDNN int8 kernels), with its float parts in
    bf16 when `bf16` is set. Takes (B, 3, S, S) float32 images one at a time (it was exported for batch 1)
    and returns float32 embeddings. Compilation happens on the first call (tens of seconds for TinySAM)."""

    def __init__(self, quantized: nn.Module, bf16: bool) -> None:
        super().__init__()
        self.quantized = quantized
        self.bf16 = bf16
        self.compiled = torch.compile(quantized, dynamic=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        # freezing is what turns the quantized products into prepacked oneDNN int8 kernels; passed as a
        # compile option instead, Inductor fails on them (torch 2.13)
        with inductor_config.patch(freezing=True), torch.inference_mode(), autocast:
            out = [self.compiled(images[i : i + 1].contiguous()).float() for i in range(images.shape[0])]
        return torch.cat(out)


def default_calibration(img_size: int, count: int = CALIBRATION_IMAGES) -> list[torch.Tensor]:
    """Project-made synthetic scenes, preprocessed like the predictor's inputs."""
    from ..training.data import to_model_input
    from .quantize import synthetic_images

    return [to_model_input(image, img_size)[0] for image in synthetic_images(count, img_size)]


def int8_encoder(encoder: nn.Module, img_size: int, bf16: bool,
                 calibration: list[torch.Tensor] | None = None) -> Int8Encoder:
    LOG.info("quantizing the encoder to int8 (calibration, then compilation on first use)")
    images = calibration if calibration is not None else default_calibration(img_size)
    with warnings.catch_warnings():  # Inductor's and torchao's notes to their own developers
        warnings.simplefilter("ignore", UserWarning)
        compiled = Int8Encoder(quantize_encoder(encoder, images), bf16)
        compiled(images[0])  # compile now, not on the user's first image
    return compiled
