"""The engine interface: the only thing the inference layer knows about how the networks are executed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from tinysam_kit.models.device import EngineUnavailableError  # noqa: F401 - raised by engines, caught by callers

# Mask tokens an engine's `decode` can be asked for: SAM's single-mask token 0, its three multimask tokens,
# or BEST_MULTIMASK, whichever multimask token predicts the highest IoU (what a single click is answered with).
BEST_MULTIMASK = -1
ALL_TOKENS = (0, 1, 2, 3)
SINGLE_MASK_TOKENS = (0,)
MULTIMASK_TOKENS = (1, 2, 3)



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
        tokens: Sequence[int] = ALL_TOKENS,
        keep_on_device: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the padded S×S frame: coords (B, N, 2), labels (B, N), boxes (B, 4),
        mask_input (B, 1, 4e, 4e) → logits (B, K, 4e, 4e) and IoU predictions (B, K) of the K mask tokens
        chosen by `tokens`: indices 0–3, or -1 for the multimask token (1–3) with the highest predicted IoU.
        Engines compute the masks of the chosen tokens only. With `keep_on_device`, an engine that runs on an
        accelerator may return both as tensors on it, in its own precision (for device-resident
        post-processing); otherwise they are CPU float32."""

    def embedding_nbytes(self, embedding: Any) -> int:
        """Memory held by an embedding, for the byte-bounded cache."""
