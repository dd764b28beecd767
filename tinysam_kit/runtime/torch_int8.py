"""int8 image encoder for the PyTorch engine on x86 CPUs with int8 matrix instructions (VNNI, AMX).

Static post-training quantization in PyTorch's export path (torchao's PT2E flow with its
`X86InductorQuantizer`: uint8 activations calibrated per tensor on images, int8 per-channel weights),
compiled ahead of time by Inductor with frozen weights (an AOTInductor package, which lowers the quantized
products to oneDNN's int8 kernels), cached per model so later processes load it instead of compiling. ONNX
Runtime's int8 encoder keeps every convolution and activation in fp32; this one runs the quantized products
in int8 kernels and is several times faster (benchmarks/bench_core.py compares them; docs/runtime.md).

The stem and stage 0 (patch embedding and MBConv blocks at 1/4 resolution) and the downsampling
convolutions stay in float — bf16 where the CPU has bf16 matrix units — as do LayerNorm, softmax and GELU:
quantizing the stem and downsampling costs most of the fidelity (embedding cosine vs fp32, measured per
choice of float modules in docs/runtime.md) and, in bf16, they are no slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from tinysam_kit.models.registry import cache_dir, sha256_file
from tinysam_kit.runtime.base import EngineUnavailableError
from tinysam_kit.runtime.cpu import cpu_flags

LOG = logging.getLogger(__name__)

# Encoder modules (name prefixes or parts) left in float; SAM ViT encoders only match `patch_embed`.
FLOAT_MODULES = ("patch_embed", "layers.0.", "downsample")
CALIBRATION_IMAGES = 4
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
PACKAGE_FORMAT = 2  # bump when the compiled program changes for the same model


def cpu_has_int8_matmul(flags: frozenset[str] | None = None) -> bool:
    """oneDNN's int8 kernels need VNNI (AVX-512 or AVX) or AMX; without them int8 is emulated and slow."""
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
            "int8 on the torch engine compiles its kernels with Inductor, which needs a C++ compiler (g++) "
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


def pt2e_quantize_encoder(encoder: nn.Module, calibration: list[torch.Tensor],
                     float_modules: tuple[str, ...] = FLOAT_MODULES) -> nn.Module:
    """Exported, calibrated and converted copy of `encoder` (fp32, eval) for one (1, 3, S, S) image at a time.

    Returns the reference form (quantize/dequantize around int8 products, computed in float): run it
    eagerly to measure fidelity, or compile it (`build_package`) for the int8 kernels.
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


class _Autocast(nn.Module):
    """The quantized encoder with its float parts in bf16 (when asked) and a float32 embedding out; exported
    as is, so the autocast regions are part of the compiled program."""

    def __init__(self, quantized: nn.Module, bf16: bool) -> None:
        super().__init__()
        self.quantized = quantized
        self.bf16 = bf16

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.quantized(image).float()


class Int8Encoder(nn.Module):
    """The int8 encoder compiled ahead of time by Inductor (an AOTInductor package: frozen weights, oneDNN int8
    kernels). Takes (B, 3, S, S) float32 images one at a time (it was compiled for batch 1) and returns float32
    embeddings. `from_cache` tells whether the package was loaded rather than built."""

    def __init__(self, package: Path, from_cache: bool) -> None:
        super().__init__()
        from torch._inductor import aoti_load_package

        self.package = package
        self.from_cache = from_cache
        self.runner = aoti_load_package(str(package))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.runner(images[i : i + 1].contiguous()) for i in range(images.shape[0])])


def build_package(encoder: nn.Module, calibration: list[torch.Tensor], bf16: bool, path: Path) -> None:
    """Quantize, export and compile `encoder` into the AOTInductor package `path` (written atomically, with a
    `.sha256` sidecar that `verified_package` checks before anything loads it)."""
    from torch._inductor import aoti_compile_and_package

    quantized = pt2e_quantize_encoder(encoder, calibration)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        with warnings.catch_warnings(), torch.no_grad():  # Inductor's and torchao's notes to their developers
            warnings.simplefilter("ignore", UserWarning)
            # the compiled program assumes its example's strides (it has no guards): standard layout, which
            # `Int8Encoder` always feeds
            program = torch.export.export(_Autocast(quantized, bf16), (calibration[0].contiguous(),))
            # freezing is what turns the quantized products into prepacked oneDNN int8 kernels
            aoti_compile_and_package(program, package_path=str(tmp), inductor_configs={"freezing": True})
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        _sidecar(path).write_text(digest + "\n")
    finally:
        tmp.unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verified_package(path: Path) -> bool:
    """A package is loaded only if it is complete and unchanged since this code wrote it: loading one runs its
    compiled code, so a truncated or altered file is rebuilt instead."""
    sidecar = _sidecar(path)
    if not (path.is_file() and sidecar.is_file()):
        return False
    return sidecar.read_text().strip() == sha256_file(path)


def compiled_dir() -> Path:
    """Where compiled packages of models with a known hash are cached (`$TINYSAM_HOME/compiled`)."""
    return cache_dir() / "compiled"


def package_path(model_sha256: str, img_size: int, bf16: bool) -> Path:
    """Where the compiled encoder of a model lives: keyed by everything that changes the compiled program."""
    import torchao

    key = json.dumps([PACKAGE_FORMAT, model_sha256, img_size, bf16, FLOAT_MODULES, CALIBRATION_IMAGES,
                      torch.__version__, torchao.__version__, platform.machine(), sorted(INT8_FLAGS & cpu_flags())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return compiled_dir() / f"encoder-{model_sha256[:16]}-{digest}.int8.pt2"


def default_calibration(img_size: int, count: int = CALIBRATION_IMAGES) -> list[torch.Tensor]:
    """Project-made synthetic scenes, preprocessed like the predictor's inputs."""
    from tinysam_kit.data.preprocess import to_model_input
    from tinysam_kit.runtime.quantize import synthetic_images

    return [to_model_input(image, img_size)[0] for image in synthetic_images(count, img_size)]


def int8_encoder(encoder: nn.Module, img_size: int, bf16: bool, model_sha256: str | None = None) -> Int8Encoder:
    """The compiled int8 encoder: loaded from the cache when this model was compiled before, else built
    (calibration and compilation; docs/runtime.md gives times) and, for a model with a known hash, cached;
    otherwise built in a temporary directory (the loaded program does not need its file afterwards)."""
    path = package_path(model_sha256, img_size, bf16) if model_sha256 is not None else None
    if path is not None and verified_package(path):
        try:
            return Int8Encoder(path, from_cache=True)
        except (RuntimeError, OSError) as exc:  # e.g. written by an incompatible build: rebuild
            LOG.warning("could not load the cached int8 encoder %s (%s); rebuilding it", path, exc)
    LOG.info("quantizing and compiling the encoder to int8 (once per model; about a minute for TinySAM)")
    with contextlib.ExitStack() as stack:
        if path is None:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "encoder.int8.pt2"
        build_package(encoder, default_calibration(img_size), bf16, path)
        return Int8Encoder(path, from_cache=False)
