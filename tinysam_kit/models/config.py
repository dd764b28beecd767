"""Architecture descriptions. A checkpoint's key layout follows from its config alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT image encoder; the defaults are TinySAM/MobileSAM's "vit_t" (TinyViT-5M)."""

    img_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    num_classes: int = 1000  # the unused ImageNet head is part of the official key layout
    kind: str = field(default="tiny_vit", init=False)


@dataclass(frozen=True)
class ViTConfig:
    """SAM's plain ViT encoder (ViT-B/L/H), windowed + global attention with relative positions."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256
    kind: str = field(default="vit", init=False)


@dataclass(frozen=True)
class DecoderConfig:
    """Prompt encoder + two-way transformer + mask decoder (SAM's, shared by TinySAM/MobileSAM)."""

    prompt_embed_dim: int = 256
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    iou_head_hidden_dim: int = 256
    iou_head_depth: int = 3
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3


@dataclass(frozen=True)
class ModelConfig:
    encoder: TinyViTConfig | ViTConfig = TinyViTConfig()
    decoder: DecoderConfig = DecoderConfig()

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def embedding_size(self) -> int:
        return self.encoder.img_size // 16

    @property
    def low_res_size(self) -> int:
        return 4 * self.embedding_size

    def to_dict(self) -> dict:
        return {"encoder": asdict(self.encoder), "decoder": asdict(self.decoder)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        enc = dict(data["encoder"])
        kind = enc.pop("kind", "tiny_vit")
        enc = {k: tuple(v) if isinstance(v, list) else v for k, v in enc.items()}
        encoder = TinyViTConfig(**enc) if kind == "tiny_vit" else ViTConfig(**enc)
        return cls(encoder=encoder, decoder=DecoderConfig(**data.get("decoder", {})))


TINYSAM_VIT_T = ModelConfig()
SAM_VIT_B = ModelConfig(encoder=ViTConfig())
SAM_VIT_L = ModelConfig(
    encoder=ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
)
SAM_VIT_H = ModelConfig(
    encoder=ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
)

# The bundled `demo` model (trained by tinysam_kit/training/demo.py): a small TinyViT at 256-px input.
# Its decoder heads (4) cannot be read off the weights, so this config is what loads it.
DEMO = ModelConfig(
    encoder=TinyViTConfig(img_size=256, embed_dims=(16, 48, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                          window_sizes=(7, 8, 8, 8), mbconv_expand_ratio=2.0, num_classes=0),
    decoder=DecoderConfig(prompt_embed_dim=128, transformer_depth=2, transformer_heads=4, transformer_mlp_dim=512,
                          iou_head_hidden_dim=128, mask_in_chans=16),
)
