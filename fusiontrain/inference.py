"""Generation from a model folder, an export or a training checkpoint: ``python -m fusiontrain generate``.

- :func:`load_for_inference` reads any of the folders fusiontrain makes or starts from:

  * a HF ``MllamaForConditionalGeneration`` folder (``config.json`` with model_type ``mllama``;
    the ``hf`` export is one);
  * a ``fusiontrain``-format export (``fusiontrain_config.json``; Mllama or composed);
  * a training checkpoint (``<output_dir>/checkpoints/step_<N>`` with ``manifest.json``): the model
    is rebuilt from the base folders the manifest names (a HF Mllama folder, a Llama + a CLIP /
    SigLIP folder, or the fusiontrain export the run started from), then every part the checkpoint
    holds is loaded over it with DCP (single process, no process group);
  * a run's ``output_dir`` (it has a ``checkpoints/`` folder): its latest complete checkpoint.

  The result, a :class:`LoadedModel`, carries the model and what builds its inputs: the tokenizer
  (and chat template) folder, the image processor folder, the :class:`ImageSpec`.
- :func:`build_prompt_inputs` turns images and a prompt into one user turn rendered with the
  model's chat template and the generation prompt (the assistant header), exactly as training
  renders conversations (:class:`~fusiontrain.data.formats.SampleBuilder`): same tokenization,
  same image processing, same image-token placement.
- :func:`main` is the ``generate`` command: it prints the continuation.

For Mllama, a token attends to the real tiles of the images it sees, not to their padding tiles,
as ``MllamaProcessor``'s ``cross_attention_mask`` says (and Meta's and torchtune's code do);
:func:`prompt_encoder_mask` builds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.layout import CheckpointError
from fusiontrain.data.batch import ImageSpec, stack_images
from fusiontrain.data.errors import BadSample

if TYPE_CHECKING:
    from PIL import Image

    from fusiontrain.data.formats import SampleBuilder
    from fusiontrain.modules import DeepFusionModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FOLDER_KINDS = ("hf", "export", "checkpoint")

# End-of-turn tokens of Llama 3 chat templates: a reply ends with one of them.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>")


class InferenceError(ValueError):
    """A model folder, prompt or image cannot be used as given; the message names it."""


# -- loading ----------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to generate, and what builds its inputs.

    Attributes:
        model: the model, in eval mode, nothing trainable.
        family: ``"mllama"`` or ``"composed"``.
        kind: what ``path`` was: ``"hf"``, ``"export"`` or ``"checkpoint"``.
        path: the folder the model came from (for a run folder, its latest checkpoint).
        text_dir: the folder with the tokenizer and chat template (Mllama: the whole processor).
        image_dir: the folder with the image processor (Mllama: ``text_dir``).
        spec: how the encoder takes one image.
        image_token_id: the id of the image token in the prompt.
        builder: renders and tokenizes prompts, and processes images (the training pipeline's).
    """

    model: DeepFusionModel
    family: str
    kind: str
    path: Path
    text_dir: Path
    image_dir: Path
    spec: ImageSpec
    image_token_id: int
    builder: SampleBuilder

    @property
    def tokenizer(self) -> Any:
        return self.builder.tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_seq_len(self) -> int:
        return int(self.model.decoder.max_seq_len)

    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply: ``eos_token_id`` of ``generation_config.json`` (an id or a
        list; Llama 3.2 Vision Instruct lists three), the tokenizer's EOS, and the Llama 3
        end-of-turn tokens the tokenizer has."""
        ids: set[int] = set()
        generation_config = self.text_dir / "generation_config.json"
        if generation_config.is_file():
            try:
                eos = json.loads(generation_config.read_text()).get("eos_token_id")
            except (OSError, ValueError):
                eos = None
            ids.update([eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)])
        tokenizer = self.tokenizer
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        ids.update(vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab)
        return tuple(sorted(ids))


def folder_kind(path: str | Path) -> tuple[str, Path]:
    """``(kind, folder)`` of a model folder: ``"checkpoint"`` (a ``manifest.json``; a run's
    ``output_dir`` resolves to its latest complete checkpoint), ``"export"``
    (``fusiontrain_config.json``) or ``"hf"`` (a HF Mllama ``config.json``).

    Raises:
        InferenceError: the folder does not exist, or is none of these.
    """
    folder = Path(path)
    if not folder.exists():
        raise InferenceError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise InferenceError(f"model {folder} is not a folder")
    if (folder / layout.MANIFEST).is_file():
        return "checkpoint", folder
    from fusiontrain.checkpoint.export import EXPORT_CONFIG

    if (folder / EXPORT_CONFIG).is_file():
        return "export", folder
    if (folder / "config.json").is_file():
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as error:
            raise InferenceError(f"cannot read {folder / 'config.json'}: {error}") from None
        if model_type == "mllama":
            return "hf", folder
        raise InferenceError(
            f"{folder} holds a {model_type!r} model, not a fusion model: pass a HF Mllama folder, a fusiontrain "
            "export or a training checkpoint (a composed Llama + CLIP/SigLIP model is read from its checkpoint or "
            "its export)"
        )
    if (folder / layout.CHECKPOINTS).is_dir():
        latest = layout.latest_complete(folder)
        if latest is None:
            raise InferenceError(f"run folder {folder} has no complete checkpoint under {layout.CHECKPOINTS}/")
        return "checkpoint", latest[1]
    raise InferenceError(
        f"{folder} is not a model folder: expected a HF Mllama folder (config.json), a fusiontrain export "
        f"(fusiontrain_config.json) or a training checkpoint ({layout.MANIFEST})"
    )


def load_for_inference(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_base_mismatch: bool = False,
) -> LoadedModel:
    """Load the model in ``path`` (see :func:`folder_kind`) for generation.

    Args:
        path: a HF Mllama folder, a fusiontrain export, a training checkpoint or a run folder.
        dtype: parameter dtype (values are cast).
        device: where the parameters live.
        allow_base_mismatch: for a checkpoint, go ahead even when the base folders' weight files
            differ in size from those it was trained on (as recorded in its manifest).

    Raises:
        InferenceError: the folder is missing, of no known kind, or cannot be loaded.
        CheckpointError: a checkpoint folder is incomplete or corrupt.
    """
    kind, folder = folder_kind(path)
    try:
        if kind == "hf":
            from fusiontrain.models.mllama import load_hf_mllama

            model = load_hf_mllama(folder, dtype=dtype, device=device, fusion_trainable=False)
            family, text_dir, image_dir = "mllama", folder, folder
        elif kind == "export":
            from fusiontrain.checkpoint.export import load_fusiontrain_export, read_export_config

            family = read_export_config(folder)["family"]
            model = load_fusiontrain_export(folder, dtype=dtype, device=device, fusion_trainable=False)
            text_dir = image_dir = folder
        else:
            model, family, text_dir, image_dir = _load_checkpoint(
                folder, dtype=dtype, device=device, allow_base_mismatch=allow_base_mismatch
            )
    except (InferenceError, CheckpointError):
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        raise InferenceError(f"cannot load the model in {folder}: {error}") from error
    model.eval()
    return _with_inputs(model, family=family, kind=kind, path=folder, text_dir=text_dir, image_dir=image_dir)


def _with_inputs(
    model: DeepFusionModel, *, family: str, kind: str, path: Path, text_dir: Path, image_dir: Path
) -> LoadedModel:
    from fusiontrain.data.formats import SampleBuilder
    from fusiontrain.builders import image_spec

    spec = image_spec(model)
    if family == "mllama":
        image_token_id = None  # the tokenizer's <|image|>
        builder_image_dir = None
    else:
        from fusiontrain.models.compose import image_token_layout

        image_token_id = image_token_layout(model).image_token_id
        builder_image_dir = image_dir
    try:
        builder = SampleBuilder(
            text_dir,
            spec,
            image_dir=builder_image_dir,
            format="chat",
            max_len=int(model.decoder.max_seq_len),
            image_token_id=image_token_id,
        )
    except (OSError, ValueError, TypeError) as error:
        what = "processor" if family == "mllama" else "tokenizer or image processor"
        raise InferenceError(f"cannot use the {what} of {path} (in {text_dir}): {error}") from error
    return LoadedModel(
        model=model,
        family=family,
        kind=kind,
        path=path,
        text_dir=text_dir,
        image_dir=image_dir,
        spec=spec,
        image_token_id=builder.image_token_id,
        builder=builder,
    )


def _load_checkpoint(
    folder: Path, *, dtype: torch.dtype, device: torch.device | str, allow_base_mismatch: bool
) -> tuple[DeepFusionModel, str, Path, Path]:
    """Rebuild a checkpoint's model from its base folders, then load its parts over it."""
    manifest = layout.read_manifest(folder)
    base = manifest["base"]
    family = base["family"]
    paths = layout.base_folders(manifest, folder)
    if not allow_base_mismatch:
        _check_base_sizes(manifest, paths, folder)
    if "fusiontrain_export" in paths:
        from fusiontrain.checkpoint.export import load_fusiontrain_export, read_export_config

        exported = read_export_config(paths["fusiontrain_export"])["family"]
        if exported != family:
            raise CheckpointError(
                f"checkpoint folder {folder}: {layout.MANIFEST} says family {family!r}, its base export "
                f"{paths['fusiontrain_export']} holds a {exported!r} model"
            )
        model = load_fusiontrain_export(paths["fusiontrain_export"], dtype=dtype, device=device, fusion_trainable=False)
        text_dir = image_dir = paths["fusiontrain_export"]
    elif family == "mllama":
        from fusiontrain.models.mllama import load_hf_mllama

        model = load_hf_mllama(paths["hf_mllama"], dtype=dtype, device=device, fusion_trainable=False)
        text_dir = image_dir = paths["hf_mllama"]
    else:
        from fusiontrain.models.compose import compose_from_hf

        interval, vocab = base["fusion_interval"], base["fusion_vocab_size"]  # checked by the manifest reader
        if "fusion" not in manifest["parts"]:
            raise CheckpointError(
                f"checkpoint folder {folder} has no 'fusion' part: a composed model's fusion parameters exist only there"
            )
        model = compose_from_hf(
            paths["decoder"],
            paths["encoder"],
            fusion_interval=interval,
            fusion_vocab_size=vocab,
            dtype=dtype,
            device=device,
            fusion_trainable=False,
        )
        text_dir, image_dir = paths["decoder"], paths["encoder"]
    load_checkpoint_parts(folder, manifest["parts"], model)
    return model, family, text_dir, image_dir


def _check_base_sizes(manifest: dict, paths: dict[str, Path], folder: Path) -> None:
    """Refuse base weight files whose sizes differ from the checkpoint's fingerprint (the cheap
    half of the resume check: sizes, not hashes)."""
    saved = manifest.get("fingerprint")
    if not isinstance(saved, dict):
        return
    changed = []
    for name, entry in sorted(saved.items()):
        role, _, file = name.partition("/")
        if role not in paths:
            continue
        path = paths[role] / file
        if not path.is_file():
            changed.append(f"{name} is gone")
        elif isinstance(entry, dict) and entry.get("size") not in (None, path.stat().st_size):
            changed.append(f"{name} changed size ({entry['size']} -> {path.stat().st_size} bytes)")
    if changed:
        raise InferenceError(
            f"checkpoint {folder} was trained on other base weights than {sorted(str(p) for p in paths.values())}: "
            f"{'; '.join(changed[:3])}. Restore the original base, or pass --allow-base-mismatch"
        )


def load_checkpoint_parts(folder: Path, parts: Sequence[str], model: DeepFusionModel) -> None:
    """Load every DCP part of checkpoint ``folder`` into ``model``'s parameters, in place (values
    are cast to the parameters' dtype). Each part's tensors must be parameters of ``model`` of the
    same shape."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from fusiontrain.checkpoint.manager import load_part

    params = dict(model.named_parameters())
    for part in parts:
        part_folder = layout.part_dir(folder, part)
        try:
            entries = FileSystemReader(part_folder).read_metadata().state_dict_metadata
        except Exception as error:  # noqa: BLE001 - a missing or foreign .metadata: unusable
            raise CheckpointError(f"checkpoint {folder}: cannot read the DCP metadata of {part}/ ({error})") from None
        unknown = sorted(name for name in entries if name not in params)
        if unknown:
            raise InferenceError(
                f"checkpoint {folder}: part {part!r} holds {unknown[:3]}{' ...' if len(unknown) > 3 else ''}, which the "
                "model rebuilt from its base does not have"
            )
        for name, entry in entries.items():
            if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(params[name].shape):
                shape = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else type(entry).__name__
                raise InferenceError(
                    f"checkpoint {folder}: {part}/{name} has shape {shape}, the model's parameter "
                    f"{tuple(params[name].shape)}: was it trained from this base?"
                )
        tensors = {name: params[name].detach() for name in entries}  # same storage: loads in place
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            load_part(folder, part, tensors)


# -- inputs -----------------------------------------------------------------------------------------


def open_images(images: Sequence[str | Path | Image.Image]) -> list[Image.Image]:
    """Decode image files (relative paths are relative to the working directory) or pass PIL
    images through, as RGB, exactly as the training data pipeline decodes them.

    Raises:
        InferenceError: a file is missing, unreadable or not an image (the message names it).
    """
    from fusiontrain.data.sources import open_image

    decoded = []
    for ref in images:
        try:
            decoded.append(open_image(Path(ref).absolute() if isinstance(ref, (str, Path)) else ref, None))
        except BadSample as error:
            raise InferenceError(error.detail) from None
    return decoded


def prompt_messages(num_images: int, prompt: str) -> list[dict]:
    """One user turn: ``num_images`` image items, then the prompt text."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}]


def prompt_tokens(builder: SampleBuilder, messages: list[dict]) -> list[int]:
    """The token ids of ``messages`` rendered with the builder's chat template and the generation
    prompt, image tokens where the template puts them: the tokens training gives the same
    conversation up to the start of the assistant's reply."""
    try:
        return builder.encode_prompt(messages)
    except BadSample as error:
        raise InferenceError(f"cannot render the prompt: {error.detail}") from None


def prompt_encoder_mask(
    length: int, spans: Sequence[tuple[int, int]], images: Sequence[dict[str, torch.Tensor]], spec: ImageSpec
) -> torch.Tensor:
    """``[1, length, len(images) * spec.tokens_per_image]`` bool: token ``j`` sees image ``k``
    when ``spans[k]`` holds ``j``. For Mllama, only the image's real tiles
    (``aspect_ratio_mask``), as ``MllamaProcessor``'s ``cross_attention_mask``."""
    per_image = spec.tokens_per_image
    mask = torch.zeros(1, length, len(images) * per_image, dtype=torch.bool)
    for k, ((start, end), image) in enumerate(zip(spans, images, strict=True)):
        seen = per_image
        if spec.kind == "mllama":
            seen = int(image["aspect_ratio_mask"].sum()) * (per_image // spec.max_num_tiles)
        mask[0, start:end, k * per_image : k * per_image + seen] = True
    return mask


def build_prompt_inputs(
    loaded: LoadedModel, images: Sequence[str | Path | Image.Image], prompt: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, torch.Tensor | None]:
    """The model inputs of one user turn with ``images`` then ``prompt``, ready for
    :func:`~fusiontrain.generation.generate`.

    Returns:
        ``(tokens [1, s], encoder_input, encoder_mask [1, s, s_e])`` on the model's device
        (floating encoder inputs in its dtype); the last two are None without images.

    Raises:
        InferenceError: an image cannot be read, the prompt is empty, or it holds image tokens.
    """
    from fusiontrain.data.formats import image_spans

    if not prompt.strip():
        raise InferenceError("the prompt is empty")
    pictures = open_images(images)
    tokens = prompt_tokens(loaded.builder, prompt_messages(len(pictures), prompt))
    found = tokens.count(loaded.image_token_id)
    if found != len(pictures):
        raise InferenceError(
            f"the rendered prompt has {found} image tokens for {len(pictures)} images: does the prompt text contain "
            f"{loaded.builder.image_placeholder!r}?"
        )
    device, dtype = loaded.device, loaded.dtype
    token_tensor = torch.tensor([tokens], dtype=torch.long, device=device)
    if not pictures:
        return token_tensor, None, None
    processed = [loaded.builder.transform(picture) for picture in pictures]
    encoder_input = stack_images([processed], loaded.spec)
    assert encoder_input is not None
    encoder_input = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in encoder_input.items()
    }
    mask = prompt_encoder_mask(len(tokens), image_spans(tokens, loaded.image_token_id), processed, loaded.spec)
    return token_tensor, encoder_input, mask.to(device)


# -- CLI --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``generate`` command's options to ``parser``."""
    parser.add_argument(
        "--model",
        required=True,
        help="a HF Mllama folder, a fusiontrain export, a training checkpoint (.../checkpoints/step_N) or a run's "
        "output_dir (its latest checkpoint)",
    )
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several images"
    )
    parser.add_argument("--prompt", required=True, help="the user's text, after the images")
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
    from fusiontrain.generation import generate

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
            args.model, dtype=dtype, device=device, allow_base_mismatch=args.allow_base_mismatch
        )
        tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, pictures, args.prompt)
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
