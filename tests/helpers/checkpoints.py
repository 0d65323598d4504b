"""Checkpoint folders written by hand, as the trainer's CheckpointManager writes them, for the
export and inference tests (one process, no training run)."""

from __future__ import annotations

from pathlib import Path

import torch

from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.parts import save_tensors

STEP = 7  # the step every hand-written checkpoint claims


@torch.no_grad()
def perturb(params: dict[str, torch.Tensor], seed: int) -> None:
    """Simulated training: move every parameter (gates included) by a visible amount."""
    generator = torch.Generator().manual_seed(seed)
    for param in params.values():
        param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))


def write_checkpoint(root: Path, parts: dict[str, dict[str, torch.Tensor]], base: dict, **extra) -> Path:
    """``root/checkpoints/step_7``: each of ``parts`` saved as its DCP part (safetensors), a token
    optimizer state, and the manifest (``base`` and ``extra`` fields)."""
    folder = layout.checkpoint_dir(root, STEP)
    folder.mkdir(parents=True)
    for part, tensors in parts.items():
        save_tensors({name: tensor.detach().clone() for name, tensor in tensors.items()}, layout.part_dir(folder, part))
    save_tensors({"state/step": torch.tensor(float(STEP))}, folder / "train_state" / "optimizer")
    layout.write_manifest(folder, layout.new_manifest(STEP, sorted(parts), base, **extra))
    return folder
