"""Command-line interface: ``python -m fusiontrain <command> [options]``.

Only the standard library is imported at module level; each command imports its heavy
dependencies (torch, transformers, ...) lazily inside its handler, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path
from collections.abc import Sequence
from typing import NoReturn


def _run_demo(args: argparse.Namespace) -> int:
    """Handler of ``demo``: runs :func:`fusiontrain.demo.main`, or with ``--audio-vision``
    :func:`fusiontrain.demo_audio_vision.main` (imported lazily)."""
    if args.audio_vision:
        from fusiontrain import demo_audio_vision as demo_module
    else:
        from fusiontrain import demo as demo_module

    if args.output_dir is None:
        args.output_dir = "demo_output/audio_vision" if args.audio_vision else "demo_output"
    result = demo_module.main(args)
    return int(result) if isinstance(result, int) else 0


def _run_train(args: argparse.Namespace) -> int:
    """Handler of ``train``: read the config, train, leave the process group."""
    from fusiontrain.config import ConfigError, describe, load_config

    if args.help_config:
        for key, default, help_text in describe():
            print(f"{key} = {default}\n    {help_text}")
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under a launcher, rank 0 plans for everyone
        # This launch's world under a launcher; outside one, what the config is written for, else 1.
        gpus = args.gpus or (int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None)
        return _print_plan(
            config, gpus=gpus, default_gpus=1, gpu=args.gpu, efficiency=args.efficiency, title=f"dry run of {args.config}"
        )
    from fusiontrain.train.preemption import PREEMPTED_EXIT_CODE, Preempted
    from fusiontrain.train.trainer import Trainer

    from fusiontrain.parallel import distributed

    try:
        trainer = Trainer(config)
    except Exception:
        distributed.leave_after_failure()
        _exit_with_traceback()
    code = 0
    try:
        trainer.run()
    except Preempted:
        code = PREEMPTED_EXIT_CODE  # checkpointed on every rank; `checkpoint.resume=auto` continues
    except BaseException:
        # No closing barrier after an error: the other ranks may be stuck or in another collective
        # (a barrier would only wait out distributed.timeout_s); leaving lets them fail at once.
        # (Trainer.run has already ended the dataloader workers.)
        distributed.leave_after_failure()
        trainer.close()
        if not isinstance(sys.exc_info()[1], Exception):
            raise  # KeyboardInterrupt, SystemExit: their own handling
        _exit_with_traceback()
    trainer.close()  # the closing barrier, then the group is destroyed
    distributed.exit_promptly(code)  # no interpreter teardown: see its docstring


def _exit_with_traceback() -> NoReturn:
    """Print the exception being handled as the interpreter would, and end the worker with exit
    code 1 without the interpreter's teardown (the abort that teardown now and then causes would
    turn a clear failure into exit -6; see ``distributed.exit_promptly``)."""
    from fusiontrain.parallel import distributed

    traceback.print_exc()
    distributed.exit_promptly(1)


def _print_plan(
    config: object,
    *,
    gpus: int | None,
    gpu: str | None,
    efficiency: float,
    title: str,
    as_json: bool = False,
    default_gpus: int | None = None,
) -> int:
    from fusiontrain.plan.planner import format_plan, plan_run, plan_to_dict, planned_hardware, planned_world_size

    try:
        hardware = planned_hardware(config, gpu)
        world_size = planned_world_size(config, gpus, default=default_gpus)
        plan = plan_run(config, gpus=world_size, hardware=hardware, efficiency=efficiency)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if as_json:
        import json

        print(json.dumps(plan_to_dict(plan), indent=2))
        return 0
    print(f"{title}: the model was built on the meta device and one training step traced on fake tensors")
    print(format_plan(plan))
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    """Handler of ``plan``: predict per-GPU memory and step time of a config (no GPU needed)."""
    from fusiontrain.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _print_plan(
        config, gpus=args.gpus, gpu=args.gpu, efficiency=args.efficiency, title=f"plan for {args.config}", as_json=args.json
    )


def _run_prepare(args: argparse.Namespace) -> int:
    """Handler of ``prepare``: measure the training samples' sizes and write the size cache."""
    from fusiontrain.config import ConfigError, load_config
    from fusiontrain.train.data import prepare_from_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(prepare_from_config(config))
    return 0


# The planner's device kinds, spelled out so that ``--help`` needs no torch (a test holds them equal
# to fusiontrain.plan.planner.GPUS plus "cpu", and to the choices of the config key plan.gpu).
PLAN_DEVICES = ("h100", "h200", "a100", "b200", "cpu")


def _add_plan_arguments(parser: argparse.ArgumentParser, *, dry_run: bool) -> None:
    under_launcher = "WORLD_SIZE under a launcher, else " if dry_run else ""
    otherwise = "1" if dry_run else "an error asking for --gpus"
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help=f"devices in the job (default: {under_launcher}parallel.dp_replicate x dp_shard when dp_shard is set, "
        f"else the config's plan.gpus, else {otherwise})",
    )
    parser.add_argument(
        "--gpu",
        choices=PLAN_DEVICES,
        help="device kind (default: this machine's GPU if it is one of these, else the config's plan.gpu, else an "
        "error asking for --gpu; 'cpu' plans for this machine's CPU)",
    )
    parser.add_argument(
        "--efficiency", type=float, default=0.5, help="fraction of the peak FLOP/s the kernels reach (time estimate)"
    )


# The exporter's choices, spelled out so that ``--help`` needs no torch (a test holds them equal to
# fusiontrain.checkpoint.export.FORMATS and DTYPES).
EXPORT_FORMATS = ("hf", "fusiontrain", "peft")
EXPORT_DTYPES = ("bf16", "fp32")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"`` (10**9 per GB, as transformers' ``max_shard_size``), ``"5GiB"``
    (2**30), ``"300KB"``, ``"1048576"``.

    Raises:
        ValueError: the text is no size, or not a positive one.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match or (match.group(3) and match.group(3).upper() not in ("B", "IB")) or (
            match.group(3).upper() == "IB" and not match.group(2)
        ):
            raise ValueError(f"cannot read size {text!r}; write it like 5GB, 500MB, 2GiB or a number of bytes")
        number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).upper()
        power = "KMGT".index(unit) + 1 if unit else 0
        value = int(number * ((1024 if suffix == "IB" else 1000) ** power))
    if value < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` command's options (see :func:`fusiontrain.checkpoint.export.export_checkpoint`)."""
    parser.add_argument("--checkpoint", required=True, help="training checkpoint folder (.../checkpoints/step_N)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="hf: what transformers' MllamaForConditionalGeneration loads (Mllama only; its default); "
        "fusiontrain: our own layout, read by fusiontrain.models.load_fusiontrain_export (the default for composed models); "
        "peft: a LoRA checkpoint's PEFT adapter folder for the transformers base, fusion weights as modules_to_save "
        "(Mllama; needs the [peft] extra). hf and fusiontrain merge LoRA into the base weights",
    )
    parser.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        default=None,
        help="cast every tensor to this dtype (default: keep the dtype the base stores each tensor in, so frozen "
        "tensors are bit-identical to the base; trained ones take their base tensor's dtype)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GiB", help="most bytes per safetensors file, e.g. 5GB, 2GiB, 500MB (default 5GiB)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument(
        "--verify-base",
        action="store_true",
        help="check the base files' sha256 against the checkpoint's fingerprint (default: sizes only)",
    )
    parser.add_argument(
        "--allow-base-mismatch", action="store_true", help="export even if the base files changed since training"
    )


def _run_export(args: argparse.Namespace) -> int:
    """Handler of ``export``: write the consolidated model folder; 0 on success, 2 with a one-line
    error."""
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as error:
        print(f"error: --max-shard-size: {error}", file=sys.stderr)
        return 2
    from fusiontrain.checkpoint.export import ExportError, export_checkpoint
    from fusiontrain.checkpoint.layout import CheckpointError

    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            format=args.format,
            dtype=args.dtype,
            max_shard_bytes=max_shard_bytes,
            force=args.force,
            verify_base=args.verify_base,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    except (CheckpointError, ExportError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    """Handler of ``verify``: check one checkpoint, or every ``step_<N>`` checkpoint of a run folder.
    Prints one line per checkpoint (intact, or what is wrong). Exit code 0 when every checkpoint
    is intact, 1 when any is damaged (or none is there), 2 when the path is neither a checkpoint
    nor a run folder."""
    from fusiontrain.checkpoint import layout
    from fusiontrain.checkpoint.manager import verify

    path = Path(args.path)
    if (path / layout.MANIFEST).exists() or layout.step_of(path) is not None or path.name.startswith(layout.TMP_PREFIX):
        folders = [path]
    elif (path / layout.CHECKPOINTS).is_dir():
        root = layout.checkpoints_root(path)
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(layout.TMP_PREFIX):
                print(f"{entry.name}: unfinished save (never resumed from; the next save removes it)")
        folders = [folder for _, folder in layout.list_step_folders(path)]
        if not folders:
            print(f"error: run folder {path} has no checkpoint under {layout.CHECKPOINTS}/", file=sys.stderr)
            return 1
    else:
        print(
            f"error: {path} is neither a checkpoint folder ({layout.MANIFEST}) nor a run folder ({layout.CHECKPOINTS}/)",
            file=sys.stderr,
        )
        return 2
    damaged = 0
    intact: list[Path] = []
    for folder in folders:
        try:
            manifest = verify(folder, checksums=not args.sizes_only, workers=args.workers)
        except layout.CheckpointError as error:
            damaged += 1
            print(f"{folder.name}: DAMAGED: {error}")
            continue
        intact.append(folder)
        files = manifest["files"]
        size = sum(entry["size"] for entry in files.values())
        checked = "sizes" if args.sizes_only else "sizes and sha256 checksums"
        print(f"{folder.name}: intact (step {manifest['step']}, {len(files)} files, {size / 2**20:.1f} MiB; {checked} match)")
    if len(folders) > 1:
        newest = f"newest intact: {intact[-1].name}" if intact else "no intact checkpoint"
        print(f"{len(intact)} of {len(folders)} checkpoints intact; {newest} (what checkpoint.resume=auto takes)")
    return 1 if damaged or not intact else 0


def _run_generate(args: argparse.Namespace) -> int:
    """Handler of ``generate``: its own parser lives with the inference code (imported lazily)."""
    from fusiontrain.inference.command import main as generate_main

    return generate_main(args.args)


def _run_make_tiny(args: argparse.Namespace) -> int:
    """Handler of ``make-tiny``: write tiny HF checkpoints for trying configs/tiny.yaml."""
    from fusiontrain import tiny

    out = Path(args.out)
    written = {
        "mllama": tiny.save_tiny_mllama(out / "tiny_mllama")[0],
        "llama": tiny.save_tiny_llama(out / "tiny_llama")[0],
        "clip": tiny.save_tiny_clip_vision(out / "tiny_clip")[0],
        "siglip": tiny.save_tiny_siglip_vision(out / "tiny_siglip")[0],
        "qwen3": tiny.save_tiny_qwen3(out / "tiny_qwen3")[0],
        "siglip2 naflex": tiny.save_tiny_siglip2_naflex(out / "tiny_siglip2_naflex")[0],
    }
    for family, path in written.items():
        print(f"{family}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m fusiontrain",
        description="Train deep-fusion multimodal models (vision encoder + decoder LLM) with FSDP2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo job on tiny, locally built models",
        description="Run the end-to-end demo job on tiny, locally built models.",
    )
    demo.add_argument(
        "--output-dir",
        default=None,
        help="where the demo writes its outputs (default: demo_output; demo_output/audio_vision with --audio-vision)",
    )
    demo.add_argument(
        "--audio-vision",
        action="store_true",
        help="run the demo of a model with two encoders instead: a tiny Llama with SigLIP and Whisper, captioning "
        "drawn shapes, synthesized clips and both",
    )
    demo.set_defaults(func=_run_demo)

    train = sub.add_parser(
        "train",
        help="train a deep-fusion model (under torchrun for several processes)",
        description="Train a deep-fusion model. Run under torchrun / accelerate / srun for several processes.",
    )
    train.add_argument("--config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model on the meta device, validate the config, print the plan (see `plan`) and exit",
    )
    _add_plan_arguments(train, dry_run=True)
    train.set_defaults(func=_run_train)

    plan = sub.add_parser(
        "plan",
        help="predict per-GPU memory and step time of a config, without GPUs or weights",
        description="Predict one GPU's peak memory (parameters, gradients, optimizer, FSDP buffers, activations "
        "under the configured checkpointing, loss chunk, encoder) and the step time of a config. Builds on the "
        "meta device from config.json files and traces one step on fake tensors.",
    )
    plan.add_argument("--config", required=True, help="YAML config file (see configs/)")
    plan.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    _add_plan_arguments(plan, dry_run=False)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (bytes and seconds)")
    plan.set_defaults(func=_run_plan)

    prepare = sub.add_parser(
        "prepare",
        help="measure every training sample's size once and cache it beside the data (train reads the cache)",
        description="Tokenize every training sample (decoding images only for variable-resolution encoders) and "
        "write the size table the row planner needs, beside the data (or in output_dir/sizes when the data folder "
        "is read-only or remote). A train run without it measures the sizes itself at start-up, split over its ranks.",
    )
    prepare.add_argument("--config", required=True, help="YAML config file (see configs/)")
    prepare.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    prepare.set_defaults(func=_run_prepare)

    export = sub.add_parser(
        "export",
        help="export a checkpoint as one consolidated model folder (HF Mllama or fusiontrain format)",
        description="Export a training checkpoint as one consolidated model folder (base and trained weights).",
    )
    _add_export_arguments(export)
    export.set_defaults(func=_run_export)

    verify_cmd = sub.add_parser(
        "verify",
        help="check a training checkpoint, or every checkpoint of a run folder, for damage",
        description="Check training checkpoints: only JSON and safetensors files (a pickle, e.g. an older layout's "
        "DCP .metadata, is refused unread), every file the manifest records present with its size and sha256 "
        "checksum, readable safetensors headers. Exit code 0: all intact; 1: any damaged, or none found; 2: the path "
        "is neither a checkpoint nor a run folder.",
    )
    verify_cmd.add_argument("path", help="a checkpoint folder (.../checkpoints/step_N) or a run's output_dir")
    verify_cmd.add_argument("--sizes-only", action="store_true", help="compare file sizes only (skip the checksums)")
    verify_cmd.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that read the checksums, one file each at a time (default: this machine's cores)",
    )
    verify_cmd.set_defaults(func=_run_verify)

    generate = sub.add_parser(
        "generate",
        add_help=False,
        prefix_chars="\0",  # pass every argument, --help included, to the generator's own parser
        help="continue a prompt about images with a HF Mllama folder, an export or a training checkpoint",
    )
    generate.add_argument("args", nargs=argparse.REMAINDER)
    generate.set_defaults(func=_run_generate)

    make_tiny = sub.add_parser(
        "make-tiny", help="write tiny HF checkpoints of every family the shipped configs use (Mllama, Llama, CLIP, SigLIP, Qwen3, SigLIP2 NaFlex)"
    )
    make_tiny.add_argument("--out", default="tiny_checkpoints", help="folder to write them into")
    make_tiny.set_defaults(func=_run_make_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command, return an exit code."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)

