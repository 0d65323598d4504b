"""Generation from a model folder, an export or a training checkpoint: ``python -m fusiontrain generate``.

- :func:`load_for_inference` reads any of the folders fusiontrain makes or starts from:

  * a HF ``MllamaForConditionalGeneration`` folder (``config.json`` with model_type ``mllama``;
    the ``hf`` export is one);
  * a ``fusiontrain``-format export (``fusiontrain_config.json``; Mllama or composed);
  * a training checkpoint (``<output_dir>/checkpoints/step_<N>`` with ``manifest.json``): the model
    is rebuilt from the base folders the manifest names (a HF Mllama folder, a Llama + a CLIP /
    SigLIP folder, or the fusiontrain export the run started from), then every part the checkpoint
    holds is loaded over it with DCP (single process, no process group);
  * a run's ``output_dir`` (it has a ``checkpoints/`` folder): its newest intact checkpoint.

  The result, a :class:`LoadedModel`, carries the model and what builds its inputs: the tokenizer
  (and chat template) folder, the image processor folder, the :class:`ImageSpec`.
- :func:`build_prompt_inputs` turns images (and clips, for a model with an audio encoder) and a
  prompt into one user turn rendered with the model's chat template and the generation prompt (the
  assistant header), exactly as training renders conversations
  (:class:`~fusiontrain.data.formats.SampleBuilder`): same tokenization, same image and audio
  processing, same placeholder placement.
- The ``generate`` command on them is :mod:`fusiontrain.inference.command`.

For Mllama, a token attends to the real tiles of the images it sees, not to their padding tiles,
as ``MllamaProcessor``'s ``cross_attention_mask`` says (and Meta's and torchtune's code do);
:func:`prompt_encoder_mask` builds it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.layout import CheckpointError
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.errors import BadSample

if TYPE_CHECKING:
    from PIL import Image

    from fusiontrain.source.model_source import ModelSource

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
        family: the model family's name (``fusiontrain.families``).
        kind: what ``path`` was: ``"hf"``, ``"export"`` or ``"checkpoint"``.
        path: the folder the model came from (for a run folder, its latest checkpoint).
        text_dir: the folder with the tokenizer and chat template (Mllama: the whole processor).
        image_dir: the folder with the image processor (Mllama: ``text_dir``).
        image_format: how the encoder takes one image.
        image_token_id: the id of the image token in the prompt.
        builder: renders and tokenizes prompts, and processes images (the training pipeline's),
            and the clips of a model with an audio encoder too (``builder.others``).
        input_formats: what the collators take: ``image_format``, or (a model with an encoder per
            modality) the input formats by modality.
    """

    model: DeepFusionModel
    family: str
    kind: str
    path: Path
    text_dir: Path
    image_dir: Path
    image_format: ImageFormat
    image_token_id: int
    builder: SampleBuilder
    input_formats: Any = None

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
    ``output_dir`` resolves to its newest intact checkpoint, damaged newer ones reported on stderr), ``"export"``
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
    from fusiontrain.source.export import EXPORT_CONFIG

    if (folder / EXPORT_CONFIG).is_file():
        return "export", folder
    if (folder / "config.json").is_file():
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as error:
            raise InferenceError(f"cannot read {folder / 'config.json'}: {error}") from None
        from fusiontrain.families import MODEL_FAMILIES

        if any(model_type in family.hf_model_types for family in MODEL_FAMILIES.values()):
            return "hf", folder
        raise InferenceError(
            f"{folder} holds a {model_type!r} model, not a fusion model: pass a HF Mllama folder, a fusiontrain "
            "export or a training checkpoint (a composed Llama + CLIP/SigLIP model is read from its checkpoint or "
            "its export)"
        )
    if (folder / layout.CHECKPOINTS).is_dir():
        latest = layout.newest_intact(folder, report=lambda line: print(f"warning: {line}", file=sys.stderr))
        if latest is None:
            raise InferenceError(f"run folder {folder} has no intact checkpoint under {layout.CHECKPOINTS}/")
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
    adapter: str | Path | None = None,
) -> LoadedModel:
    """Load the model in ``path`` (see :func:`folder_kind`) for generation.

    Args:
        path: a HF folder of a family with a transformers layout (Llama 3.2 Vision), a fusiontrain
            export, a training checkpoint or a run folder.
        dtype: parameter dtype (values are cast).
        device: where the parameters live.
        allow_base_mismatch: for a checkpoint, go ahead even when the base folders' weight files
            differ in size from those it was trained on (as recorded in its manifest).
        adapter: a PEFT LoRA adapter folder to apply on a HF base folder ``path`` (its LoRA, and
            its ``modules_to_save`` fusion weights; needs the ``[peft]`` extra).

    Raises:
        InferenceError: the folder is missing, of no known kind, or cannot be loaded.
        CheckpointError: a checkpoint folder is incomplete or corrupt.
    """
    from fusiontrain.source.model_source import ModelSource

    kind, folder = folder_kind(path)
    if adapter is not None and kind != "hf":
        raise InferenceError(f"--adapter applies to a HF base folder; {folder} is a {kind}")
    try:
        if kind == "checkpoint":
            model, source = _load_checkpoint(folder, dtype=dtype, device=device, allow_base_mismatch=allow_base_mismatch)
        else:
            source = ModelSource.from_hf_folder(folder) if kind == "hf" else ModelSource.from_export(folder)
            model = _load_base(source, dtype=dtype, device=device, adapter=adapter)
    except (InferenceError, CheckpointError):
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError, ImportError) as error:
        raise InferenceError(f"cannot load the model in {folder}: {error}") from error
    model.eval()
    return _with_inputs(model, source=source, kind=kind, path=folder)


def _load_base(
    source: ModelSource,
    *,
    dtype: torch.dtype,
    device: Any,
    lora: Any = None,
    adapter: str | Path | None = None,
) -> DeepFusionModel:
    """The source's model, allocated and filled, nothing trainable; with ``lora``
    (:class:`~fusiontrain.weights.lora.LoraSettings`) its adapters added (fresh: a checkpoint's
    part fills them), or with ``adapter`` a PEFT adapter folder's applied."""
    from fusiontrain.families import TrainableFlags
    from fusiontrain.weights.hf_checkpoint import materialize
    from fusiontrain.weights.lora import attach_lora

    pretrained = source.prepare(TrainableFlags(fusion_trainable=False), seed=0)
    if adapter is not None:
        from fusiontrain.weights.peft import adapted_model_loader, adapter_settings, peft_layout

        layout = peft_layout(pretrained, hf_export=source.has_hf_layout, family_name=source.family.name)
        lora = adapter_settings(adapter, layout)
        attach_lora(pretrained, lora, seed=0)
        initialise, load = pretrained.init_fresh, adapted_model_loader(adapter, layout, lora)

        def init_then_load(model: nn.Module) -> None:
            initialise(model)
            load(model)

        pretrained.init_fresh = init_then_load
    elif lora is not None:
        attach_lora(pretrained, lora, seed=0)
    materialize(pretrained.model.to(dtype), device)
    pretrained.load()
    for param in pretrained.model.parameters():
        param.requires_grad_(False)
    return pretrained.model  # type: ignore[return-value]


def _with_inputs(model: DeepFusionModel, *, source: ModelSource, kind: str, path: Path) -> LoadedModel:
    from fusiontrain.data.formats import SampleBuilder

    formats = source.family.input_formats(model)
    if "image" not in formats:
        raise InferenceError(f"{path} holds a model whose encoders take {sorted(formats)}; generate needs an image encoder among them")
    image_format = formats["image"]
    inputs = source.input_folders(model)
    try:
        builder = SampleBuilder(
            inputs.text_dir,
            image_format,
            image_dir=inputs.image_dir,
            format="chat",
            max_len=int(model.decoder.max_seq_len),
            image_token_id=inputs.image_token_id,
            other_modalities=inputs.others,
        )
    except (OSError, ValueError, TypeError) as error:
        raise InferenceError(
            f"cannot use the tokenizer or image processor of {path} (in {inputs.text_dir}): {error}"
        ) from error
    return LoadedModel(
        model=model,
        family=source.family.name,
        kind=kind,
        path=path,
        text_dir=inputs.text_dir,
        image_dir=inputs.image_dir or inputs.text_dir,
        image_format=image_format,
        image_token_id=builder.image_token_id,
        builder=builder,
        input_formats=formats if inputs.others else image_format,
    )


def _load_checkpoint(
    folder: Path, *, dtype: torch.dtype, device: torch.device | str, allow_base_mismatch: bool
) -> tuple[DeepFusionModel, ModelSource]:
    """Rebuild a checkpoint's model from its base, then load its parts over it."""
    from fusiontrain.checkpoint.fingerprint import check_base_unchanged
    from fusiontrain.checkpoint.parts import PartMismatch, load_parts_into_model
    from fusiontrain.source.model_source import ModelSource
    from fusiontrain.weights.lora import LoraSettings

    manifest = layout.verify_checkpoint(folder, checksums=False)  # sizes; refuses unsafe files unread
    paths = layout.base_folders(manifest, folder)
    if not allow_base_mismatch:
        check_base_unchanged(manifest, paths, folder, error=InferenceError)
    try:
        source = ModelSource.from_manifest(manifest["base"], paths)
    except ValueError as error:
        raise CheckpointError(f"checkpoint folder {folder}: {error}") from None
    if "fusion" not in manifest["parts"]:
        raise CheckpointError(
            f"checkpoint folder {folder} has no 'fusion' part: its model's trained fusion parameters exist only there"
        )
    lora = LoraSettings.from_dict(manifest["lora"], f"checkpoint {folder}") if "lora" in manifest else None
    model = _load_base(source, dtype=dtype, device=device, lora=lora)  # LoRA's matrices come from its part
    try:
        load_parts_into_model(folder, manifest["parts"], model)
    except PartMismatch as error:
        raise InferenceError(str(error)) from None
    return model, source


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


def prompt_messages(num_images: int, prompt: str, num_audios: int = 0) -> list[dict]:
    """One user turn: ``num_images`` image items, ``num_audios`` audio items, then the prompt text."""
    items = [{"type": "image"}] * num_images + [{"type": "audio"}] * num_audios
    return [{"role": "user", "content": items + [{"type": "text", "text": prompt}]}]


def prompt_tokens(builder: SampleBuilder, messages: list[dict]) -> list[int]:
    """The token ids of ``messages`` rendered with the builder's chat template and the generation
    prompt, image tokens where the template puts them: the tokens training gives the same
    conversation up to the start of the assistant's reply."""
    try:
        return builder.encode_prompt(messages)
    except BadSample as error:
        raise InferenceError(f"cannot render the prompt: {error.detail}") from None


def build_prompt_inputs(
    loaded: LoadedModel, images: Sequence[str | Path | Image.Image], prompt: str, audios: Sequence[str | Path] = ()
) -> tuple[torch.Tensor, Any, Any]:
    """The model inputs of one user turn with ``images``, then ``audios`` (audio files, for a
    model with an audio encoder), then ``prompt``, ready for
    :func:`~fusiontrain.inference.generation.generate`.

    Returns:
        ``(tokens [1, s], encoder_input, encoder_mask [1, s, s_e])`` on the model's device
        (floating encoder inputs in its dtype); the last two are None without images (and
        clips), and by modality for a model with an encoder per modality.

    Raises:
        InferenceError: an image or a clip cannot be read, the model takes no audio, the prompt
            is empty, or it holds placeholder tokens.
    """
    from fusiontrain.data.batch import Sample, encoder_rows
    from fusiontrain.data.formats import image_spans

    if not prompt.strip():
        raise InferenceError("the prompt is empty")
    builder = loaded.builder
    if audios and "audio" not in builder.others:
        raise InferenceError(f"--audio given, but {loaded.path} has no audio encoder")
    pictures = open_images(images)
    tokens = prompt_tokens(builder, prompt_messages(len(pictures), prompt, len(audios)))
    counts = [("image", loaded.image_token_id, len(pictures))]
    if "audio" in builder.others:
        counts.append(("audio", builder.others["audio"].token_id, len(audios)))
    for name, token_id, given in counts:
        if tokens.count(token_id) != given:
            placeholder = builder.image_placeholder if name == "image" else builder.others[name].placeholder
            raise InferenceError(
                f"the rendered prompt has {tokens.count(token_id)} {name} tokens for {given} {name}s: does the prompt "
                f"text contain {placeholder!r}?"
            )
    device, dtype = loaded.device, loaded.dtype
    token_tensor = torch.tensor([tokens], dtype=torch.long, device=device)
    if not pictures and not audios:
        return token_tensor, None, None
    sample = Sample(token_tensor[0].cpu(), token_tensor[0].cpu(), images=[builder.transform(p) for p in pictures])
    sample.image_spans = image_spans(tokens, loaded.image_token_id)
    if audios:
        audio = builder.others["audio"]
        try:
            clips = [audio.process(builder.feature_extractors["audio"], Path(clip).absolute(), None) for clip in audios]
        except BadSample as error:
            raise InferenceError(error.detail) from None
        sample.other_items, sample.other_spans = {"audio": clips}, {"audio": image_spans(tokens, audio.token_id)}
    mask, encoder_input = encoder_rows([[(sample, 0)]], loaded.input_formats, len(tokens))

    def on_device(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    if isinstance(mask, dict):
        return token_tensor, {m: on_device(i) for m, i in encoder_input.items()}, {m: t.to(device) for m, t in mask.items()}
    return token_tensor, on_device(encoder_input), mask.to(device)
