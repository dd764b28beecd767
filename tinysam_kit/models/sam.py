"""The full TinySAM network (image encoder + prompt encoder + mask decoder)."""

from __future__ import annotations

import torch
from torch import nn

from tinysam_kit.data.preprocess import PIXEL_MEAN, PIXEL_STD
from tinysam_kit.models.config import ModelConfig, TinyViTConfig
from tinysam_kit.models.mask_decoder import MaskDecoder, TwoWayTransformer
from tinysam_kit.models.prompt_encoder import PromptEncoder
from tinysam_kit.models.tiny_vit import TinyViT


def build_image_encoder(config: ModelConfig) -> nn.Module:
    out_chans = config.decoder.prompt_embed_dim
    if isinstance(config.encoder, TinyViTConfig):
        return TinyViT(config.encoder, out_chans=out_chans)
    from tinysam_kit.models.sam_vit import ImageEncoderViT  # SAM teachers; imported lazily, rarely needed

    return ImageEncoderViT(config.encoder, out_chans=out_chans)


class TinySam(nn.Module):
    """Networks only: no image I/O, no prompt transforms. Those live in `data` and `inference`."""

    mask_threshold: float = 0.0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dec = config.decoder
        self.image_encoder = build_image_encoder(config)
        self.prompt_encoder = PromptEncoder(dec.prompt_embed_dim, config.embedding_size, config.img_size,
                                            dec.mask_in_chans)
        transformer = TwoWayTransformer(dec.transformer_depth, dec.prompt_embed_dim, dec.transformer_heads,
                                        dec.transformer_mlp_dim, dec.attention_downsample_rate)
        self.mask_decoder = MaskDecoder(dec.prompt_embed_dim, transformer, dec.num_multimask_outputs,
                                        dec.iou_head_depth, dec.iou_head_hidden_dim)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, padded NCHW images (img_size²) to image embeddings."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the padded input frame to (logits of all 4 tokens at low res, IoU predictions)."""
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)

    def forward(self, images: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor):
        return self.decode(self.encode(images), point_coords, point_labels)


def build_model(config: ModelConfig | None = None) -> TinySam:
    model = TinySam(config or ModelConfig())
    model.eval()
    return model
