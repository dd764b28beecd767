"""Shared training machinery: devices, mixed precision, DistributedDataParallel, schedules and
resumable training state. Supervised training and both distillation modes use it."""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


class TrainingError(ValueError):
    """A training run cannot start or continue as configured; the message says why."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def select_device(device: str = "auto") -> torch.device:
    from tinysam_kit.models.device import resolve_device

    return resolve_device(device)


@dataclass(frozen=True)
class Precision:
    """How a step runs: autocast dtype (None = fp32) and whether the loss is scaled (fp16 only)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def select_precision(device: torch.device, amp: str = "auto") -> Precision:
    """auto: fp16 autocast with loss scaling on CUDA (the papers' setting), fp32 on CPU (exact and
    deterministic). bf16 is allowed on both; fp16 on CPU is refused."""
    if amp not in ("auto", "off", "fp16", "bf16"):
        raise TrainingError(f"unknown amp mode {amp!r} (use auto, off, fp16 or bf16)")
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "off"
    if amp == "off":
        return Precision(device.type, None)
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 mixed precision needs a CUDA device; use --amp bf16 or off on CPU")
    return Precision(device.type, torch.float16 if amp == "fp16" else torch.bfloat16)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun launch (world_size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a per-step batch (every rank sees a disjoint part)."""
        return items[self.rank :: self.world_size]


def distributed_from_env(env: dict | None = None) -> DistributedContext:
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise TrainingError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistributedContext(rank, world, local)


def init_distributed(ctx: DistributedContext, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, Gloo on CPU) and pin this rank's GPU."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def wrap_ddp(module: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # decoder tokens unused by a step (e.g. no box prompts drawn) must not stall the gradient reduction
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def save_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, step: int, meta: dict) -> Path:
    """Everything needed to resume, as plain tensors/numbers/strings (loadable with weights_only=True),
    written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": int(step),
             "meta": meta}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, meta: dict) -> int:
    """Restore a run; refuses a state written by a run with different settings."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    saved = state.get("meta", {})
    diffs = [k for k in meta if k in saved and saved[k] != meta[k]]
    if diffs:
        k = diffs[0]
        raise TrainingError(f"cannot resume from {path}: it was written with {k}={saved[k]!r}, "
                            f"this run has {k}={meta[k]!r} (start a new output directory or match the settings)")
    unwrap(model).load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=1.0)
