"""Supervised SAM-style training on the synthetic world (teachers from scratch, and the demo model).

Each step draws fresh world images, one click or jittered box per sampled object (plus sometimes the
background region), optionally a corrective-click round fed with the previous mask, and minimises
focal + dice on the masks and MSE on the IoU head.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import save_checkpoint
from ..models.config import ModelConfig
from ..models.sam import build_model
from .batching import decode_group, initial_groups, normalize_images, refinement_group, resize_targets, upsample
from .loop import (
    TrainingError,
    cosine_lr,
    distributed_from_env,
    init_distributed,
    load_state,
    progress,
    save_state,
    seed_everything,
    select_device,
    select_precision,
    set_lr,
    unwrap,
    wrap_ddp,
)
from .losses import prompt_loss
from .synthetic import SyntheticWorld, WorldConfig

HELD_OUT_START = 10_000_000  # world indices from here on are never drawn by training


@dataclass
class SupervisedConfig:
    model: dict
    out_dir: str
    steps: int = 1000
    batch_images: int = 4
    prompts_per_image: int = 6
    box_fraction: float = 0.4
    background_fraction: float = 0.05
    refine_rounds: int = 1
    refine_fraction: float = 0.5
    loss_size: int = 128  # masks are compared at this resolution (area-averaged targets)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    world_seed: int = 0
    world: dict = field(default_factory=lambda: WorldConfig().to_dict())
    device: str = "auto"
    amp: str = "auto"
    checkpoint_every: int = 200
    log_every: int = 20
    threads: int | None = None

    def resume_key(self) -> dict:
        """Settings that must match for a resumed run to continue the same trajectory."""
        keys = ("model", "steps", "batch_images", "prompts_per_image", "box_fraction", "background_fraction",
                "refine_rounds", "refine_fraction", "loss_size", "lr", "warmup", "weight_decay", "seed",
                "world_seed", "world")
        return json.loads(json.dumps({k: getattr(self, k) for k in keys}))


def sample_targets(rng: np.random.Generator, sample, k: int, background_fraction: float) -> list[np.ndarray]:
    n = len(sample.masks)
    chosen = [sample.masks[i] for i in rng.choice(n, size=min(k, n), replace=False)] if n else []
    bg = sample.background
    if rng.random() < background_fraction and bg.sum() > 0:
        chosen.append(bg)
    return chosen


def supervised_step(model, images: torch.Tensor, targets: list[list[np.ndarray]], rng: np.random.Generator,
                    cfg: SupervisedConfig, device: torch.device, precision) -> tuple[torch.Tensor, dict]:
    """Loss of one batch; `model` may be DDP-wrapped (its forward is the image encoder)."""
    net = unwrap(model)
    size = images.shape[-1]
    with precision.autocast():
        embeddings = model(images.to(device))
    total = torch.zeros((), device=device)
    stats: dict[str, float] = {}
    counts: dict[str, int] = {}
    count = 0
    for group in initial_groups(rng, targets, cfg.box_fraction, size):
        for round_ in range(1 + cfg.refine_rounds):
            g = group.to(device)
            with precision.autocast():
                logits, iou = decode_group(net, embeddings, g)
            loss, s = prompt_loss(upsample(logits.float(), cfg.loss_size), iou.float(),
                                  resize_targets(g.targets, cfg.loss_size))
            total = total + loss * len(g)
            count += len(g)
            for k, v in s.items():
                stats[f"{k}{round_}"] = stats.get(f"{k}{round_}", 0.0) + v * len(g)
                counts[f"{k}{round_}"] = counts.get(f"{k}{round_}", 0) + len(g)
            if round_ == cfg.refine_rounds:
                break
            group = refinement_group(rng, group, logits, iou, cfg.refine_fraction)
            if group is None:
                break
    stats = {k: v / counts[k] for k, v in stats.items()}
    return total / max(1, count), stats


class _EncoderForward(torch.nn.Module):
    """DDP needs one module whose forward starts the step; the decoder is reached through `.model`."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode(images)

    def decode(self, *args, **kwargs):
        return self.model.decode(*args, **kwargs)


def train_supervised(cfg: SupervisedConfig, resume: bool = True, log=print) -> Path:
    """Run (or continue) a supervised run; returns the path of the final flat checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_config = ModelConfig.from_dict(cfg.model)
    world_cfg = WorldConfig(**cfg.world)
    if world_cfg.size != model_config.img_size:
        raise TrainingError(f"world image size {world_cfg.size} must equal the model input size "
                            f"{model_config.img_size}")
    ctx = distributed_from_env()
    device = init_distributed(ctx, select_device(cfg.device))
    precision = select_precision(device, cfg.amp)
    seed_everything(cfg.seed)
    model = build_model(model_config).to(device).train()
    wrapper = _EncoderForward(model)
    ddp = wrap_ddp(wrapper, ctx, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = precision.scaler()
    out = Path(cfg.out_dir)
    state_path = out / "train_state.pt"
    step = 0
    if resume and state_path.is_file():
        step = load_state(state_path, model=model, optimizer=optimizer, scaler=scaler, meta=cfg.resume_key())
        log(f"resumed from {state_path} at step {step}")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    world = SyntheticWorld(cfg.world_seed, world_cfg)
    start = time.time()
    bar = progress(cfg.steps, step, "train", ctx.is_main)
    while step < cfg.steps:
        # everything random in a step derives from (seed, step): resuming reproduces the same run
        rng = np.random.default_rng([cfg.seed, step, ctx.rank])
        indices = ctx.shard(list(range(step * cfg.batch_images * ctx.world_size,
                                       (step + 1) * cfg.batch_images * ctx.world_size)))
        samples = world.batch(indices)
        images = normalize_images([s.image for s in samples], model_config.img_size)
        targets = [sample_targets(rng, s, cfg.prompts_per_image, cfg.background_fraction) for s in samples]
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        loss, stats = supervised_step(ddp, images, targets, rng, cfg, device, precision)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update(1)
        if ctx.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            msg = " ".join(f"{k}={v:.3f}" for k, v in stats.items())
            log(f"step {step}/{cfg.steps} loss={float(loss):.4f} {msg} ({time.time() - start:.0f}s)")
        if ctx.is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_state(state_path, model=model, optimizer=optimizer, scaler=scaler, step=step,
                       meta=cfg.resume_key())
    bar.close()
    final = out / "model.pth"
    if ctx.is_main:
        model.eval()
        save_checkpoint(model, final)
        write_sidecar(final, model_config)
    return final


def write_sidecar(path: Path, config: ModelConfig) -> Path:
    """`<checkpoint>.json` carries what the weights cannot tell (input size, decoder heads)."""
    side = path.with_name(path.name + ".json")
    side.write_text(json.dumps({"config": config.to_dict()}, indent=2))
    return side
