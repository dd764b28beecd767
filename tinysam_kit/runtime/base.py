"""The engine interface: the only thing operators know about how the networks are executed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


class EngineUnavailableError(RuntimeError):
    """The requested engine, device, precision or provider cannot run on this machine."""


@dataclass(frozen=True)
class EngineInfo:
    engine: str  # "torch" | "onnx"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8"
    device: str  # "cpu" | "cuda" | "cuda:N"
    model_name: str  # registry name or file stem
    model_sha256: str | None
    img_size: int
    low_res_size: int

    @property
    def model_version(self) -> str:
        """Stable identifier of what produces the masks; changes with model, engine and precision."""
        digest = (self.model_sha256 or "local")[:12]
        return f"tinysam-{self.model_name}-{digest}-{self.engine}-{self.precision}"


@runtime_checkable
class Engine(Protocol):
    """Encode an image once, decode many prompts against its embedding.

    Inputs and outputs are CPU float32 torch tensors so all engines share one post-processing path.
    Embeddings are opaque to callers (a tensor for torch, an array for ONNX Runtime).
    """

    info: EngineInfo

    def encode(self, image: torch.Tensor) -> Any:
        """(1, 3, S, S) normalised, zero-padded image → embedding."""

    def decode(
        self,
        embedding: Any,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the padded S×S frame: coords (B, N, 2), labels (B, N), boxes (B, 4),
        mask_input (B, 1, 4e, 4e) → logits (B, 4, 4e, 4e) of all mask tokens and IoU (B, 4)."""

    def embedding_nbytes(self, embedding: Any) -> int:
        """Memory held by an embedding, for the byte-bounded cache."""
