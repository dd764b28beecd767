"""Supervised SAM-style training on the synthetic world (teachers from scratch, and the demo model).

Each step draws fresh world images, one click or jittered box per sampled object (plus sometimes the
background region), optionally a corrective-click round fed with the previous mask, and minimises
focal + dice on the masks and MSE on the IoU head.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinysam_kit.data.synthetic import SyntheticWorld, WorldConfig
from tinysam_kit.models.checkpoint import save_checkpoint
from tinysam_kit.models.config import ModelConfig
from tinysam_kit.models.sam import TinySam, build_model
from tinysam_kit.training.batching import (
    decode_group,
    initial_groups,
    normalize_images,
    refinement_group,
    resize_targets,
    upsample,
)
from tinysam_kit.training.loop import (
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
    wrap_ddp,
)
from tinysam_kit.training.losses import prompt_loss

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
    # curriculum: the first `warm_steps` run on the world downscaled to `warm_size` (same weights; the
    # networks are resolution-agnostic), several times cheaper per image, to learn the task quickly
    warm_steps: int = 0
    warm_size: int = 128
    warm_batch_images: int | None = None
    # world settings of the warm phase, e.g. fewer objects: with one object per image a click's target
    # is visible from image features alone, which breaks the "predict nothing" plateau of a fresh model
    warm_world: dict = field(default_factory=dict)
    init_checkpoint: str | None = None  # start from these weights (flat checkpoint) instead of random
    # auxiliary supervision of the first decoder layer's cross-attention: image positions inside the
    # prompted object attend to the prompt tokens, and the prompt token attends to the object. A fresh
    # SAM decoder otherwise takes thousands of steps to discover where a click points to.
    attention_aux_weight: float = 0.0
    # BatchNorm: trained on 2–4 images per process, the convolutional stage comes to rely on per-batch
    # statistics, and in inference mode (running statistics, as every SAM runtime uses) a click's mean IoU
    # drops sharply (`tinysam evaluate-synthetic` measures it; docs/training.md). `recalibrate_batchnorm`
    # re-estimates the running statistics on that many world images before training; `frozen_batchnorm` then
    # trains with them fixed (inference-mode BatchNorm), so the weights adapt to the statistics the model is
    # used with.
    recalibrate_batchnorm: int = 0
    frozen_batchnorm: bool = False
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
                "refine_rounds", "refine_fraction", "loss_size", "warm_steps", "warm_size",
                "warm_batch_images", "warm_world", "init_checkpoint", "attention_aux_weight", "recalibrate_batchnorm",
                "frozen_batchnorm", "lr", "warmup",
                "weight_decay", "seed", "world_seed", "world")
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
    """Loss of one batch. `model` is an `_EncoderForward` (possibly DDP-wrapped): the whole step runs
    inside its forward so DDP sees every parameter the loss depends on."""
    size = images.shape[-1]
    loss_size = min(cfg.loss_size, size)

    def body(net: TinySam, embeddings: torch.Tensor):
        total = torch.zeros((), device=device)
        stats: dict[str, float] = {}
        counts: dict[str, int] = {}
        count = 0
        tap = AttentionTap(net) if cfg.attention_aux_weight > 0 else None
        for group in initial_groups(rng, targets, cfg.box_fraction, size):
            for round_ in range(1 + cfg.refine_rounds):
                g = group.to(device)
                with precision.autocast():
                    logits, iou = decode_group(net, embeddings, g)
                loss, s = prompt_loss(upsample(logits.float(), loss_size), iou.float(),
                                      resize_targets(g.targets, loss_size))
                if tap is not None and round_ == 0:
                    aux = tap.loss(net, g.targets, 1 if g.boxes is None else 2)
                    loss = loss + cfg.attention_aux_weight * aux
                    s["attn_aux"] = float(aux.detach())
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
        if tap is not None:
            tap.close()
        return total / max(1, count), {k: v / counts[k] for k, v in stats.items()}

    return model(images.to(device), body, precision)


class AttentionTap:
    """Reads the first two-way layer's cross-attention inputs (forward hooks) to supervise where the
    prompt tokens look: see `SupervisedConfig.attention_aux_weight`."""

    def __init__(self, net: TinySam) -> None:
        layer = net.mask_decoder.transformer.layers[0]
        self.inputs: dict[str, tuple] = {}
        self.handles = [
            layer.cross_attn_token_to_image.register_forward_hook(self._keep("tok2img")),
            layer.cross_attn_image_to_token.register_forward_hook(self._keep("img2tok")),
        ]

    def _keep(self, name: str):
        def hook(_module, inputs, _output):
            self.inputs[name] = inputs

        return hook

    @staticmethod
    def _probs(module, q_in: torch.Tensor, k_in: torch.Tensor) -> torch.Tensor:
        q = module.separate_heads(module.q_proj(q_in))
        k = module.separate_heads(module.k_proj(k_in))
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)

    def loss(self, net: TinySam, targets: torch.Tensor, n_prompt_tokens: int) -> torch.Tensor:
        layer = net.mask_decoder.transformer.layers[0]
        first = 1 + net.mask_decoder.num_mask_tokens  # IoU token and mask tokens come first
        e = net.config.embedding_size
        cover = F.adaptive_avg_pool2d(targets[:, None].float(), e).flatten(1)  # (P, e*e) in [0, 1]
        q_in, k_in, _ = self.inputs["img2tok"]
        to_prompt = self._probs(layer.cross_attn_image_to_token, q_in.float(), k_in.float())
        to_prompt = to_prompt[..., first:first + n_prompt_tokens].sum(-1).mean(1).clamp(1e-4, 1 - 1e-4)
        inside = F.binary_cross_entropy(to_prompt, cover)
        q_in, k_in, _ = self.inputs["tok2img"]
        looks = self._probs(layer.cross_attn_token_to_image, q_in.float(), k_in.float())
        looks = looks[:, :, first:first + n_prompt_tokens].mean((1, 2))  # (P, e*e), sums to 1
        where = cover / cover.sum(-1, keepdim=True).clamp(min=1e-6)
        gather = -(where * torch.log(looks + 1e-8)).sum(-1).mean() + (where * torch.log(where + 1e-8)).sum(-1).mean()
        return inside + gather

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _EncoderForward(torch.nn.Module):
    """The module DDP wraps: its forward runs a whole step (encoder, then `body` with the decoder), so
    the reducer sees every parameter the loss uses. One TinySam per training input size, all sharing
    the same parameters (DDP sees each shared parameter once)."""

    def __init__(self, models: dict[int, TinySam]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleDict({str(k): v for k, v in models.items()})

    def forward(self, images, body, precision):
        net = self.models[str(images.shape[-1])]
        with precision.autocast():
            embeddings = net.encode(images)
        return body(net, embeddings.float())


def tie_weights(target: TinySam, source: TinySam) -> TinySam:
    """Make `target` (same architecture, another input size) use `source`'s parameters and persistent
    buffers, so training either trains both."""
    persistent = set(source.state_dict())
    for name, param in source.named_parameters():
        module, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(module), leaf, param)
    for name, buf in source.named_buffers():
        if name in persistent:
            module, _, leaf = name.rpartition(".")
            target.get_submodule(module)._buffers[leaf] = buf
    return target


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
    model = build_model(model_config)
    if cfg.init_checkpoint:
        from tinysam_kit.models.checkpoint import load_weights, read_state_dict

        load_weights(model, read_state_dict(cfg.init_checkpoint), source=cfg.init_checkpoint)
    model = model.to(device).train()
    world = SyntheticWorld(cfg.world_seed, world_cfg)
    if cfg.frozen_batchnorm:
        for m in batchnorms(model):
            m.eval()
    nets = {model_config.img_size: model}
    if cfg.warm_steps > 0:
        if model_config.img_size % cfg.warm_size or cfg.warm_size % 16:
            raise TrainingError(f"warm_size {cfg.warm_size} must divide the input size {model_config.img_size} "
                                "and be a multiple of 16")
        warm_config = replace(model_config, encoder=replace(model_config.encoder, img_size=cfg.warm_size))
        nets[cfg.warm_size] = tie_weights(build_model(warm_config).to(device).train(), model)
    ddp = wrap_ddp(_EncoderForward(nets), ctx, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = precision.scaler()
    out = Path(cfg.out_dir)
    state_path = out / "train_state.pt"
    step = 0
    if resume and state_path.is_file():
        step = load_state(state_path, model=model, optimizer=optimizer, scaler=scaler, meta=cfg.resume_key())
        log(f"resumed from {state_path} at step {step}")
    elif cfg.recalibrate_batchnorm:  # a resumed run has the statistics in its state already
        recalibrate_batchnorm(model, world, cfg.recalibrate_batchnorm, device)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    # a different seed: warm-phase scenes are not the main phase's images at another size
    warm_world = SyntheticWorld(cfg.world_seed + 1, replace(world_cfg, **cfg.warm_world))
    start = time.time()
    bar = progress(cfg.steps, step, "train", ctx.is_main)
    window: dict[str, list[float]] = {}
    while step < cfg.steps:
        # everything random in a step derives from (seed, step): resuming reproduces the same run
        rng = np.random.default_rng([cfg.seed, step, ctx.rank])
        first, count = _image_range(cfg, step)
        indices = ctx.shard(list(range(first * ctx.world_size, (first + count) * ctx.world_size)))
        warm = step < cfg.warm_steps
        samples = (warm_world if warm else world).batch(indices)
        size = cfg.warm_size if warm else model_config.img_size
        if size != world_cfg.size:
            samples = [s.resized(size) for s in samples]
        images = normalize_images([s.image for s in samples], size)
        targets = [sample_targets(rng, s, cfg.prompts_per_image, cfg.background_fraction) for s in samples]
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        loss, stats = supervised_step(ddp, images, targets, rng, cfg, device, precision)
        stats["loss"] = float(loss.detach())
        for k, v in stats.items():  # logged as means over the logging interval (single steps are noisy)
            window.setdefault(k, []).append(v)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update(1)
        if ctx.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            msg = " ".join(f"{k}={np.mean(v):.4f}" for k, v in window.items())
            log(f"step {step}/{cfg.steps} {msg} ({time.time() - start:.0f}s)")
            window = {}
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


def batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recalibrate_batchnorm(model: TinySam, world: SyntheticWorld, images: int, device: torch.device,
                          batch: int = 8) -> None:
    """Replace the BatchNorm running statistics by their plain average over `images` world images: the last
    indices before the held-out range, which training runs (counting up from 0) do not reach."""
    bns = batchnorms(model)
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    size = model.config.img_size
    first = HELD_OUT_START - images
    with torch.no_grad():
        for start in range(first, first + images, batch):
            samples = world.batch(list(range(start, min(start + batch, first + images))))
            model.image_encoder(normalize_images([s.image for s in samples], size).to(device))
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)


def _image_range(cfg: SupervisedConfig, step: int) -> tuple[int, int]:
    """First world index and number of images of a step (per process)."""
    warm_batch = cfg.warm_batch_images or cfg.batch_images
    if step < cfg.warm_steps:
        return step * warm_batch, warm_batch
    return cfg.warm_steps * warm_batch + (step - cfg.warm_steps) * cfg.batch_images, cfg.batch_images


def write_sidecar(path: Path, config: ModelConfig) -> Path:
    """`<checkpoint>.json` carries what the weights cannot tell (input size, decoder heads)."""
    side = path.with_name(path.name + ".json")
    side.write_text(json.dumps({"config": config.to_dict()}, indent=2))
    return side
