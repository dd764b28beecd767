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

from tinysam_kit.models.config import DEMO
from tinysam_kit.training.supervised import SupervisedConfig, train_supervised, write_sidecar

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


def demo_batchnorm_config(out_dir: str | Path, init_checkpoint: str | Path, **overrides) -> SupervisedConfig:
    """Stage 2: BatchNorm statistics re-estimated over 256 images, then training at 256 px with them frozen,
    so the weights work with the running statistics every runtime uses (see
    `SupervisedConfig.frozen_batchnorm`)."""
    cfg = replace(demo_training_config(out_dir), steps=1800, warm_steps=0, lr=1e-3, warmup=10, seed=2,
                  init_checkpoint=str(init_checkpoint), recalibrate_batchnorm=256, frozen_batchnorm=True)
    return replace(cfg, **overrides)


def _split_batches(cfg: SupervisedConfig, world: int) -> SupervisedConfig:
    """The recipe's batch is per step, whatever the number of processes (torchrun) sharing it."""
    if world == 1:
        return cfg
    for name in ("batch_images", "warm_batch_images"):
        if getattr(cfg, name) % world:
            raise ValueError(f"{name}={getattr(cfg, name)} cannot be split over {world} processes")
    return replace(cfg, batch_images=cfg.batch_images // world, warm_batch_images=cfg.warm_batch_images // world)


def train_demo(out_dir: str | Path, install: bool = False, log=print, stages: int = 2, **overrides) -> Path:
    """Train the demo model into `out_dir`/stage1 and /stage2 (each resumes if interrupted); `install`
    copies the result into the package weights as demo.pth with its config sidecar."""
    import torch.distributed as dist

    from tinysam_kit.training.loop import distributed_from_env

    ctx = distributed_from_env()
    out_dir = Path(out_dir)
    final = train_supervised(_split_batches(demo_training_config(out_dir / "stage1", **overrides),
                                            ctx.world_size), log=log)
    later = {k: v for k, v in overrides.items() if k in ("device", "threads", "amp")}
    if stages >= 2:
        if dist.is_initialized():
            dist.barrier()  # every rank starts stage 2 from the file rank 0 has just written
        final = train_supervised(_split_batches(demo_batchnorm_config(out_dir / "stage2", final, **later),
                                                ctx.world_size), log=log)
    if install and ctx.is_main:
        from tinysam_kit.models.registry import PACKAGE_WEIGHTS

        dest = PACKAGE_WEIGHTS / "demo.pth"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, dest)
        write_sidecar(dest, DEMO_MODEL)
        log(f"installed {dest}")
        return dest
    return final
