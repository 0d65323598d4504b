"""Run under torchrun with 2 ranks: save checkpoints while rank 1's directory listings miss files,
then resume, the ranks sharing the checksums.

``python checkpoint_ranks.py OUT_DIR``: a small FSDP-sharded model and its AdamW state are saved
synchronously (step 1) and asynchronously (step 2) by :class:`CheckpointManager`, with every
directory listing rank 1 makes under ``OUT_DIR`` (``os.listdir``, ``os.scandir``,
``Path.iterdir``) dropping every other entry: what an NFS client with stale attribute caches, or
an object-store mount, can show one node for a while. Then ``resume: auto`` picks the newest
checkpoint, each rank noting the files it checksummed. Rank 0 writes ``OUT_DIR/result.json``: each
checkpoint's manifest file list and ``verify_checkpoint``'s verdict (checksums read), the
checkpoint resolved, and the files each rank checksummed.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from fusiontrain.checkpoint.layout import CheckpointError, checkpoint_dir, verify_checkpoint
from fusiontrain.checkpoint import manager as checkpoint_manager
from fusiontrain.checkpoint.manager import CheckpointManager
from fusiontrain.checkpoint.optimizer_state import OptimizerState
from fusiontrain.parallel import distributed


def _lag(out: Path) -> None:
    """Make this process's listings of folders under ``out`` miss every other entry."""
    listdir, scandir, iterdir = os.listdir, os.scandir, pathlib.Path.iterdir

    def under(path: object) -> bool:
        return str(Path(os.fsdecode(path)).resolve()).startswith(str(out.resolve()))

    def lagging_listdir(path: object = ".") -> list:
        names = sorted(listdir(path))
        return names[::2] if under(path) else names

    def lagging_scandir(path: object = ".") -> object:
        entries = sorted(scandir(path), key=lambda entry: entry.name)
        return iter(entries[::2] if under(path) else entries)

    def lagging_iterdir(self: Path) -> object:
        entries = sorted(iterdir(self))
        return iter(entries[::2] if under(self) else entries)

    os.listdir, os.scandir, pathlib.Path.iterdir = lagging_listdir, lagging_scandir, lagging_iterdir


def main() -> None:
    out = Path(sys.argv[1])
    context = distributed.init_distributed(timeout_s=120)
    mesh = distributed.build_mesh(context, 1, -1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 64)).sum().backward()
    optimizer.step()
    if context.rank == 1:
        _lag(out)
    parts = {"fusion": {name: param.detach() for name, param in model.named_parameters()}}
    for step, asynchronous in ((1, False), (2, True)):
        manager = CheckpointManager(
            out, base={"family": "mllama", "folders": {"hf_mllama": "/base"}}, fingerprint={}, async_save=asynchronous
        )
        manager.save(step, model_parts=parts, optimizer=OptimizerState(model, optimizer), rank_state={"rank": context.rank},
                     global_state={"step": step})
        manager.close()
    hashed: list[str] = []
    original = checkpoint_manager.checksum

    def noted(path: Path) -> str:
        hashed.append(Path(path).relative_to(checkpoint_dir(out, 2)).as_posix())
        return original(path)

    checkpoint_manager.checksum = noted  # what this rank reads while resolving
    resolved = CheckpointManager(out, base={"family": "mllama", "folders": {"hf_mllama": "/base"}}, fingerprint={}).resolve("auto")
    checkpoint_manager.checksum = original
    every: list[list[str]] = [[], []]
    torch.distributed.all_gather_object(every, hashed)
    if context.rank == 0:
        result = {"resolved": str(resolved), "hashed": every}
        for step in (1, 2):
            folder = checkpoint_dir(out, step)
            manifest = json.loads((folder / "manifest.json").read_text())
            try:
                verify_checkpoint(folder)
                verdict = "intact"
            except CheckpointError as error:
                verdict = str(error)
            result[str(step)] = {"files": sorted(manifest["files"]), "verdict": verdict}
        (out / "result.json").write_text(json.dumps(result))
    distributed.shutdown()
    distributed.exit_promptly(0)


if __name__ == "__main__":
    main()
