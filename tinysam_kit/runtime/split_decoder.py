"""The mask decoder split into a once-per-image part and a per-prompt part.

In SAM's two-way transformer the first layer's image-side inputs do not depend on the prompt: the keys
(image embedding + dense prompt embedding, which is the constant `no_mask_embed` unless a mask is given),
the positional encoding, and three projections of them (token→image keys and values, image→token queries).
The exact decoder recomputes them for every prompt of a batch, expanded to the batch size. Here they are
computed once (`DecoderImageSide`, which also stores them split into attention heads) and broadcast against
any number of prompts (`DecoderPromptSide`), which saves about a quarter of the decoder's arithmetic and all
of its batch-sized copies of the embedding. The later cross-attentions fold their projections of the 4096
image tokens into the handful of prompt tokens (`token_to_image`, `image_to_token`), halving the rest; with
the softmax laid out along the image axis and no per-prompt head transpositions of image-sized tensors, one
click decodes several times faster than `MaskDecoder.forward` on CPU (benchmarks/bench_core.py measures it).

Both halves reuse the model's own modules and weights; the function is `MaskDecoder.forward`'s up to
floating-point summation order (tested: logits within 1e-4 + 2e-6 of their scale, same masks).
They are plain `nn.Module`s so the ONNX export traces exactly the code the PyTorch engine runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinysam_kit.models.mask_decoder import best_multimask_token
from tinysam_kit.models.sam import TinySam


class DecoderImageSide(nn.Module):
    """(image embedding, dense prompt embedding) → the prompt-independent tensors of layer 0.

    Outputs, with M = 1 without a mask input: keys0 (M, HW, C) and the three projections already split into
    heads (`_cached_heads`): k_t2i (M, H, d, HW), v_t2i (M, H, HW, d), q_i2t (M, H, d, HW).
    """

    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.layer0 = model.mask_decoder.transformer.layers[0]
        # The dense positional encoding is a constant of the model: a buffer, so it is folded at export.
        with torch.no_grad():
            pe = model.prompt_encoder.get_dense_pe()
        self.register_buffer("image_pe", pe.flatten(2).permute(0, 2, 1).contiguous(), persistent=False)

    def forward(self, image_embedding: torch.Tensor, dense: torch.Tensor):
        # contiguous: every prompt reads it several times, and strided reads of it cost more than the copy
        keys0 = (image_embedding + dense).flatten(2).permute(0, 2, 1).contiguous()
        k = keys0 + self.image_pe
        t2i, i2t = self.layer0.cross_attn_token_to_image, self.layer0.cross_attn_image_to_token
        k_t2i = _cached_heads(t2i.k_proj(k), t2i.num_heads, transposed=True)
        v_t2i = _cached_heads(t2i.v_proj(keys0), t2i.num_heads, transposed=False)
        q_i2t = _cached_heads(i2t.q_proj(k), i2t.num_heads, transposed=True)
        return keys0, k_t2i, v_t2i, q_i2t


def _cached_heads(x: torch.Tensor, heads: int, transposed: bool) -> torch.Tensor:
    """(M, N, H·d) → (M, H, d, N) or (M, H, N, d), stored contiguous: once per image, so that every prompt's
    products against it are per-head products (H× less arithmetic than one block-diagonal product)."""
    x = _heads(x, heads)
    return (x.transpose(2, 3) if transposed else x).contiguous()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H·d) → (B, H, T, d)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def token_to_image(attn: nn.Module, q_tokens: torch.Tensor, k_image: torch.Tensor,
                   v_image: torch.Tensor) -> torch.Tensor:
    """`attn(q_tokens, k_image, v_image)` with the projections of the N image tokens folded into the few
    prompt tokens: per head, q·(W_k x + b_k) = (q W_k)·x + const and softmax(·)(W_v x + b_v) =
    W_v (softmax(·) x) + b_v, so the (N, C) image tensors enter two matrix products with H·T rows instead
    of three C→C/2 projections (T ≤ 16 tokens: 2·H·T < 3·C/2 multiply-adds per image token).
    The key bias only shifts each softmax row by a constant and drops out.
    """
    heads = attn.num_heads
    q = _heads(attn.q_proj(q_tokens), heads)  # (B, H, T, d)
    b, _, t, d = q.shape
    c = k_image.shape[-1]
    w_k = attn.k_proj.weight.reshape(heads, d, c)
    g = (q @ w_k).reshape(b, heads * t, c) * (1.0 / math.sqrt(d))
    weights = torch.softmax(g @ k_image.transpose(1, 2), dim=-1)  # (B, H·T, N)
    pooled = (weights @ v_image).reshape(b, heads, t, c)
    out = pooled @ attn.v_proj.weight.reshape(heads, d, c).transpose(1, 2)  # (B, H, T, d)
    out = out.transpose(1, 2).reshape(b, t, heads * d) + attn.v_proj.bias
    return attn.out_proj(out)


def _softmax_over_axis2(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim=2, keepdim=True))
    return e / e.sum(dim=2, keepdim=True)


def token_to_cached_image(attn: nn.Module, q_tokens: torch.Tensor, k_heads: torch.Tensor,
                          v_heads: torch.Tensor) -> torch.Tensor:
    """`attn.attend` for T prompt-token queries against the image's cached key/value projections, stored split
    into heads by `DecoderImageSide`: k (1, H, d, N), v (1, H, N, d)."""
    heads = attn.num_heads
    q = _heads(attn.q_proj(q_tokens), heads)  # (B, H, T, d)
    b, _, t, d = q.shape
    weights = torch.softmax((q * (1.0 / math.sqrt(d))) @ k_heads, dim=-1)  # (B, H, T, N)
    out = weights @ v_heads  # (B, H, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, heads * d))


def image_to_token(attn: nn.Module, q_image: torch.Tensor | None, k_tokens: torch.Tensor,
                   v_tokens: torch.Tensor, q_projected: torch.Tensor | None = None) -> torch.Tensor:
    """`attn(q_image, k_tokens, v_tokens)` for N image queries against T prompt tokens, with the query
    projection folded into the tokens' keys ((x W_q + b_q)·k = x·(W_q k) + b_q·k) and the output projection
    into the tokens' values (Σ_h p_h v_h W_o,h), both as (N, C) × (C, H·T) products. `q_projected` (the
    cached q_proj of the first layer, split into heads (1, H, d, N)) replaces `q_image` and then only the
    output side is folded.
    """
    heads = attn.num_heads
    k = _heads(attn.k_proj(k_tokens), heads)  # (B, H, T, d)
    b, _, t, d = k.shape
    scale = 1.0 / math.sqrt(d)
    if q_projected is None:
        c = q_image.shape[-1]
        w_q = attn.q_proj.weight.reshape(heads, d, c)
        folded = (w_q.transpose(1, 2) @ k.transpose(2, 3)) * scale  # (B, H, C, T)
        folded = folded.permute(0, 2, 1, 3).reshape(b, c, heads * t)
        offset = (k @ attn.q_proj.bias.reshape(heads, d, 1)).reshape(b, 1, heads * t) * scale
        scores = folded.transpose(1, 2) @ q_image.transpose(1, 2) + offset.transpose(1, 2)  # (B, H·T, N)
    else:  # the cached queries, split into heads (1, H, d, N): per-head scores (B, H, T, N)
        scores = ((k * scale) @ q_projected).reshape(b, heads * t, -1)
    # scores are laid out (B, H·T, N) and the softmax over a head's T tokens is written out along axis 2:
    # every step then runs over N-long rows (PyTorch's softmax over a last axis of T ≈ 7 is several times
    # slower, and ONNX Runtime's over a middle axis transposes twice)
    n = scores.shape[-1]
    weights = _softmax_over_axis2(scores.reshape(b, heads, t, n)).reshape(b, heads * t, n)
    v = _heads(attn.v_proj(v_tokens), heads)  # (B, H, T, d)
    c_out = attn.out_proj.weight.shape[0]
    w_o = attn.out_proj.weight.reshape(c_out, heads, d).permute(1, 2, 0)  # (H, d, C)
    # each head's weights sum to one, so the output bias rides along as bias/H added to every value row
    values = (v @ w_o).reshape(b, heads * t, c_out) + attn.out_proj.bias * (1.0 / heads)
    return weights.transpose(1, 2) @ values


def token_index(iou: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, 4) predicted IoUs and a (K,) token choice (indices, or BEST_MULTIMASK) → (B, K) token indices."""
    return torch.where(tokens < 0, best_multimask_token(iou, keepdim=True), tokens.unsqueeze(0))


def chosen_iou(iou: torch.Tensor, tokens) -> torch.Tensor:
    """IoU predictions (B, 4) of every token → those of the chosen tokens (B, K), as the graphs choose them."""
    return iou.gather(1, token_index(iou, torch.as_tensor(tokens, dtype=torch.int64, device=iou.device)))


def chosen_tokens(logits: torch.Tensor, iou: torch.Tensor, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, 4, s, s) and IoU (B, 4) of every token → those of the chosen tokens, (B, K, s, s), (B, K)."""
    if tuple(tokens) == tuple(range(logits.shape[1])):
        return logits, iou
    index = token_index(iou, torch.as_tensor(tokens, dtype=torch.int64, device=iou.device))
    picked = logits.gather(1, index[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))
    return picked, iou.gather(1, index)


class DecoderPromptSide(nn.Module):
    """(image-side tensors, sparse prompt embeddings (B, T, C), token choice (K,)) → logits (B, K, 4e, 4e)
    of the chosen mask tokens and the IoU predictions of all four (B, 4).

    Only the chosen tokens' masks are projected and laid out (the per-pixel features they share are computed
    once either way): a click answered with its best mask skips three quarters of that work.

    The cross-attentions run in the folded form of `token_to_image` / `image_to_token`: the same function
    with about half the arithmetic for prompts of up to a dozen points (float rounding differs).
    """

    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.decoder = model.mask_decoder
        self.upscale1 = PixelUpscale(model.mask_decoder.output_upscaling[0])
        self.upscale2 = PixelUpscale(model.mask_decoder.output_upscaling[3])
        self.embedding_size = model.config.embedding_size
        with torch.no_grad():
            pe = model.prompt_encoder.get_dense_pe()
        self.register_buffer("image_pe", pe.flatten(2).permute(0, 2, 1).contiguous(), persistent=False)

    def forward(self, keys0, k_t2i, v_t2i, q_i2t, sparse, mask_tokens: torch.Tensor):
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
        t2i = token_to_cached_image(layer.cross_attn_token_to_image, queries + query_pe, k_t2i, v_t2i)
        queries = layer.norm2(queries + t2i)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys = layer.norm4(keys0 + image_to_token(layer.cross_attn_image_to_token, None, q, queries,
                                                  q_projected=q_i2t))

        for later in transformer.layers[1:]:
            q = queries + query_pe
            queries = later.norm1(queries + later.self_attn(q, q, queries))
            q = queries + query_pe
            k = keys + self.image_pe
            queries = later.norm2(queries + token_to_image(later.cross_attn_token_to_image, q, k, keys))
            queries = later.norm3(queries + later.mlp(queries))
            q = queries + query_pe
            keys = later.norm4(keys + image_to_token(later.cross_attn_image_to_token, k, q, queries))
        q = queries + query_pe
        k = keys + self.image_pe
        queries = transformer.norm_final_attn(queries + token_to_image(transformer.final_attn_token_to_image,
                                                                       q, k, keys))

        mask_tokens_out = queries[:, 1 : 1 + dec.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )
        iou = dec.iou_prediction_head(queries[:, 0, :])
        index = token_index(iou, mask_tokens)
        hyper_in = hyper_in.gather(1, index.unsqueeze(-1).expand(-1, -1, hyper_in.shape[-1]))
        return self.upscale_and_project(keys, hyper_in), iou

    def upscale_and_project(self, keys: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """`output_upscaling` followed by the hypernetwork product, as matrix products.

        Both transposed convolutions have kernel 2 and stride 2, so their output windows do not overlap: each
        is a per-pixel linear map C → 4·C' (`PixelUpscale`). Computed in a blocked layout (pixel
        (4i+2a+c, 4j+2b+d) at index (i, j, a, b, c, d)) the only transposition left is on the final logits;
        PyTorch's and ONNX Runtime's ConvTranspose kernels are several times slower than the equivalent GEMM.
        """
        up = self.decoder.output_upscaling
        norm, act1, act2 = up[1], up[2], up[4]
        b, hw, _ = keys.shape
        e = self.embedding_size
        c1, c2 = self.upscale1.out_channels, self.upscale2.out_channels
        x = self.upscale1(keys).reshape(b, hw * 4, c1)
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        # (a 2-D product here would export as a Gemm with the bias fused, which ONNX Runtime runs slower)
        x = act2(self.upscale2(x)).reshape(b, hw * 16, c2)
        k = hyper_in.shape[1]
        if torch.onnx.is_in_onnx_export():
            # ONNX Runtime transposes the (K, 16·HW) product faster than the (16·HW, K) one;
            # PyTorch the other way round. Same values either way.
            masks = (hyper_in @ x.transpose(1, 2)).reshape(b, k, e, e, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        else:
            masks = (x @ hyper_in.transpose(1, 2)).reshape(b, e, e, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, k, 4 * e, 4 * e)


class PixelUpscale(nn.Module):
    """A `ConvTranspose2d` with kernel 2 and stride 2 as the per-pixel linear map C → 4·C' it is: the output
    pixel's offset inside its 2×2 window becomes part of the channel index, (..., C) → (..., 4·C').

    Its own module so that exported nodes carry its name: the int8 decoder quantizes `upscale1` alone (a
    quarter of a click's arithmetic, and the one product whose int8 form ONNX Runtime runs much faster).
    """

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if conv.kernel_size != (2, 2) or conv.stride != (2, 2):
            raise ValueError("PixelUpscale needs a transposed convolution with kernel 2 and stride 2")
        self.out_channels = conv.out_channels
        # weight (in, out, ka, kb) → (ka, kb, out) × in: the kernel offset leads the output channels. Laid out
        # once: the engines built on this module never change their weights.
        with torch.no_grad():
            weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * conv.out_channels, conv.in_channels)
            self.register_buffer("weight", weight.contiguous(), persistent=False)
            self.register_buffer("bias", conv.bias.repeat(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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
# floats), so large batches are memory-bound and pin memory (in ONNX Runtime's arena for the session's life).
# 4 per call keep everything mode's peak memory lower than 8 at the same speed on CPU (benchmarks/bench_core.py
# reports time and peak RSS; docs/runtime.md). A GPU runs each call as a few hundred small kernels whose launch
# cost does not grow with the batch: there a whole everything-mode batch (64 prompts, 0.5 GB at 1024 px in fp32)
# goes in one call.
PROMPT_CHUNK = 4
GPU_PROMPT_CHUNK = 64


def decode_in_chunks(decode_fn, point_coords, point_labels, boxes, mask_input, tokens,
                     chunk: int = PROMPT_CHUNK):
    """Run `decode_fn` over batch slices of at most `chunk` prompts and concatenate the results."""
    batch = next(t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None)
    if batch <= chunk:
        return decode_fn(point_coords, point_labels, boxes, mask_input, tokens)
    outs = []
    for start in range(0, batch, chunk):
        part = slice(start, start + chunk)
        outs.append(decode_fn(*(None if t is None else t[part] for t in (point_coords, point_labels, boxes,
                                                                          mask_input)), tokens))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
