"""The recipe of the bundled `demo` model: a small TinySAM trained from scratch on the synthetic world.

`tinysam train-demo --out DIR` reproduces it (seeded; same numbers on any CPU with the same thread
count). The result is small enough to ship inside the package and good enough for tests to judge
masks, not only shapes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from ..models.config import DEMO, ModelConfig
from .supervised import SupervisedConfig, train_supervised, write_sidecar

DEMO_MODEL = DEMO  # the architecture lives with the other configs; the registry loads it from there


def demo_training_config(out_dir: str | Path, **overrides) -> SupervisedConfig:
    cfg = SupervisedConfig(
        model=json.loads(json.dumps(DEMO_MODEL.to_dict())),
        out_dir=str(out_dir),
        steps=1000,
        warm_steps=550,
        warm_size=128,
        warm_batch_images=8,
        attention_aux_weight=1.0,
        batch_images=4,
        prompts_per_image=6,
        box_fraction=0.4,
        background_fraction=0.05,
        refine_rounds=1,
        refine_fraction=0.4,
        lr=2e-3,
        warmup=30,
        weight_decay=0.01,
        seed=0,
        world_seed=0,
        checkpoint_every=50,
        log_every=10,
        threads=1,
    )
    return replace(cfg, **overrides)


def train_demo(out_dir: str | Path, install: bool = False, log=print, **overrides) -> Path:
    """Train the demo model into `out_dir` (resuming if interrupted); `install` copies it into the
    package weights as demo.pth with its config sidecar."""
    from .loop import distributed_from_env

    cfg = demo_training_config(out_dir, **overrides)
    world = distributed_from_env().world_size
    if world > 1:
        # the recipe's batch is per step, whatever the number of processes (torchrun) sharing it
        for name in ("batch_images", "warm_batch_images"):
            if getattr(cfg, name) % world:
                raise ValueError(f"{name}={getattr(cfg, name)} cannot be split over {world} processes")
        cfg = replace(cfg, batch_images=cfg.batch_images // world,
                      warm_batch_images=cfg.warm_batch_images // world)
    final = train_supervised(cfg, log=log)
    if install and distributed_from_env().is_main:
        from ..models.registry import PACKAGE_WEIGHTS

        dest = PACKAGE_WEIGHTS / "demo.pth"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, dest)
        write_sidecar(dest, ModelConfig.from_dict(cfg.model))
        log(f"installed {dest}")
        return dest
    return final
