"""LoRA + fusion training: fusiontrain against ``peft`` on transformers: ``python benchmarks/lora.py``.

One process, fp32, on the CPU. The benchmark Mllama (``benchmarks.models.bench_mllama_config``,
written to a temporary folder) trains LoRA on every self-attention and MLP linear of the decoder
(rank ``--rank``, alpha twice the rank) while its fusion parameters train in full, two ways on the
same batches:

(a) **peft on transformers**: ``MllamaForConditionalGeneration`` (SDPA) wrapped by
    ``peft.get_peft_model(LoraConfig(target_modules=..., modules_to_save=...))``, the targets and
    ``modules_to_save`` being exactly what fusiontrain's PEFT export names for this model (the
    cross-attention layers, the global vision layers, the projector and ``embed_tokens`` for its
    new rows); HF's own loss on full ``[b, s, v]`` logits.
(b) **fusiontrain**: the model built from the same folder, ``model.lora`` applied to the same
    linears, and the trainer's chunked loss (8 chunks; the output projection is frozen, so each
    chunk's gradient is taken in forward). The model is used as the Trainer builds it, without the
    process group (FSDP over a world of one adds no communication).

Both run the same loop: forward, backward, grad-norm clipping at 1.0, ``AdamW(foreach=True)``,
``zero_grad``, and they alternate step by step on the same batches, so that whatever else runs on
the machine slows both alike. Every row holds one image (one tile) followed by text, so no row
meets transformers#39379. The step-0 losses must agree to 1e-4 (the adapters start with B = 0),
and the losses of all later steps are printed side by side as a check of the training itself.

Reported per variant: trainable parameters, AdamW state bytes, the checkpoint a run writes of its
trained state (fusiontrain: the ``fusion`` + ``lora`` DCP parts; peft: ``adapter_model.safetensors``),
tokens/s of the median and of the fastest timed step (the first step is warm-up), the CPU use of
the timed steps (process CPU time over wall time x threads: well under 100% means the cores were
shared) and the step-0 loss.

Flags: ``--steps`` (default 6), ``--rank`` (default 16), ``--batch`` (default 4), ``--seq`` (default
256), ``--threads`` (default ``os.cpu_count()``), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.models import bench_mllama_config, mllama_pixel_inputs  # noqa: E402
from fusiontrain import tiny  # noqa: E402
from fusiontrain.checkpoint.parts import save_tensors  # noqa: E402
from fusiontrain.weights.peft import peft_layout  # noqa: E402
from fusiontrain.train.loss import chunked_cross_entropy_sum, count_targets  # noqa: E402
from fusiontrain.weights.lora import LoraSettings, add_lora, init_lora_params  # noqa: E402
from fusiontrain.families.mllama.model import encoder_mask_from_cross_attention_mask, prepare_mllama  # noqa: E402
from fusiontrain.modules import get_fusion_params  # noqa: E402
from fusiontrain.modules.lora import is_lora_parameter, select_lora_targets  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
NUM_CHUNKS = 8


def batches(config, *, steps: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """``steps + 1`` batches: every row one 1-tile image, its token first, then text."""
    vision = config.vision_config
    tokens_per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
    out = []
    for step in range(steps + 1):
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(4, config.text_config.vocab_size, (batch, seq), generator=generator)
        tokens[:, 0] = config.image_token_index
        pixels = mllama_pixel_inputs(config, batch_images=[[1]] * batch, seed=step)
        cross = torch.zeros(batch, seq, 1, vision.max_num_tiles, dtype=torch.long)
        cross[:, :, 0, 0] = 1
        labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)  # position i predicts token i + 1
        encoder_mask = encoder_mask_from_cross_attention_mask(cross, tokens_per_tile)
        out.append({"tokens": tokens, "labels": labels, "cross": cross, "encoder_mask": encoder_mask, **pixels})
    return out


class Variant:
    """One way of training: its step (forward + loss), its trainable parameters and AdamW, and
    what each timed step cost (wall seconds, and process CPU seconds over wall x threads)."""

    def __init__(self, step_fn, params: list[torch.nn.Parameter]) -> None:
        self.step_fn, self.params = step_fn, params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        self.losses: list[float] = []
        self.times: list[float] = []
        self.cpu_use: list[float] = []

    def step(self, batch: dict) -> None:
        """forward, backward, clipping at 1.0, AdamW, zero_grad; timed."""
        start, cpu = time.perf_counter(), time.process_time()
        loss = self.step_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        wall = time.perf_counter() - start
        self.times.append(wall)
        self.cpu_use.append((time.process_time() - cpu) / (wall * torch.get_num_threads()))
        self.losses.append(loss.item())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def fusiontrain_variant(folder: Path, rank: int) -> tuple[Variant, torch.nn.Module, list[str]]:
    """(b): the model as the Trainer builds it, ``model.lora`` on the decoder's linears."""
    from fusiontrain.weights.hf_checkpoint import materialize

    pretrained = prepare_mllama(folder)
    model = pretrained.model
    modules = select_lora_targets(model, sides=("decoder",), targets=TARGETS)
    add_lora(model, LoraSettings(rank, 2.0 * rank, 0.0, tuple(modules)))
    pretrained.fresh_parameters = {n for n, _ in model.named_parameters() if is_lora_parameter(n)}
    pretrained.init_fresh = lambda m: init_lora_params(m, seed=0)
    materialize(model, "cpu")
    pretrained.load()
    model.train().set_skip_output_projection(True)

    def step(batch: dict) -> torch.Tensor:
        pixels = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        hidden = model(batch["tokens"], encoder_input=pixels, encoder_mask=batch["encoder_mask"])
        total = chunked_cross_entropy_sum(hidden, batch["labels"], model.decoder.output, num_chunks=NUM_CHUNKS)
        return total / count_targets(batch["labels"])

    return Variant(step, [p for p in model.parameters() if p.requires_grad]), model, modules


def fusiontrain_checkpoint_bytes(model: torch.nn.Module, out: Path) -> int:
    """Bytes of the ``fusion`` and ``lora`` DCP parts a checkpoint holds of ``model``."""
    trained = dict(model.named_parameters())
    parts = {"fusion": get_fusion_params(model), "lora": {n: p for n, p in trained.items() if is_lora_parameter(n)}}
    for part, tensors in parts.items():
        save_tensors({n: t.detach() for n, t in tensors.items()}, out / part)
    return folder_bytes(out)


def peft_variant(folder: Path, rank: int, targets: list[str], to_save: list[str]) -> tuple[Variant, torch.nn.Module]:
    """(a): peft's LoRA on transformers' model, the same linears, the fusion modules saved whole."""
    sys.modules["torchao"] = None  # peft 0.21.2 refuses the torchao 0.15 of the [reference] extra
    from peft import LoraConfig, get_peft_model
    from transformers import MllamaForConditionalGeneration

    base = MllamaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=to_save))
    model.train()

    def step(batch: dict) -> torch.Tensor:
        pixels = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        return model(input_ids=batch["tokens"], **pixels, cross_attention_mask=batch["cross"], labels=batch["tokens"]).loss

    return Variant(step, [p for p in model.parameters() if p.requires_grad]), model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = bench_mllama_config()
        folder, _ = tiny.save_tiny_mllama(root / "bench_mllama", config=config, save_tokenizer=False)
        data = batches(config, steps=args.steps, batch=args.batch, seq=args.seq)
        ours, our_model, modules = fusiontrain_variant(folder, args.rank)
        layout = peft_layout(prepare_mllama(folder), hf_export=True, family_name="mllama")
        theirs, peft_model = peft_variant(folder, args.rank, [layout.linears[m] for m in modules], layout.modules_to_save)
        for batch in data:  # alternating, so that anything else on the machine slows both alike
            theirs.step(batch)
            ours.step(batch)
        sizes = {"peft": 0, "fusiontrain": fusiontrain_checkpoint_bytes(our_model, root / "ours")}
        peft_model.save_pretrained(str(root / "peft"))
        sizes["peft"] = (root / "peft" / "adapter_model.safetensors").stat().st_size
        base_bytes = folder_bytes(folder)

    tokens = args.batch * args.seq
    print(f"benchmark Mllama, LoRA rank {args.rank} (alpha {2 * args.rank}) on {len(modules)} decoder linears + fusion "
          f"in full; {args.batch} rows x {args.seq} tokens, fp32, {args.threads} threads, {args.steps} timed steps "
          "(after one warm-up), the two variants alternating step by step")
    print()
    print("| variant | trainable params | AdamW state | checkpoint of the trained state | tokens/s (median step) | "
          "tokens/s (fastest step) | CPU use | step-0 loss |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for name, key, variant in (("(a) peft on transformers", "peft", theirs), ("(b) fusiontrain", "fusiontrain", ours)):
        timed = variant.times[1:]
        results[key] = {
            "trainable": sum(p.numel() for p in variant.params),
            "optimizer_bytes": optimizer_bytes(variant.optimizer),
            "checkpoint_bytes": sizes[key],
            "median_tokens_per_s": tokens / statistics.median(timed),
            "best_tokens_per_s": tokens / min(timed),
            "cpu_use": statistics.mean(variant.cpu_use[1:]),
            "losses": variant.losses,
            "times": variant.times,
        }
    for name, key in (("(a) peft on transformers", "peft"), ("(b) fusiontrain", "fusiontrain")):
        r, ref = results[key], results["peft"]
        print(
            f"| {name} | {r['trainable'] / 1e6:.2f} M | {r['optimizer_bytes'] / 2**20:.1f} MiB | {r['checkpoint_bytes'] / 2**20:.1f} MiB | "
            f"{r['median_tokens_per_s']:.0f} ({r['median_tokens_per_s'] / ref['median_tokens_per_s']:.2f}x) | "
            f"{r['best_tokens_per_s']:.0f} ({r['best_tokens_per_s'] / ref['best_tokens_per_s']:.2f}x) | {r['cpu_use']:.0%} | "
            f"{r['losses'][0]:.6f} |"
        )
    print()
    print(f"the base model's safetensors: {base_bytes / 2**20:.1f} MiB (what a merged export writes)")
    drift = max(abs(a - b) for a, b in zip(results["peft"]["losses"], results["fusiontrain"]["losses"]))
    print(f"losses of the two over all {len(data)} steps differ by at most {drift:.1e}")
    agreement = abs(results["fusiontrain"]["losses"][0] - results["peft"]["losses"][0]) / abs(results["peft"]["losses"][0])
    print(f"step-0 losses agree to {agreement:.1e} (relative)")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "base_bytes": base_bytes}, indent=2))
    return 0 if agreement < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
