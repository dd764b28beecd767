"""Training images (a folder of the user's images, or the synthetic world), the model-input transform,
and the on-disk cache of teacher image embeddings that makes decoupled distillation cheap."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from tinysam_kit.data.images import IMAGE_SUFFIXES, find_images
from tinysam_kit.data.preprocess import to_model_input  # noqa: F401 - training's input transform
from tinysam_kit.data.synthetic import SyntheticWorld


class ImageFolder:
    """Every image under `root` (recursively), in sorted order; item i is (stable key, RGB uint8 array)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.root}")
        self.paths = find_images(self.root)
        if not self.paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        from tinysam_kit.data.images import load_image

        return self.key(index), load_image(self.paths[index])


class WorldImages:
    """The first `count` images of a synthetic world, as a distillation image source."""

    def __init__(self, world: SyntheticWorld, count: int, start: int = 0) -> None:
        self.world, self.count, self.start = world, int(count), int(start)

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"world{self.world.seed}-{self.start + index}"

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        return self.key(index), self.world[self.start + index].image



class TeacherEmbeddingStore:
    """Teacher embeddings on disk (float16), one file per image, namespaced by the teacher's hash so a
    different teacher never reuses stale embeddings."""

    def __init__(self, root: str | os.PathLike, teacher_id: str) -> None:
        self.dir = Path(root) / teacher_id[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / (hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            return None
        return torch.load(p, map_location="cpu", weights_only=True).float()

    def put(self, key: str, embedding: torch.Tensor) -> None:
        p = self.path(key)
        tmp = p.with_name(p.name + ".tmp")
        torch.save(embedding.detach().to("cpu", torch.float16).clone(), tmp)
        os.replace(tmp, p)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Image indices of a step: epochs are seeded permutations, so the sequence depends only on
    (seed, step) and a resumed run continues exactly where it stopped."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        out.append(int(epoch_order(n, seed, epoch)[pos]))
    return out
