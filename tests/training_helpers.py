"""Tiny models and worlds for fast training tests (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinysam_kit.data.synthetic import WorldConfig
from tinysam_kit.models.checkpoint import save_checkpoint
from tinysam_kit.models.config import DecoderConfig, ModelConfig, TinyViTConfig
from tinysam_kit.models.sam import build_model

TINY_DECODER = DecoderConfig(prompt_embed_dim=32, transformer_depth=1, transformer_heads=2, transformer_mlp_dim=64,
                             iou_head_hidden_dim=32, mask_in_chans=8)
TEACHER = ModelConfig(
    encoder=TinyViTConfig(img_size=64, embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                          window_sizes=(7, 4, 4, 4), num_classes=0),
    decoder=TINY_DECODER,
)
STUDENT = ModelConfig(
    encoder=TinyViTConfig(img_size=64, embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
                          window_sizes=(7, 4, 4, 4), mbconv_expand_ratio=2.0, num_classes=0),
    decoder=TINY_DECODER,
)
TINY_WORLD = WorldConfig(size=64, min_objects=2, max_objects=3, min_extent=18, max_extent=40, min_visible_area=60,
                         clutter=4)


def save_model(config: ModelConfig, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(config)
    save_checkpoint(model, path)
    path.with_name(path.name + ".json").write_text(json.dumps({"config": config.to_dict()}))
    return path


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)
