"""tinysam-kit: TinySAM for annotation teams (FiftyOne, Label Studio, CLI).

    from tinysam_kit import TinySamPredictor, generate_everything

    predictor = TinySamPredictor.from_pretrained("auto")
    predictor.set_image("photo.jpg")
    mask, score, _ = predictor.segment(point_coords=[[250, 180]], point_labels=[1])
    records = generate_everything(predictor, "photo.jpg")
"""

from __future__ import annotations

import importlib

from tinysam_kit.version import __version__

# The public names are imported on first use: importing a light module of the package (image decoding, the
# object-storage reader) must not import PyTorch, or every Ray decode actor and CLI start pays for it.
_PUBLIC = {
    "EngineOptions": "tinysam_kit.inference.policy",
    "ImageError": "tinysam_kit.data.images",
    "PromptError": "tinysam_kit.inference.predictor",
    "TinySamPredictor": "tinysam_kit.inference.predictor",
    "generate_everything": "tinysam_kit.inference.everything",
    "load_model": "tinysam_kit.models.registry",
    "resolve_model": "tinysam_kit.inference.policy",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tinysam_kit' has no attribute {name!r}")


def list_models() -> list[str]:
    """Names of the registered models (any checkpoint path works too)."""
    from tinysam_kit.models.registry import MODELS

    return sorted(MODELS)


__all__ = ["EngineOptions", "ImageError", "PromptError", "TinySamPredictor", "__version__", "generate_everything",
           "list_models", "load_model", "resolve_model"]
