"""PyTorch execution of the networks (CPU/CUDA)."""

from __future__ import annotations

import threading

import torch

from ..models.sam import TinySam
from .base import EngineInfo, EngineUnavailableError


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


class TorchEngine:
    """Runs a `TinySam` module. fp32 is the exact path; fp16/bf16 trade exactness for speed."""

    def __init__(self, model: TinySam, *, device: str = "auto", precision: str = "fp32",
                 model_name: str = "custom", model_sha256: str | None = None, threads: int | None = None):
        self.device = resolve_device(device)
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if precision not in dtypes:
            raise EngineUnavailableError(
                f"precision {precision!r} is not available on the torch engine (use fp32, fp16, bf16; "
                "int8 runs on the onnx engine)"
            )
        if precision == "fp16" and self.device.type != "cuda":
            raise EngineUnavailableError("fp16 needs a CUDA device; on CPU use fp32 or bf16")
        if threads:
            torch.set_num_threads(int(threads))
        self.dtype = dtypes[precision]
        self.model = model.to(self.device, self.dtype).eval()
        self._lock = threading.Lock()
        cfg = model.config
        self.info = EngineInfo("torch", precision, str(self.device), model_name, model_sha256,
                               cfg.img_size, cfg.low_res_size)
        with torch.inference_mode():
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            return self.model.encode(image.to(self.device, self.dtype))

    def decode(self, embedding, point_coords, point_labels, boxes, mask_input):
        def put(t):
            return None if t is None else t.to(self.device, self.dtype)

        with torch.inference_mode():
            pe = self.model.prompt_encoder
            points = (put(point_coords), put(point_labels)) if point_coords is not None else None
            sparse, dense = pe(points, put(boxes), put(mask_input))
            logits, iou = self.model.mask_decoder(embedding, self._dense_pe, sparse, dense)
            return logits.float().cpu(), iou.float().cpu()

    def embedding_nbytes(self, embedding: torch.Tensor) -> int:
        return embedding.numel() * embedding.element_size()
