"""The model's input: long side resized to the input size (Pillow's antialiased bilinear, bit-exact with the
official code), SAM's pixel normalisation, zero padding to the square. One transform for the predictor,
training and int8 calibration."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_model_input(image: np.ndarray, img_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 (H, W, 3) → (1, 3, S, S) normalised float32 input and the resized (h, w)."""
    h, w = image.shape[:2]
    nh, nw = resized_shape(h, w, img_size)
    if (nh, nw) != (h, w):
        image = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    x = torch.from_numpy(np.array(image, dtype=np.float32))
    x = (x - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    x = x.permute(2, 0, 1)[None]
    x = torch.nn.functional.pad(x, (0, img_size - nw, 0, img_size - nh))
    return x, (nh, nw)
