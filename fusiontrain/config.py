"""The training configuration: typed dataclasses, read from YAML plus ``dotted.key=value`` overrides.

Every field documents itself through ``metadata["help"]`` (``python -m fusiontrain train
--help-config`` prints them all). Reading is strict: an unknown key, a value of the wrong type or
a missing file raises :class:`ConfigError` with a one-line message that names the key and the fix.

Each part of the program receives only its own section (``cfg.optim`` to the optimizer builder,
``cfg.parallel`` to parallelize, ...), never the whole object.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fusiontrain.batch_layout import check_global_batch_without_world


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key and the fix."""


def _field(default: Any, help: str) -> Any:
    if (isinstance(default, type) and dataclasses.is_dataclass(default)) or default is dict:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ComposeConfig:
    decoder: str | None = _field(
        None, "HF causal LM folder (config.json + safetensors) of a registered decoder family: Llama, Qwen2 / Qwen2.5, Qwen3, Mistral."
    )
    encoder: str | None = _field(
        None,
        "HF vision model folder of a registered encoder family: CLIP, SigLIP (SigLIP2 fixed-resolution checkpoints are SigLIP), SigLIP2 NaFlex, DINOv2 (with or without registers).",
    )
    fusion_interval: int = _field(4, "Fuse a new cross-attention layer into every N-th decoder layer.")
    encoders: dict[str, str] = _field(
        dict,
        "Several encoders, one per modality, instead of `encoder`: {image: HF vision folder, audio: HF Whisper folder}. "
        "Each modality gets cross-attention layers of its own and a placeholder token <|modality|>.",
    )
    fusion_intervals: dict[str, int] = _field(
        dict, "With `encoders`: a modality's fusion interval, e.g. {audio: 8} (default: fusion_interval)."
    )
    fusion_offsets: dict[str, int] = _field(
        dict,
        "With `encoders`: the decoder layers a modality fuses are those with index % interval == offset, e.g. "
        "{audio: 1} (default: interval - 1, the last layer of each interval, as with one encoder).",
    )


@dataclass
class LoraConfig:
    rank: int = _field(0, "LoRA rank r of every adapted linear; 0 turns LoRA off (docs/lora.md).")
    alpha: float = _field(16.0, "LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = _field(0.0, "Dropout on the LoRA branch's input, in [0, 1).")
    sides: tuple[str, ...] = _field(
        ("decoder",), "Which pretrained side(s) get LoRA: a list of 'decoder' and/or 'encoder' (fusion layers never do)."
    )
    targets: tuple[str, ...] = _field(
        ("all-linear",),
        "Linears to adapt: [all-linear] (every attention and MLP projection of the chosen sides' transformer blocks, "
        "whatever the family calls them), or module names or name suffixes (PEFT's rule): ours for the decoder and "
        "the Mllama ViT (q_proj k_proj v_proj output_proj w1 w2 w3), the HF tower's for a composed encoder (e.g. "
        "q_proj out_proj fc1 fc2). A target may miss one chosen side; it is an error when it matches no linear on "
        "any, or when a chosen side gets none.",
    )
    init_from: str | None = _field(
        None,
        "A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for the same base to start from: "
        "its rank, alpha and targets replace the ones above, its weights (and its modules_to_save fusion weights) "
        "the fresh ones. Needs the [peft] extra.",
    )


@dataclass
class ModelConfig:
    hf_mllama: str | None = _field(None, "HF MllamaForConditionalGeneration folder (Llama 3.2 Vision).")
    compose: ComposeConfig = _field(ComposeConfig, "Build from a separate LLM and vision tower instead.")
    fusiontrain_export: str | None = _field(
        None, "Start from a fusiontrain-format export (python -m fusiontrain export --format fusiontrain)."
    )
    dtype: Literal["float32", "bfloat16"] = _field(
        "float32", "Dtype of the stored (master) parameters; compute dtype is parallel.mixed_precision."
    )
    frozen_dtype: Literal["float32", "bfloat16", "auto"] | None = _field(
        None,
        "Dtype of the stored frozen parameters (requires_grad false: the pretrained weights of a fusion-only run); "
        "trained ones (fusion parameters, LoRA adapters, a *_trainable side) keep model.dtype. null = model.dtype; "
        "'auto' = the compute dtype (bfloat16 under bf16 mixed precision, else model.dtype). bfloat16 halves the "
        "frozen shards; with bf16 compute the losses equal fp32 storage bitwise, with fp32 compute the frozen "
        "weights are rounded to bf16 once and cast up before each all-gather; model.dtype=bfloat16 with frozen_dtype=float32 is refused (docs/training.md: Frozen weights in bf16).",
    )
    fusion_init: str | None = _field(
        None,
        "A checkpoint folder (.../checkpoints/step_N) of another run whose fusion weights replace the fresh "
        "or pretrained ones at the start (not its optimizer or data position).",
    )
    decoder_trainable: bool = _field(False, "Train the pretrained decoder's parameters too.")
    encoder_trainable: bool = _field(
        False,
        "Train the pretrained encoder's parameters too, but those its family declares never trained (an encoder's "
        "frozen_params(): tower parts that do not feed its embeddings, such as a pooling head), which stay frozen.",
    )
    fusion_trainable: bool = _field(True, "Train the fusion parameters (cross-attention, projection head, new rows).")
    lora: LoraConfig = _field(LoraConfig, "LoRA adapters on the frozen pretrained linears, beside the fusion parameters.")


@dataclass
class ColumnsConfig:
    """Record fields of a conversation format (llava, sharegpt, cauldron), as LLaMA-Factory's
    ``columns``; null keeps the format's own names."""

    messages: str | None = _field(None, "Column of the turns (llava/sharegpt: conversations; cauldron: texts).")
    images: str | None = _field(None, "Column of the image references (llava: image; sharegpt/cauldron: images).")
    system: str | None = _field(None, "Column of a system prompt (llava/sharegpt: system).")


@dataclass
class TagsConfig:
    """Keys and role names inside a turn of a conversation format, as LLaMA-Factory's ``tags``;
    null keeps the format's own."""

    role_tag: str | None = _field(None, "A turn's key naming its speaker (llava: from; sharegpt: from or role).")
    content_tag: str | None = _field(None, "A turn's key holding its text (llava: value; sharegpt: value or content).")
    user_tag: str | None = _field(None, "The user's name (llava: human; sharegpt: human or user; cauldron: the exchange's key, user).")
    assistant_tag: str | None = _field(None, "The assistant's name (llava: gpt; sharegpt: gpt or assistant; cauldron: the exchange's key, assistant).")
    system_tag: str | None = _field(None, "A system turn's name (llava/sharegpt: system).")


@dataclass
class DataSplitConfig:
    path: str | None = _field(
        None,
        "Dataset file or folder (json/jsonl/parquet/imagefolder) or hub name; with data.streaming (train only) also "
        "webdataset .tar shards, a file or glob like /data/shards/*.tar.",
    )
    split: str = _field("train", "Split to read from a hub dataset (local files have only 'train').")
    subset: str | None = _field(
        None, "The hub dataset's configuration (its subset, e.g. 'ai2d' of HuggingFaceM4/the_cauldron); null: its default."
    )
    format: Literal["caption", "chat", "llava", "sharegpt", "cauldron"] | None = _field(
        None, "This source's record format; null: data.format."
    )
    columns: ColumnsConfig = _field(ColumnsConfig, "llava/sharegpt/cauldron: the record's field names, where they differ from the format's.")
    tags: TagsConfig = _field(TagsConfig, "llava/sharegpt/cauldron: the keys and role names inside a turn, where they differ.")
    placeholder: str | None = _field(
        None, "llava/sharegpt: the text that marks an image's position in a turn; null: '<image>'."
    )
    image_root: str | None = _field(
        None,
        "The folder relative image paths are relative to (LLaVA's image folder); null: the data file's folder.",
    )
    name: str | None = _field(
        None,
        "In a list of sources: the name its metrics are reported under; null: the file's stem or the hub name "
        "(with its subset).",
    )
    weight: float | None = _field(
        None,
        "In a list of training sources: its share of each epoch's samples, relative to the others' (set on every "
        "source or none; none: each source once per epoch); streamed, its probability of giving the next record. "
        "docs/data.md: Mixtures.",
    )


@dataclass
class DataConfig:
    train: DataSplitConfig | tuple[DataSplitConfig, ...] = _field(
        DataSplitConfig, "Training data: one source, or a list of sources mixed by their weights (docs/data.md: Mixtures)."
    )
    eval: DataSplitConfig | tuple[DataSplitConfig, ...] = _field(
        DataSplitConfig, "Held-out data for the periodic eval loss: one source, or a list, each reported under its name."
    )
    format: Literal["caption", "chat", "llava", "sharegpt", "cauldron", "synthetic"] = _field(
        "synthetic",
        "Sample format: 'caption' ({image, text}), 'chat' ({images, messages}), 'llava' ({image, conversations}), "
        "'sharegpt' ({conversations or messages, images}), 'cauldron' ({images, texts}) (docs/data.md: Formats), or "
        "'synthetic' (deterministic generated samples, no files). A source's own format (data.train.format) wins.",
    )
    train_on: Literal["assistant", "all"] = _field(
        "assistant", "Positions trained on: assistant turns (or the caption) only, or every text token."
    )
    too_long: Literal["skip", "truncate"] = _field(
        "skip", "A sample longer than batch.seq_len is skipped (counted) or truncated."
    )
    packing: bool = _field(
        True,
        "Pack samples into fixed batch.seq_len rows instead of padding. Rows are planned for the whole run from "
        "cached sample sizes, the same at any world size (see docs/data.md).",
    )
    padding_free: bool = _field(
        True,
        "Without packing, put each micro-batch's samples back to back in one row (own positions, attention segment "
        "and images each) instead of one padded row each: the same samples per step and the same loss, without "
        "the padding's compute (see docs/data.md).",
    )
    max_images_per_row: int = _field(4, "Image slots per packed row (samples that would exceed it go to another row).")
    packing_open_rows: int = _field(8, "Rows the first-fit packer keeps open (1 = greedy).")
    max_encoder_tokens_per_row: int | None = _field(
        None,
        "Encoder tokens a packed row may hold (variable-resolution encoders give each image its own count); "
        "null = max_images_per_row x the most tokens one image yields.",
    )
    max_items_per_row: dict[str, int] = _field(
        dict,
        "With model.compose.encoders: items of each modality beside images per row, e.g. {audio: 4} "
        "(default: max_images_per_row).",
    )
    max_item_tokens_per_row: dict[str, int] = _field(
        dict,
        "With model.compose.encoders: encoder tokens of each modality beside images per row, e.g. {audio: 3000} "
        "(default: its items per row x the most tokens one item yields).",
    )
    strict: bool = _field(False, "Stop at the first bad sample instead of skipping (and counting) it.")
    streaming: bool = _field(
        False,
        "Read data.train.path as a stream (datasets streaming=True; .tar globs are webdataset shards) instead of a "
        "map-style table: shards are split over ranks and workers, and the position resumes exactly at the same "
        "world size and data.num_workers only (docs/data.md: Streaming data). data.eval stays map-style.",
    )
    stream_split: Literal["shards", "examples"] = _field(
        "shards",
        "With data.streaming, how ranks divide the data: 'shards' (each rank reads its own shards; needs "
        "world x max(1, num_workers) shards at least) or 'examples' (every rank reads every shard and keeps every "
        "world-th record: even shares for any shard count, at world times the reading).",
    )
    num_workers: int = _field(1, "Dataloader worker processes per rank: samples and images are built there, off the training loop (0 = in the loop).")
    worker_start: Literal["forkserver", "spawn", "fork"] = _field(
        "forkserver",
        "How dataloader workers start: 'forkserver' (forked from a clean helper process that imports the data modules "
        "once), 'spawn' (a fresh interpreter each) or 'fork' (copies of the training process: the fastest start, "
        "but unsafe once its communication threads run). docs/data.md: Dataloader workers.",
    )
    log_sample_ids: bool = _field(
        False,
        "Append each micro-batch's sample ids (step, row within the step) to output_dir/sample_ids/rank_<r>.jsonl "
        "(for checking which samples a run saw).",
    )
    synthetic_samples: int = _field(512, "Number of samples in the synthetic training set.")
    synthetic_max_text: int = _field(24, "Longest synthetic text, in tokens.")
    synthetic_lengths: Literal["uniform", "fixed", "long_tail"] = _field(
        "uniform",
        "Synthetic mix: 'uniform' (one image, 4..max_text tokens), 'fixed' (one image, max_text tokens) "
        "or 'long_tail' (0-2 images, Pareto alpha 1.1 scale 24 text lengths capped at max_text); a model with an "
        "encoder per modality gets as many items of each other modality (one, or 0-2).",
    )


@dataclass
class BatchConfig:
    micro_batch_size: int = _field(
        2, "Rows per rank per forward/backward (without packing: samples, in one row when data.padding_free)."
    )
    grad_accum_steps: int = _field(
        1, "Micro-batches per optimizer step and rank; derived when global_batch_size is set."
    )
    global_batch_size: int | None = _field(
        None,
        "Rows per optimizer step over all ranks. Set it to keep each step's samples the same at any "
        "world size; then grad_accum_steps = global / (micro_batch_size * data-parallel ranks).",
    )
    seq_len: int = _field(256, "Tokens per row (packed or padded).")


@dataclass
class OptimConfig:
    lr: float = _field(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    betas: tuple[float, float] = _field((0.9, 0.95), "AdamW betas.")
    eps: float = _field(1e-8, "AdamW epsilon.")
    schedule: Literal["constant", "linear", "cosine"] = _field("cosine", "LR decay after warmup.")
    warmup_steps: int = _field(0, "Linear warmup steps from 0 to optim.lr.")
    min_lr_ratio: float = _field(0.0, "Final LR of linear/cosine decay, as a fraction of optim.lr.")
    max_grad_norm: float | None = _field(1.0, "Clip the global grad norm to this; null disables clipping.")


@dataclass
class ParallelConfig:
    dp_shard: int = _field(-1, "Ranks each parameter is sharded over (FSDP); -1 = all ranks left.")
    dp_replicate: int = _field(1, "Replica groups (HSDP); world = dp_replicate * dp_shard.")
    activation_checkpointing: str = _field(
        "none", "'none', 'full' (every layer), or an integer k (every k-th layer of each stack)."
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = _field(
        "auto", "Compute dtype of sharded layers: 'auto' is bf16 on CUDA with fp32 reduce, fp32 on CPU."
    )
    fusion_layer_sharding: Literal["unit", "split"] = _field(
        "split",
        "Shard each FusionLayer's two halves as separate FSDP units ('split': smaller all-gathers and a lower "
        "peak in benchmarks/memory.py; step time within 6% of 'unit' on CPU) or as one unit ('unit').",
    )
    defer_gradient_sync: bool = _field(
        True,
        "With gradient accumulation, reduce-scatter gradients only on the last micro-batch (less communication, "
        "but every rank holds the unsharded fp32 gradients of all trainable parameters until then; see `plan`).",
    )
    compile: bool = _field(
        False,
        "torch.compile (inductor) each block of every stack, after activation checkpointing and before FSDP2. Off by "
        "default: on the CPU it pays only in long runs (benchmarks/compile_cpu.py: decoder layers 0.64-0.89x and fusion "
        "layers 0.8-1.0x of eager CPU time, the vision tower about 1x, against 20-160 s of cold compiling per block "
        "kind and recompiles when shapes change), and tests and short runs would spend minutes compiling. Unmeasured "
        "on GPUs here. On the CPU the packed attention is a graph break.",
    )
    activation_offloading: Literal["none", "checkpointed", "all"] = _field(
        "none",
        "Move saved activations to (pinned) host memory during forward and back for backward: 'checkpointed' "
        "those of the activation-checkpointed blocks (their inputs), 'all' everything every block saves; "
        "parameters and tensors under 1 MiB stay. Copies run on a side stream on CUDA. `plan` shows the "
        "device memory it frees and the host memory it takes.",
    )


@dataclass
class DistributedConfig:
    timeout_s: float = _field(
        1800.0,
        "Seconds any collective may wait for the other ranks (init_process_group's timeout, gloo and nccl). A rank "
        "stuck or dead makes the others fail after this long with an error naming their rank and the operation, "
        "instead of hanging. Keep it above the longest rank-local pause (loading, checkpoint writes, first compile).",
    )


@dataclass
class LossConfig:
    num_output_chunks: int = _field(
        8,
        "Chunks of the output projection for the cross-entropy, over the target positions only (labels that are "
        "not ignore_index; 0 or 1 = all targets at once). A chunk has the rows k chunks give a micro-batch whose every "
        "slot is a target; one with fewer targets takes fewer chunks of that size.",
    )
    ignore_index: int = _field(-100, "Label value excluded from the loss (prompt and padding).")
    nonfinite: Literal["skip", "stop"] = _field(
        "skip",
        "A step whose global loss or grad norm is NaN/inf: 'skip' drops its gradients (weights and optimizer "
        "state untouched; it still counts as a step, so data position and LR schedule advance; counted in "
        "metrics.jsonl) or 'stop' raises at once. skip is the default: one bad batch or overflow costs one "
        "step instead of the job, while a diverged run still stops (loss.max_consecutive_nonfinite).",
    )
    max_consecutive_nonfinite: int = _field(
        3, "With loss.nonfinite=skip, the k-th non-finite step in a row stops the run (1 = like stop)."
    )


@dataclass
class CheckpointConfig:
    every_n_steps: int = _field(0, "Save a checkpoint every N steps and at the end (0 = never).")
    resume: str | None = _field(
        None,
        "'auto' (the newest intact checkpoint in output_dir, if any; damaged newer ones are skipped and logged) or a "
        "checkpoint path; null starts fresh.",
    )
    keep_last_n: int = _field(3, "Complete checkpoints to keep (0 = all); the newest intact one is never deleted.")
    async_save: bool = _field(False, "Write checkpoints in the background (dcp.async_save).")
    save_frozen: bool = _field(
        False, "Also write the frozen encoder / decoder weights (trainable ones are always written)."
    )
    allow_base_mismatch: bool = _field(
        False, "Resume even when the base weights' fingerprint differs from the checkpoint's."
    )


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = _field(
        "disabled", "wandb mode (rank 0 only); WANDB_MODE in the environment wins. metrics.jsonl is always written."
    )
    project: str = _field("fusiontrain", "wandb project.")


@dataclass
class LoggingConfig:
    every_n_steps: int = _field(1, "Print a console line from rank 0 every N steps.")
    wandb: WandbConfig = _field(WandbConfig, "Weights & Biases logging.")


@dataclass
class EvalConfig:
    every_n_steps: int = _field(0, "Compute the eval loss every N steps (0 = never).")
    num_samples: int = _field(32, "Held-out samples per evaluation, split over the ranks (same set at any world size).")


@dataclass
class PlanConfig:
    gpu: Literal["h100", "h200", "a100", "b200", "cpu"] | None = _field(
        None,
        "The device kind this config is written for (h100, h200, a100, b200, or cpu): `plan` and `train --dry-run` "
        "size the job for it when --gpu is not given and this machine has no GPU of those kinds. null: they ask "
        "for --gpu on such a machine.",
    )
    gpus: int | None = _field(
        None,
        "The devices this config is written for: `plan` and `train --dry-run` size the job for them when --gpus is "
        "not given and parallel.dp_replicate x dp_shard does not fix the world size (dp_shard: -1). When both are "
        "set they must agree. null: `plan` asks for --gpus.",
    )


@dataclass
class TrainConfig:
    output_dir: str = _field("outputs/run", "Where config.yaml, metrics.jsonl and checkpoints go.")
    seed: int = _field(0, "Seed for initialisation, data order and dropout.")
    max_steps: int = _field(100, "Optimizer steps of the run (the LR schedule spans them).")
    stop_after_steps: int | None = _field(
        None,
        "Stop once this many steps are done (checkpointing first when enabled), without changing the "
        "schedule; resume later with checkpoint.resume=auto. For jobs split over time slots.",
    )
    model: ModelConfig = _field(ModelConfig, "The model.")
    data: DataConfig = _field(DataConfig, "The data.")
    batch: BatchConfig = _field(BatchConfig, "Batch sizes.")
    optim: OptimConfig = _field(OptimConfig, "Optimizer and LR schedule.")
    parallel: ParallelConfig = _field(ParallelConfig, "Sharding, activation checkpointing, precision.")
    distributed: DistributedConfig = _field(DistributedConfig, "The process group.")
    loss: LossConfig = _field(LossConfig, "The loss.")
    checkpoint: CheckpointConfig = _field(CheckpointConfig, "Checkpointing and resume.")
    logging: LoggingConfig = _field(LoggingConfig, "Console and wandb logging.")
    eval: EvalConfig = _field(EvalConfig, "Periodic evaluation.")
    plan: PlanConfig = _field(PlanConfig, "What `plan` and `train --dry-run` size the job for by default.")


# -- reading ------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, build and validate a TrainConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with an existing YAML file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            first_line = str(error).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML ({first_line}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    config = _build(TrainConfig, raw, prefix="")
    validate(config)
    return config


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value (e.g. optim.lr=3e-4)")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # absent, or an empty section in the YAML
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{full}'; {hint}")
    values = {}
    for name, spec in known.items():
        if name not in raw:
            continue
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    """``value`` as type ``kind``, or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value if value is not None else {}, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        if isinstance(value, (list, tuple)):  # a list: its own option's error is the one to report
            options.sort(key=lambda option: typing.get_origin(option) is not tuple)
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, e.g. {{image: ..., audio: ...}}; got {value!r}")
        return {str(_coerce(args[0], k, key)): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, e.g. [q_proj, v_proj]; got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, e.g. [0.9, 0.95]; got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer; got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number; got {value!r}")
    if kind is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
    raise TypeError(f"unsupported config field type {kind!r} for {key}")  # a bug in this module


def _value_at(config: Any, dotted_key: str) -> Any:
    """The value of ``dotted_key`` (e.g. ``"model.compose.decoder"``) in a built config."""
    value = config
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def _validate_model_folders(config: TrainConfig, groups: list[tuple[str, ...]]) -> None:
    """Exactly one group of model keys is set, all of it, each key to an existing folder (or to a
    mapping of them, e.g. ``model.compose.encoders``; an empty mapping is unset)."""
    values = {key: _value_at(config, key) for group in groups for key in group}
    is_set = {key: bool(value) if isinstance(value, dict) else value is not None for key, value in values.items()}
    complete = [group for group in groups if all(is_set[key] for key in group)]
    set_keys = {key for key, on in is_set.items() if on}
    choices = ", or ".join(" + ".join(group) for group in groups)
    if len(complete) > 1 or (complete and not set_keys <= set(complete[0])):
        raise ConfigError(f"set exactly one of {choices}; set now: {sorted(set_keys)}")
    if not complete:
        for group in groups:  # the first group partly set names what it lacks
            if any(is_set[key] for key in group):
                missing = next(key for key in group if not is_set[key])
                others = [other for other in group if other != missing]
                raise ConfigError(f"config key '{missing}' is required with {others}; set it to a HF model folder")
        raise ConfigError(f"set exactly one of {choices}")
    for key in complete[0]:
        value = values[key]
        for name, folder in (value.items() if isinstance(value, dict) else [(None, value)]):
            where = key if name is None else f"{key}.{name}"
            if not Path(folder).is_dir():
                raise ConfigError(f"config key '{where}': folder {folder} does not exist; point it at a HF model folder")


MODALITY_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _validate_modalities(compose: ComposeConfig, data: DataConfig) -> None:
    """The per-modality keys (``model.compose``'s, the data's row limits) name modalities of
    ``model.compose.encoders``, with usable values; modality names are lower-case identifiers
    (``<|audio|>``)."""
    for name in compose.encoders:
        if not MODALITY_NAME.fullmatch(name):
            raise ConfigError(
                f"config key 'model.compose.encoders.{name}': a modality is a lower-case name such as image or audio"
            )
    for key in ("fusion_intervals", "fusion_offsets"):
        unknown = sorted(set(getattr(compose, key)) - set(compose.encoders))
        if unknown:
            raise ConfigError(
                f"config key 'model.compose.{key}' names {unknown}, which model.compose.encoders does not "
                f"({sorted(compose.encoders) or 'it is empty'})"
            )
    beside_images = sorted(set(compose.encoders) - {"image"})
    for key in ("max_items_per_row", "max_item_tokens_per_row"):
        values = getattr(data, key)
        unknown = sorted(set(values) - set(beside_images))
        if unknown:
            raise ConfigError(
                f"config key 'data.{key}' names {unknown}, which model.compose.encoders has not beside images "
                f"({beside_images or 'none'}; images take data.max_images_per_row)"
            )
        if any(value < 1 for value in values.values()):
            raise ConfigError(f"config key 'data.{key}' maps modalities to counts >= 1; got {values}")
    for name in compose.encoders:
        interval = compose.fusion_intervals.get(name, compose.fusion_interval)
        offset = compose.fusion_offsets.get(name, interval - 1)
        if interval < 1 or not 0 <= offset < interval:
            raise ConfigError(
                f"config keys 'model.compose.fusion_intervals.{name}'={interval} and 'model.compose.fusion_offsets.{name}'="
                f"{offset}: need an interval >= 1 and 0 <= offset < interval"
            )


def validate(config: TrainConfig) -> None:
    """Cross-field checks; raises ConfigError."""
    from fusiontrain.source.model_source import config_key_groups  # the families declare their keys

    model = config.model
    _validate_model_folders(config, config_key_groups())
    _validate_modalities(model.compose, config.data)
    if model.fusion_init is not None and not Path(model.fusion_init).is_dir():
        raise ConfigError(
            f"config key 'model.fusion_init': folder {model.fusion_init} does not exist; point it at a checkpoint folder"
        )
    _validate_lora(model)
    if model.frozen_dtype == "float32" and model.dtype == "bfloat16":
        raise ConfigError(
            "config keys 'model.frozen_dtype'=float32 and 'model.dtype'=bfloat16 store frozen weights wider than trained "
            "ones; drop model.frozen_dtype (it follows model.dtype), or set model.dtype=float32 with "
            "model.frozen_dtype=bfloat16"
        )
    _validate_sources(config.data)
    _validate_streaming(config.data)
    ac = config.parallel.activation_checkpointing
    if ac not in ("none", "full") and not (ac.isascii() and ac.isdecimal() and int(ac) >= 1):
        raise ConfigError(
            f"config key 'parallel.activation_checkpointing' must be 'none', 'full' or a positive integer k; got {ac!r}"
        )
    if config.parallel.activation_offloading == "checkpointed" and ac == "none":
        raise ConfigError(
            "config key 'parallel.activation_offloading' is 'checkpointed' but no block is checkpointed; "
            "set parallel.activation_checkpointing (e.g. full), or activation_offloading=all"
        )
    positive = {
        "max_steps": config.max_steps,
        "batch.micro_batch_size": config.batch.micro_batch_size,
        "batch.grad_accum_steps": config.batch.grad_accum_steps,
        "batch.seq_len": config.batch.seq_len,
        "parallel.dp_replicate": config.parallel.dp_replicate,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1; got {value}")
    if config.parallel.dp_shard == 0 or config.parallel.dp_shard < -1:
        raise ConfigError(f"config key 'parallel.dp_shard' must be -1 or >= 1; got {config.parallel.dp_shard}")
    try:
        check_global_batch_without_world(
            dp_replicate=config.parallel.dp_replicate,
            dp_shard=config.parallel.dp_shard,
            micro_batch_size=config.batch.micro_batch_size,
            global_batch_size=config.batch.global_batch_size,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _validate_plan(config)
    if config.checkpoint.every_n_steps < 0 or config.checkpoint.keep_last_n < 0:
        raise ConfigError("config keys 'checkpoint.every_n_steps' and 'checkpoint.keep_last_n' must be >= 0")
    optim = config.optim
    if not (math.isfinite(optim.lr) and optim.lr > 0):
        raise ConfigError(f"config key 'optim.lr' must be a finite number > 0; got {optim.lr}")
    if optim.max_grad_norm is not None and not (math.isfinite(optim.max_grad_norm) and optim.max_grad_norm > 0):
        raise ConfigError(
            f"config key 'optim.max_grad_norm' must be > 0, or null to disable clipping; got {optim.max_grad_norm}"
        )
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"config key 'optim.min_lr_ratio' must be in [0, 1]; got {optim.min_lr_ratio}")
    if optim.warmup_steps < 0:
        raise ConfigError(f"config key 'optim.warmup_steps' must be >= 0; got {optim.warmup_steps}")
    if config.loss.max_consecutive_nonfinite < 1:
        raise ConfigError(
            f"config key 'loss.max_consecutive_nonfinite' must be >= 1; got {config.loss.max_consecutive_nonfinite}"
        )
    timeout_s = config.distributed.timeout_s
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"config key 'distributed.timeout_s' must be a finite number of seconds > 0; got {timeout_s}")
    if config.loss.num_output_chunks < 0:
        raise ConfigError(f"config key 'loss.num_output_chunks' must be >= 0; got {config.loss.num_output_chunks}")


def _validate_plan(config: TrainConfig) -> None:
    """plan.gpus is a device count, and agrees with the mesh when the mesh fixes the world size."""
    gpus, parallel = config.plan.gpus, config.parallel
    if gpus is None:
        return
    if gpus < 1:
        raise ConfigError(f"config key 'plan.gpus' must be >= 1 (or null); got {gpus}")
    if parallel.dp_shard != -1 and parallel.dp_replicate * parallel.dp_shard != gpus:
        raise ConfigError(
            f"config key 'plan.gpus' ({gpus}) disagrees with parallel.dp_replicate x dp_shard "
            f"({parallel.dp_replicate} x {parallel.dp_shard} = {parallel.dp_replicate * parallel.dp_shard}); "
            "drop plan.gpus or make them agree"
        )


def _validate_lora(model: ModelConfig) -> None:
    """LoRA's numbers, sides and folder; LoRA beside full training of the same side is refused."""
    from fusiontrain.modules.lora import side_of  # the side names are the LoRA module's

    lora = model.lora
    if lora.init_from is not None and not Path(lora.init_from).is_dir():
        raise ConfigError(f"config key 'model.lora.init_from': folder {lora.init_from} does not exist; point it at a PEFT adapter folder")
    if lora.rank == 0 and lora.init_from is None:
        return
    if lora.rank < 0:
        raise ConfigError(f"config key 'model.lora.rank' must be >= 0 (0 = no LoRA); got {lora.rank}")
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise ConfigError(f"config key 'model.lora.alpha' must be a number > 0; got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"config key 'model.lora.dropout' must be in [0, 1); got {lora.dropout}")
    if not lora.sides or any(side_of(side) is None for side in lora.sides):
        raise ConfigError(
            "config key 'model.lora.sides' must list 'decoder' and/or 'encoder' (or encoder.<modality>: one encoder of "
            f"model.compose.encoders); got {list(lora.sides)}"
        )
    if not lora.targets:
        raise ConfigError("config key 'model.lora.targets' must name at least one linear (e.g. [q_proj, v_proj]) or be [all-linear]")
    if "all-linear" in lora.targets and len(lora.targets) > 1:
        raise ConfigError(f"config key 'model.lora.targets': all-linear takes every linear already; list it alone, not with {list(lora.targets)}")
    for side in lora.sides:
        base = side_of(side)
        if getattr(model, f"{base}_trainable"):
            raise ConfigError(
                f"config keys 'model.lora.sides' and 'model.{base}_trainable' both train the {base}: LoRA adapts a frozen "
                f"side; set model.{base}_trainable=false or drop {side!r} from model.lora.sides"
            )
        modality = side.partition(".")[2]
        if modality and modality not in model.compose.encoders:
            raise ConfigError(
                f"config key 'model.lora.sides' names {side!r}, but model.compose.encoders has no {modality!r} "
                f"({sorted(model.compose.encoders) or 'it is empty'})"
            )



_CONVERSATION_FORMATS = ("llava", "sharegpt", "cauldron")


def data_sources(data: DataConfig, split: str) -> tuple[DataSplitConfig, ...]:
    """The sources of ``split`` ("train" or "eval"), a list of one for a single source."""
    sources = getattr(data, split)
    return sources if isinstance(sources, tuple) else (sources,)


def source_key(data: DataConfig, split: str, index: int) -> str:
    """The config key of source ``index`` of ``split``, for messages: ``data.train`` for a single
    source, ``data.train[1]`` in a list."""
    return f"data.{split}" if not isinstance(getattr(data, split), tuple) else f"data.{split}[{index}]"


def source_name(source: DataSplitConfig) -> str:
    """The name a source's metrics go under: its ``name``, else the file's stem, else the hub
    name (its last part) with its subset."""
    if source.name:
        return source.name
    if source.path is None:
        return "synthetic"
    path = Path(source.path)
    if path.exists() or path.suffix:
        return path.stem if path.is_file() or path.suffix else path.name
    base = str(source.path).rstrip("/").rpartition("/")[2]
    return base if source.subset is None else f"{base}/{source.subset}"


def _validate_sources(data: DataConfig) -> None:
    """Each source's format resolves (its own, else data.format) to one its settings fit; a list
    has distinct names and weights on every source or none."""
    for split in ("train", "eval"):
        sources = data_sources(data, split)
        if not sources:
            raise ConfigError(f"config key 'data.{split}' is an empty list; give one source or more, or drop the key")
        for index, source in enumerate(sources):
            key = source_key(data, split, index)
            format = source.format or data.format
            if split == "train" and format != "synthetic" and source.path is None:
                raise ConfigError(f"config key '{key}.path' is required for format {format!r}")
            if format == "synthetic" and source.path is not None:
                raise ConfigError(
                    f"config key '{key}.path' is set but its format is synthetic (data.format, the default): set "
                    f"{key}.format or data.format to the records' format (caption, chat, llava, sharegpt, cauldron)"
                )
            if len(sources) > 1 and source.path is None:
                raise ConfigError(f"config key '{key}.path' is required: every source of a list reads data")
            mapped = [f"columns.{k}" for k, v in vars(source.columns).items() if v is not None]
            mapped += [f"tags.{k}" for k, v in vars(source.tags).items() if v is not None]
            mapped += ["placeholder"] if source.placeholder is not None else []
            if mapped and format not in _CONVERSATION_FORMATS:
                raise ConfigError(
                    f"config key '{key}.{mapped[0]}' maps a conversation format's fields, but the format is "
                    f"{format!r}; it applies to {', '.join(_CONVERSATION_FORMATS)}"
                )
            if source.placeholder == "":
                raise ConfigError(f"config key '{key}.placeholder' must be non-empty text, e.g. '<image>'")
            if source.weight is not None and not (source.weight > 0 and math.isfinite(source.weight)):
                raise ConfigError(f"config key '{key}.weight' must be a positive number; got {source.weight}")
            if source.weight is not None and split == "eval":
                raise ConfigError(f"config key '{key}.weight': eval sources are each evaluated whole; drop the weight")
        names = [source_name(source) for source in sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if len(sources) > 1 and repeated:
            raise ConfigError(
                f"config key 'data.{split}': two sources are named {repeated[0]!r}; give each a distinct 'name'"
            )
        weighted = [source.weight is not None for source in sources]
        if any(weighted) and not all(weighted):
            missing = source_key(data, split, weighted.index(False))
            raise ConfigError(f"config key '{missing}.weight' is missing: set a weight on every source of the list or on none")


def _validate_streaming(data: DataConfig) -> None:
    """Streaming needs real (not synthetic) train data; .tar shards are read only as a stream."""
    train = data_sources(data, "train")
    if data.streaming and (train[0].format or data.format) == "synthetic":
        raise ConfigError("config key 'data.streaming' needs real data: set data.format (caption, chat, ...) and data.train.path")
    for index, source in enumerate(train):
        if not data.streaming and str(source.path).lower().endswith(".tar"):
            key = source_key(data, "train", index)
            raise ConfigError(f"config key '{key}.path'={source.path} names .tar shards: set data.streaming=true to read them")
    for index, source in enumerate(data_sources(data, "eval")):
        if str(source.path).lower().endswith(".tar"):
            raise ConfigError(
                f"config key '{source_key(data, 'eval', index)}.path'={source.path} names .tar shards, but eval data is "
                "read map-style: give it a json/jsonl/parquet file, an imagefolder or a hub name"
            )


# -- writing and describing -----------------------------------------------------------------------


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists), ready for YAML or wandb."""

    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def section_type(kind: Any) -> type | None:
    """The section (dataclass) a field of type ``kind`` holds: the dataclass itself, or ``X`` of
    ``X | tuple[X, ...]`` (a section, or a list of them); None for a leaf."""
    if dataclasses.is_dataclass(kind):
        return kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        sections = [arg for arg in typing.get_args(kind) if dataclasses.is_dataclass(arg)]
        if len(sections) == 1:
            return sections[0]
    return None


def describe(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every leaf field, in declaration order (the keys of a
    section that may also be a list are described once, as the section's)."""
    rows = []
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        hints = typing.get_type_hints(cls)
        if section_type(hints[spec.name]) is not None:
            rows += describe(section_type(hints[spec.name]), prefix=f"{key}.")
        else:
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
            rows.append((key, json.dumps(default), spec.metadata["help"]))
    return rows
