"""The optimizer and the LR schedule of a run."""

from __future__ import annotations

import math

import torch
from torch import nn

from fusiontrain.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, fused (one kernel over all of them: on the CPU
    about 3x faster than foreach over 14M parameters, and HF's Trainer default since torch 2.8;
    ``device`` is where they live). Weight decay applies to matrices; vectors (norm scales,
    biases, gates) are not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable: set model.fusion_trainable (or another *_trainable) to true")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"fused AdamW runs on CUDA and CPU parameters; these train on {device.type}")
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps, fused=True
    )


def lr_multiplier(step: int, config: OptimConfig, max_steps: int) -> float:
    """LR at ``step`` as a fraction of ``optim.lr``: linear warmup, then constant, linear or
    cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    progress = min(1.0, progress)
    decay = 1.0 - progress if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then decay (:func:`lr_multiplier`), stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, max_steps))
