"""A stand-in for trained TinySAM weights in latency benchmarks (no pretrained weights exist offline).

A click on a cached image costs TinySAM's decoder — the same arithmetic whatever its weights — plus turning
the mask into the answer (upsampling, brush RLE, JSON), which depends on the mask's shape. Random weights
make ragged masks (runs by the hundred thousand on a photo, megabyte answers); trained ones make compact masks
(few runs). This proxy has TinySAM's decoder configuration exactly (256 wide, 8 heads, 2048-wide MLPs)
and compact, prompt-dependent masks:

* encoder: the bundled demo model's TinyViT body (dims 16/48/96/128) with a new 256-channel neck;
* decoder: fresh, TinySAM's configuration;
* training, with the demo recipe's second-stage settings (frozen BatchNorm, attention auxiliary loss): 800 steps
  on the synthetic world at 256 px (lr 1e-3), then 100 steps at **1024 px** (2 images per step, lr 3e-4), the
  input size it is registered at, where the decoder runs on TinySAM's tensor shapes (64×64 embedding, 256×256
  masks). Every layer is resolution-agnostic; the short second stage is what makes its masks compact at 1024 px
  (after the first stage alone they break into many connected parts spread over the image).

Its masks are compact like a trained model's, not good segmentations; use it for timing, never for quality.
Training takes tens of minutes on a 2-core CPU; the result is cached in the weights cache. Build it ahead with

    torchrun --standalone --nproc_per_node 2 benchmarks/latency_proxy.py      # or: python benchmarks/latency_proxy.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (steps, input size, images per step, learning rate) of the two stages
STAGES = ((800, 256, 4, 1e-3), (100, 1024, 2, 3e-4))
TRAIN_SIZE, RUN_SIZE = STAGES[0][1], STAGES[-1][1]


def proxy_config(img_size: int):
    from dataclasses import replace

    from tinysam_kit.models.config import DEMO, TINYSAM_VIT_T, ModelConfig

    return ModelConfig(encoder=replace(DEMO.encoder, img_size=img_size), decoder=TINYSAM_VIT_T.decoder)


def proxy_path() -> Path:
    from tinysam_kit.models.registry import cache_dir

    return cache_dir() / "bench" / "tinysam_latency_proxy.pth"


def initial_checkpoint(path: Path) -> Path:
    """The demo encoder's body (neck excepted: it changes width) in a fresh model of the proxy's shape."""
    import torch

    from tinysam_kit.models.checkpoint import read_state_dict, save_checkpoint
    from tinysam_kit.models.registry import MODELS, PACKAGE_WEIGHTS
    from tinysam_kit.models.sam import build_model

    cfg = proxy_config(TRAIN_SIZE)
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    demo = read_state_dict(PACKAGE_WEIGHTS / MODELS["demo"].filename)
    body = {k: v for k, v in demo.items()
            if k.startswith("image_encoder.") and not k.startswith("image_encoder.neck.")}
    state.update({k: v for k, v in body.items() if state[k].shape == v.shape})
    model.load_state_dict(state)
    save_checkpoint(model, path)
    path.with_name(path.name + ".json").write_text(json.dumps({"config": cfg.to_dict()}))
    return path


def latency_proxy_checkpoint(log=print) -> str:
    """Path of the proxy (registered at 1024 px), training it first if the cache does not hold it."""
    import torch.distributed as dist

    from tinysam_kit.data.synthetic import WorldConfig
    from tinysam_kit.training.demo import _split_batches, demo_batchnorm_config
    from tinysam_kit.training.loop import distributed_from_env
    from tinysam_kit.training.supervised import train_supervised

    final = proxy_path()
    if final.is_file():
        return str(final)
    work = final.parent / "latency_proxy_run"
    work.mkdir(parents=True, exist_ok=True)
    init = work / "init.pth"
    ctx = distributed_from_env()
    if not ctx.is_main:
        log = lambda message: None  # noqa: E731  (one process reports)
    if ctx.is_main and not init.is_file():
        initial_checkpoint(init)
    if ctx.world_size > 1:
        dist.barrier()
    trained = init
    for n, (steps, size, images, lr) in enumerate(STAGES):
        log(f"training the latency proxy, stage {n + 1}: {steps} steps at {size} px, into {work}")
        model = json.loads(json.dumps(proxy_config(size).to_dict()))  # plain JSON types, as a resume compares
        cfg = demo_batchnorm_config(work / f"stage{n + 1}", trained, steps=steps, lr=lr, warmup=10,
                                    recalibrate_batchnorm=0, model=model, batch_images=images,
                                    world=WorldConfig(size=size).to_dict(),
                                    threads=1 if ctx.world_size > 1 else 2)
        trained = train_supervised(_split_batches(cfg, ctx.world_size), log=log)
        if ctx.world_size > 1:
            dist.barrier()
    if ctx.is_main:
        shutil.copyfile(trained, final)
        final.with_name(final.name + ".json").write_text(json.dumps({"config": proxy_config(RUN_SIZE).to_dict()}))
    return str(final)


if __name__ == "__main__":
    print(latency_proxy_checkpoint())
