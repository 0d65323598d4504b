"""The training step and activation offloading on one CUDA GPU: ``python benchmarks/gpu_step_offload.py``.

An Mllama-shaped model (a 2048-wide, 8-layer text stack with 2 cross-attention layers; the tiny
ViT of the tests), FSDP2 over a world of one (nccl), bf16 compute, the whole model trainable, runs
:class:`fusiontrain.train.step.TrainStep` (pinned host micro-batches, one at a time on the device) for
3 steps per configuration. For each configuration it prints the CUDA allocator's peak during the
last step, the step time, the bytes offloaded, and whether the weights after the 3 steps are
bitwise equal to those of the same configuration without offloading.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusiontrain.config import OptimConfig  # noqa: E402
from fusiontrain.data import Batch  # noqa: E402
from fusiontrain.families.mllama.model import build_mllama  # noqa: E402
from fusiontrain.train.nonfinite import NonFiniteGuard  # noqa: E402
from fusiontrain.parallel.offload import ActivationOffloader  # noqa: E402
from fusiontrain.parallel.fsdp import canonical_parameters, parallelize  # noqa: E402
from fusiontrain.train.step import StepSettings, TrainStep, local_tensor  # noqa: E402
from benchmarks.models import IMAGE_TOKEN, VOCAB, random_pixels, tiny_mllama_args  # noqa: E402

CUDA = torch.cuda.is_available()  # without a GPU: a small smoke run of the same code on the CPU (gloo)
SEQ, ROWS, WIDTH = (4096, 1, 2048) if CUDA else (128, 1, 128)
CONFIGS = [  # (activation checkpointing, offloading, micro-batches per step)
    ("none", "none", 4),
    ("none", "all", 4),
    ("full", "none", 1),
    ("full", "none", 4),
    ("full", "checkpointed", 4),
]


def host_batches(count: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count):
        tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
        tokens[:, 0] = IMAGE_TOKEN
        labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
        pixels = random_pixels([[2]] * ROWS, seed=index)
        batches.append(
            Batch(
                tokens=tokens,
                labels=labels,
                input_pos=torch.arange(SEQ).expand(ROWS, SEQ).clone(),
                is_real=torch.ones(ROWS, SEQ, dtype=torch.bool),
                encoder_input=pixels,
                encoder_mask=torch.ones(ROWS, SEQ, 10, dtype=torch.bool),
            )
        )
    return batches


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run(mesh, checkpointing: str, offloading: str, micro_batches: int) -> dict:
    device = torch.device("cuda" if CUDA else "cpu")
    args = tiny_mllama_args(max_seq_len=SEQ)
    args = dataclasses.replace(
        args,
        text=dataclasses.replace(
            args.text, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_heads=16, num_kv_heads=8, head_dim=WIDTH // 16
        ),
        num_text_layers=10,
        cross_attention_layers=(3, 8),
    )
    with torch.device("meta"):
        model = build_mllama(args, decoder_trainable=True)
    offloader = ActivationOffloader(device, min_bytes=2**20 if CUDA else 0)
    parallelize(model, mesh, device, activation_checkpointing=checkpointing, activation_offloading=offloading, offloader=offloader)
    model.to_empty(device=device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in canonical_parameters(model).values():
            local = local_tensor(param)  # frozen parameters are plain over one rank
            local.copy_(torch.randn(local.shape, generator=generator) * 0.02)
    model.set_skip_output_projection(True)
    model.train()
    optim = OptimConfig(lr=1e-4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=optim.lr, fused=CUDA)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(
        model, optimizer, scheduler, NonFiniteGuard("stop", 1),
        StepSettings(ignore_index=-100, num_output_chunks=8, max_grad_norm=1.0, defer_gradient_sync=True, flex_attention=False),
        device=device, world_size=1, skip_reasons=(),
    )
    batches = host_batches(micro_batches)
    for index in range(3):
        if index == 2:
            synchronize()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            offloader.stats.offloaded_bytes = 0
            started = time.perf_counter()
        result = step(index, batches)
    synchronize()
    elapsed = time.perf_counter() - started
    weights = {name: local_tensor(p).detach().cpu().clone() for name, p in canonical_parameters(model).items()}
    return {
        "peak": torch.cuda.max_memory_allocated() if CUDA else 0,
        "time": elapsed,
        "offloaded": offloader.stats.offloaded_bytes,
        "loss": result.loss,
        "weights": weights,
    }


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    if CUDA:
        torch.cuda.set_device(0)
    mesh = init_device_mesh("cuda" if CUDA else "cpu", (1,), mesh_dim_names=("dp_shard",))
    name = torch.cuda.get_device_name() if CUDA else "CPU smoke run"
    print(f"torch {torch.__version__}, {name}; rows of {SEQ} tokens, width {WIDTH}; bf16 compute on CUDA")
    print(f"{'AC':>5} {'offloading':>13} {'micro':>5} {'peak GiB':>9} {'step s':>7} {'offloaded GiB':>14} {'loss':>9}  weights")
    baseline = {}
    for checkpointing, offloading, micro in CONFIGS:
        result = run(mesh, checkpointing, offloading, micro)
        key = (checkpointing, micro)
        if offloading == "none":
            baseline[key] = result["weights"]
            same = "reference"
        else:
            same = "bitwise equal" if all(torch.equal(result["weights"][n], w) for n, w in baseline[key].items()) else "DIFFER"
        print(
            f"{checkpointing:>5} {offloading:>13} {micro:>5} {result['peak'] / 2**30:9.2f} {result['time']:7.3f} "
            f"{result['offloaded'] / 2**30:14.2f} {result['loss']:9.4f}  {same}"
        )
        if CUDA:
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
