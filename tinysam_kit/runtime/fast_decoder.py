"""The mask decoder split into a once-per-image part and a per-prompt part.

In SAM's two-way transformer the first layer's image-side inputs do not depend on the prompt: the keys
(image embedding + dense prompt embedding, which is the constant `no_mask_embed` unless a mask is given),
the positional encoding, and three projections of them (token→image keys and values, image→token queries).
The exact decoder recomputes them for every prompt of a batch, expanded to the batch size. Here they are
computed once (`DecoderImageSide`) and broadcast against any number of prompts (`DecoderPromptSide`), which
saves about a quarter of the decoder's arithmetic and all of its batch-sized copies of the embedding.

Both halves reuse the model's own modules and weights; the arithmetic is the same as
`MaskDecoder.forward` up to floating-point summation order (tested: max |Δ| of logits ≤ 1e-4).
They are plain `nn.Module`s so the ONNX export traces exactly the code the PyTorch engine runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.sam import TinySam


class DecoderImageSide(nn.Module):
    """(image embedding, dense prompt embedding) → the prompt-independent tensors of layer 0.

    Outputs, all (M, HW, ·) with M = 1 without a mask input: keys0, k_t2i, v_t2i, q_i2t.
    """

    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.layer0 = model.mask_decoder.transformer.layers[0]
        # The dense positional encoding is a constant of the model: a buffer, so it is folded at export.
        with torch.no_grad():
            pe = model.prompt_encoder.get_dense_pe()
        self.register_buffer("image_pe", pe.flatten(2).permute(0, 2, 1).contiguous(), persistent=False)

    def forward(self, image_embedding: torch.Tensor, dense: torch.Tensor):
        keys0 = (image_embedding + dense).flatten(2).permute(0, 2, 1)
        k = keys0 + self.image_pe
        layer = self.layer0
        k_t2i = layer.cross_attn_token_to_image.k_proj(k)
        v_t2i = layer.cross_attn_token_to_image.v_proj(keys0)
        q_i2t = layer.cross_attn_image_to_token.q_proj(k)
        return keys0, k_t2i, v_t2i, q_i2t


class DecoderPromptSide(nn.Module):
    """(image-side tensors, sparse prompt embeddings (B, T, C)) → logits (B, 4, 4e, 4e), IoU (B, 4)."""

    def __init__(self, model: TinySam, gemm_upscale: bool = True) -> None:
        super().__init__()
        self.decoder = model.mask_decoder
        self.gemm_upscale = gemm_upscale
        self.embedding_size = model.config.embedding_size
        with torch.no_grad():
            pe = model.prompt_encoder.get_dense_pe()
        self.register_buffer("image_pe", pe.flatten(2).permute(0, 2, 1).contiguous(), persistent=False)

    def forward(self, keys0, k_t2i, v_t2i, q_i2t, sparse):
        dec = self.decoder
        transformer = dec.transformer
        n = sparse.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
        query_pe = tokens

        # Layer 0 with the image-side projections taken from the cache (they broadcast over the batch).
        layer = transformer.layers[0]
        queries = layer.self_attn(tokens, tokens, tokens)  # first layer: no positional term, no residual
        queries = layer.norm1(queries)
        t2i = layer.cross_attn_token_to_image
        queries = layer.norm2(queries + t2i.attend(t2i.q_proj(queries + query_pe), k_t2i, v_t2i))
        queries = layer.norm3(queries + layer.mlp(queries))
        i2t = layer.cross_attn_image_to_token
        q = queries + query_pe
        keys = layer.norm4(keys0 + i2t.attend(q_i2t, i2t.k_proj(q), i2t.v_proj(queries)))

        for later in transformer.layers[1:]:
            queries, keys = later(queries, keys, query_pe, self.image_pe)
        q = queries + query_pe
        k = keys + self.image_pe
        queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q, k, keys))

        mask_tokens_out = queries[:, 1 : 1 + dec.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )
        if self.gemm_upscale:
            masks = self.upscale_and_project(keys, hyper_in)
        else:  # the model's own transposed convolutions: bit-identical to MaskDecoder.forward
            b, hw, c = keys.shape
            e = self.embedding_size
            upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(b, c, e, e))
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, dec.iou_prediction_head(queries[:, 0, :])

    def upscale_and_project(self, keys: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """`output_upscaling` followed by the hypernetwork product, as matrix products.

        Both transposed convolutions have kernel 2 and stride 2, so their output windows do not overlap: each
        is a per-pixel linear map C → 4·C'. Computed as GEMMs in a blocked layout (pixel (4i+2a+c, 4j+2b+d)
        at index (i, j, a, b, c, d)) the only transposition left is on the final 4-channel logits; PyTorch's
        and ONNX Runtime's ConvTranspose kernels are several times slower than the equivalent GEMM.
        """
        up = self.decoder.output_upscaling
        conv1, norm, act1, conv2, act2 = up[0], up[1], up[2], up[3], up[4]
        b, hw, _ = keys.shape
        e = self.embedding_size
        c1, c2 = conv1.out_channels, conv2.out_channels
        # weight (in, out, ka, kb) → (in, ka, kb, out): the kernel offset becomes part of the pixel index.
        w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, conv1.in_channels)
        x = F.linear(keys, w1, conv1.bias.repeat(4)).reshape(b, hw * 4, c1)
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
        x = act2(F.linear(x, w2, conv2.bias.repeat(4)).reshape(b, hw * 16, c2))
        masks = x @ hyper_in.transpose(1, 2)  # (B, 16·HW, K)
        k = masks.shape[-1]
        masks = masks.reshape(b, e, e, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, k, 4 * e, 4 * e)


class SparseEmbedder(nn.Module):
    """SAM-ONNX style point encoding: box corners are points labelled 2 and 3, padding points -1.

    Equal to `PromptEncoder` (points + optional box), in a form with no Python branching so one exported
    graph serves every prompt combination.
    """

    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder

    def forward(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = point_coords + 0.5
        size = pe.input_image_size
        coords = torch.stack([coords[..., 0] / size[1], coords[..., 1] / size[0]], dim=-1)
        emb = pe.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1)
        emb = torch.where(labels == -1, pe.not_a_point_embed.weight, emb)
        for i in range(4):
            emb = emb + torch.where(labels == i, pe.point_embeddings[i].weight, torch.zeros_like(emb[..., :1]))
        return emb


def points_with_boxes(point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                      boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Engine prompts → one (B, N, 2) coordinate / (B, N) label pair (corners labelled 2, 3; pad -1).

    Follows the exact prompt encoder: a padding point is added only when there is no box. Returns None when
    there are neither points nor a box (mask-only prompt).
    """
    parts_c, parts_l = [], []
    if point_coords is not None:
        parts_c.append(point_coords.float())
        parts_l.append(point_labels.float())
        if boxes is None:
            b = point_coords.shape[0]
            parts_c.append(point_coords.new_zeros((b, 1, 2)).float())
            parts_l.append(torch.full((b, 1), -1.0))
    if boxes is not None:
        b = boxes.shape[0]
        parts_c.append(boxes.float().reshape(b, 2, 2))
        parts_l.append(torch.tensor([[2.0, 3.0]]).expand(b, 2))
    if not parts_c:
        return None
    return torch.cat(parts_c, dim=1), torch.cat(parts_l, dim=1)


# Prompts decoded per call. The per-prompt upscaling tensors are ~8 MB each at 1024 px input (16·HW × 32
# floats), so large batches are memory-bound (measured: per-prompt time 3× higher at 16 than at 1 under load)
# and a batch of 64 pins ~1 GB; chunks of 16 keep both in check.
PROMPT_CHUNK = 16


def decode_in_chunks(decode_fn, point_coords, point_labels, boxes, mask_input, chunk: int = PROMPT_CHUNK):
    """Run `decode_fn` over batch slices of at most `chunk` prompts and concatenate the results."""
    batch = next(t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None)
    if batch <= chunk:
        return decode_fn(point_coords, point_labels, boxes, mask_input)
    outs = []
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        outs.append(decode_fn(*(None if t is None else t[part] for t in (point_coords, point_labels, boxes,
                                                                          mask_input))))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
