"""The cluster's read-and-decode step, kept free of PyTorch: its processes never import it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tinysam_kit.data.images import load_image


def decode_rows(batch: dict, load: Callable[[str], np.ndarray] = load_image) -> dict:
    """CPU task: read and decode images into raw RGB bytes with `load`; an unreadable image (OSError,
    ValueError) carries its reason instead."""
    out = {"key": [], "source": [], "pixels": [], "height": [], "width": [], "error": []}
    for key, source in zip(batch["key"], batch["source"]):
        try:
            image = np.ascontiguousarray(load(str(source)), dtype=np.uint8)
            error = ""
        except (OSError, ValueError) as exc:
            image, error = np.zeros((0, 0, 3), np.uint8), f"{type(exc).__name__}: {exc}"
        out["key"].append(str(key))
        out["source"].append(str(source))
        out["pixels"].append(image.tobytes())
        out["height"].append(image.shape[0])
        out["width"].append(image.shape[1])
        out["error"].append(error)
    return out


class RowDecoder:
    """`decode_rows` in a long-lived process of Ray Data's actor pool. Short tasks would each need a worker
    process, and a node whose CPUs the model actors hold ends its idle workers within a second, so every image
    would pay a Python start-up beside the model."""

    def __init__(self, load: Callable[[str], np.ndarray] = load_image) -> None:
        self.load = load

    def __call__(self, batch: dict) -> dict:
        return decode_rows(batch, self.load)
