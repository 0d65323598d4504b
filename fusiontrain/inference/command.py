"""The ``generate`` command: ``python -m fusiontrain generate --model DIR [--image PATH]
[--audio PATH] --prompt TEXT``, on :mod:`fusiontrain.inference.load` (loading, prompt inputs) and
:mod:`fusiontrain.inference.generation` (decoding)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from fusiontrain.checkpoint.layout import CheckpointError
from fusiontrain.inference.load import DTYPES, InferenceError, build_prompt_inputs, load_for_inference, open_images


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``generate`` command's options to ``parser``."""
    parser.add_argument(
        "--model",
        required=True,
        help="a HF Mllama folder, a fusiontrain export, a training checkpoint (.../checkpoints/step_N) or a run's "
        "output_dir (its latest checkpoint)",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="a PEFT LoRA adapter folder (python -m fusiontrain export --format peft) to apply on the HF base --model",
    )
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several images"
    )
    parser.add_argument(
        "--audio", action="append", default=[], metavar="PATH",
        help="an audio file, for a model with an audio encoder (model.compose.encoders); repeat for several clips",
    )
    parser.add_argument("--prompt", required=True, help="the user's text, after the images and clips")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: top-p sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus size for sampling (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="parameter dtype (default: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load a checkpoint even if its base files changed since training",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog="python -m fusiontrain generate",
            description="Continue a user turn (images, then a prompt) with a model folder, an export or a checkpoint; "
            "prints the reply.",
        )
    )


def _check_numbers(args: argparse.Namespace) -> str | None:
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if not args.temperature >= 0.0:
        return f"--temperature must be >= 0, got {args.temperature}"
    if not 0.0 < args.top_p <= 1.0:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    return None


def run(args: argparse.Namespace) -> int:
    """Handler of ``generate`` for parsed arguments; 0 on success, 2 with a one-line error."""
    from fusiontrain.inference.generation import generate

    problem = _check_numbers(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        print(f"error: --device: {error}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    try:
        pictures = open_images(args.image)  # before the (slow) model load
        loaded = load_for_inference(
            args.model, dtype=dtype, device=device, allow_base_mismatch=args.allow_base_mismatch, adapter=args.adapter
        )
        tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, pictures, args.prompt, args.audio)
        if tokens.shape[1] + args.max_new_tokens > loaded.max_seq_len:
            raise InferenceError(
                f"{tokens.shape[1]} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                f"{loaded.max_seq_len} positions"
            )
    except (InferenceError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=device).manual_seed(args.seed)
    output = generate(
        loaded.model,
        tokens,
        max_new_tokens=args.max_new_tokens,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        stop_token_ids=loaded.stop_token_ids(),
        temperature=args.temperature,
        top_p=args.top_p,
        generator=generator,
    )
    print(loaded.tokenizer.decode(output[0, tokens.shape[1] :].tolist(), skip_special_tokens=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fusiontrain generate --model DIR --image PATH [--image PATH2] --prompt TEXT
    [--max-new-tokens 64] [--temperature 0] [--top-p 1.0] [--seed 0] [--dtype fp32|bf16]``."""
    return run(build_parser().parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
