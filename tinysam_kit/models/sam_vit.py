"""SAM's plain-ViT image encoder (ViT-B/L/H), the teachers of TinySAM and MobileSAM.

Module names follow SAM's official checkpoints (`image_encoder.patch_embed.proj`, `.pos_embed`,
`.blocks.N.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,norm2,mlp.lin1,mlp.lin2}`,
`.neck.{0,1,2,3}`), so those files load strictly. Most blocks attend inside non-overlapping windows;
a few attend globally. Both add SAM's decomposed relative-position terms (separate height and width
tables) to the attention logits.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tinysam_kit.models.common import LayerNorm2d, MLPBlock
from tinysam_kit.models.config import ViTConfig

_LN_EPS = 1e-6  # SAM's blocks use eps 1e-6, not PyTorch's default


def relative_table(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """(q_size, k_size, C) embeddings of the offsets between query and key positions along one axis.

    A table trained for another length is resized linearly (as SAM does when the input size changes).
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q = torch.arange(q_size, device=table.device)[:, None] * q_scale
    k = torch.arange(k_size, device=table.device)[None, :] * k_scale
    offsets = (q - k) + (k_size - 1) * k_scale
    return table[offsets.long()]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # `grid` is the side of the token grid this block attends over (window or whole image)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh = relative_table(h, h, self.rel_pos_h)
        rw = relative_table(w, w, self.rel_pos_w)
        rq = q.reshape(b * heads, h, w, -1)
        bias_h = torch.einsum("nhwc,hkc->nhwk", rq, rh)
        bias_w = torch.einsum("nhwc,wkc->nhwk", rq, rw)
        attn = (attn.view(b * heads, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :])
        attn = attn.view(b * heads, h * w, h * w).softmax(dim=-1)
        out = (attn @ v).view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def to_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) → (B·nWindows, window, window, C), zero-padding H and W up to multiples of window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def from_windows(x: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    h, w = size
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w].contiguous()


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: int) -> None:
        super().__init__()
        self.window = window  # 0: global attention over the whole grid
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            h, w = x.shape[1:3]
            x, padded = to_windows(x, self.window)
            x = from_windows(self.attn(x), self.window, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # channels last, as the blocks expect


class ImageEncoderViT(nn.Module):
    def __init__(self, config: ViTConfig, out_chans: int = 256) -> None:
        super().__init__()
        self.img_size = config.img_size
        grid = config.img_size // config.patch_size
        self.embedding_size = grid
        self.patch_embed = PatchEmbed(config.patch_size, 3, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio,
                  0 if i in config.global_attn_indexes else config.window_size, grid)
            for i in range(config.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def infer_vit_config(state: dict[str, torch.Tensor]) -> ViTConfig:
    """ViT-B/L/H (or any other size) read off a SAM checkpoint's key names and shapes.

    Global-attention blocks are those whose relative-position tables span the whole token grid.
    """
    from tinysam_kit.models.errors import CheckpointError

    try:
        pos = state["image_encoder.pos_embed"]
        patch = state["image_encoder.patch_embed.proj.weight"].shape[-1]
        blocks = sorted({int(m.group(1)) for k in state
                         if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
        if not blocks:
            raise KeyError("image_encoder.blocks.0.*")
        grid, dim = pos.shape[1], pos.shape[-1]
        lengths = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in blocks]
        head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        mlp_hidden = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
        out_chans = state["image_encoder.neck.0.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"SAM ViT checkpoint lacks {exc.args[0]}") from exc
    global_len = 2 * grid - 1
    global_idx = tuple(i for i, n in zip(blocks, lengths) if n == global_len)
    windowed = [n for n in lengths if n != global_len]
    window = (windowed[0] + 1) // 2 if windowed else ViTConfig().window_size
    return ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=len(blocks),
                     num_heads=dim // head_dim, global_attn_indexes=global_idx, window_size=window,
                     mlp_ratio=mlp_hidden / dim, out_chans=out_chans)
