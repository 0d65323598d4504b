"""Export a training checkpoint as one consolidated model folder, base and trained weights merged.

A training checkpoint (see :mod:`fusiontrain.checkpoint.layout`) holds only what trained (DCP
parts ``fusion/``, optionally ``decoder/`` and ``encoder/``) and names the pretrained folders the
rest comes from. :func:`export_checkpoint` joins the two into one folder in either format:

``hf`` (Mllama only; its default)
    What ``transformers.MllamaForConditionalGeneration.from_pretrained`` loads: ``config.json``
    (the base's, with ``dtype`` / ``torch_dtype`` set to the export dtype), ``model.safetensors``
    (or ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``),
    ``generation_config.json`` and the base's tokenizer, processor and chat-template files. Tensor
    names are the reverse of :func:`~fusiontrain.families.mllama.model.mllama_weight_map`, in the naming
    the base folder uses (``language_model.model.*``, which transformers 5.23's own
    ``save_pretrained`` writes and the Hub holds, or ``model.language_model.*``; transformers 5.23
    loads both). A run that started from a fusiontrain export of an Mllama has no HF base folder:
    its layout comes from the family (transformers' own model class, built on the meta device from
    the stored config), its files from the export, and ``base`` naming means the older one.

``fusiontrain`` (any family; the default for composed models)
    Our own, self-contained layout, read back by
    :func:`~fusiontrain.models.load_fusiontrain_export`: ``fusiontrain_config.json``
    (family, fusion settings, dtype, provenance), the base configs stored verbatim
    (``mllama_config.json``, or ``decoder_config.json`` + ``encoder_config.json``),
    ``model.safetensors`` (or shards + index) with every parameter under its canonical name, and
    the tokenizer files (from the decoder folder) and image processor files (from the encoder
    folder).

``peft`` (a checkpoint with LoRA, Mllama only)
    A PEFT LoRA adapter folder for the base's transformers model (``adapter_config.json`` +
    ``adapter_model.safetensors``, the fusion weights as ``modules_to_save``); written by
    :mod:`fusiontrain.weights.peft`. The base folder is not copied.

A checkpoint with LoRA (a ``lora`` part and the manifest's ``lora``) exports merged in ``hf`` and
``fusiontrain``: each adapted linear's weight becomes ``W + alpha/r * B @ A`` (fp32, then cast as
below).

Dtypes. By default (``dtype=None``) every tensor keeps the dtype the base stores it in, so the
frozen tensors come out bit-identical to the base: a tensor read from a base folder is written as
read (a base with mixed dtypes keeps each tensor's own); a trained tensor (from a DCP part, usually
fp32) is cast to the dtype of the base tensor it replaces (for an Mllama tensor assembled from
several parameters, such as ``embed_tokens``, that tensor's dtype), and a trained tensor that no
base tensor stands for (a composed model's fusion parameters) to the base's *dominant* dtype, the
one holding the most base elements. ``dtype="bf16"`` or ``"fp32"`` casts every tensor to it. The
configs' ``dtype`` (and ``torch_dtype``) record the forced dtype, else the dominant one.

Export is a single CPU process and streams: it reads one tensor at a time (from the base with
:meth:`HFCheckpoint.read`, from a DCP part with :meth:`CheckpointPart.read`), casts it and appends
it to the current shard, which is written once it reaches ``max_shard_bytes``. Peak memory is about
one shard plus one tensor. Everything is written into ``<out>.tmp`` and renamed to ``<out>`` at
the end, so a crash leaves no half export under ``<out>``. Before anything is read, the checkpoint
is verified: only JSON and safetensors files (anything else, such as an older layout's pickled
``.metadata``, is refused unread), each of the size and sha256 checksum its manifest records.
Nothing is unpickled.

The command line (``python -m fusiontrain export``) lives in :mod:`fusiontrain.cli`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.fingerprint import check_base_unchanged
from fusiontrain.checkpoint.layout import CheckpointError
from fusiontrain.checkpoint.parts import CheckpointPart, PartMismatch, open_parts
from fusiontrain.families import ModelFamily, model_family
from fusiontrain.source.export import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_VERSION
from fusiontrain.source.model_source import ModelSource
from fusiontrain.weights.hf_checkpoint import HFCheckpoint, HFLayout, TensorRoute
from fusiontrain.weights.pretrained import PretrainedModel
from fusiontrain.checkpoint.export_files import (
    ExportError,
    ShardWriter,
    check_out,
    commit,
    copy_files,
    remove,
    start_tmp,
    write_json,
)
from fusiontrain.weights.peft import peft_layout, write_adapter
from fusiontrain.weights.lora import LoraSettings, lora_shapes
from fusiontrain.modules import DeepFusionModel, get_fusion_params
from fusiontrain.modules.fusion import never_trained
from fusiontrain.modules.lora import is_lora_parameter, merged_weight

FORMATS = ("hf", "fusiontrain", "peft")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Files copied from the base folders when they exist. Tokenizer side (with the chat templates):
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)
TOKENIZER_FOLDERS = ("additional_chat_templates",)
# Image processor side (an Mllama folder's processor_config.json embeds its image processor):
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

GENERATION_CONFIG = "generation_config.json"

HF_NAMINGS = ("base", "legacy", "current")  # see ModelFamily.hf_stored_name


# -- the checkpoint and its base ------------------------------------------------------------------


@dataclass
class _Base:
    """The pretrained side of a checkpoint: where the run started (its source), the model skeleton
    (meta device), and where each parameter that did not train comes from."""

    source: ModelSource
    pretrained: PretrainedModel
    configs: dict[str, dict]  # role -> config.json dict, e.g. {"decoder": ..., "encoder": ...}

    @property
    def family(self) -> ModelFamily:
        return self.source.family

    @property
    def folders(self) -> Mapping[str, Path]:
        return self.source.folders

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.source.settings

    @property
    def model(self) -> DeepFusionModel:
        return self.pretrained.model  # type: ignore[return-value]

    def routes(self) -> dict[str, tuple[HFCheckpoint, TensorRoute]]:
        """Our parameter name -> (base checkpoint, route) for every parameter a base folder holds."""
        found: dict[str, tuple[HFCheckpoint, TensorRoute]] = {}
        for source in self.pretrained.sources:
            for route in source.routes:
                if route.our_key in found:
                    raise ExportError(f"two base tensors fill {route.our_key!r}; the weight map is ambiguous")
                found[route.our_key] = (source.checkpoint, route)
        return found


def _open_base(manifest: dict, checkpoint: Path) -> _Base:
    try:
        paths = layout.base_folders(manifest, checkpoint)
        source = ModelSource.from_manifest(manifest["base"], paths)
        return _Base(source, source.prepare(), source.configs())
    except layout.BaseFolderMissing as error:
        raise ExportError(str(error)) from None
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise ExportError(f"the base of checkpoint {checkpoint} cannot be read: {error}") from error


def _part_of(name: str, fusion: set[str]) -> str:
    if name in fusion:
        return "fusion"
    if is_lora_parameter(name):
        return "lora"
    return "decoder" if name.startswith("decoder.") else "encoder"


def _open_trained(
    checkpoint: Path, parts: Sequence[str], model: DeepFusionModel, lora: LoraSettings | None
) -> dict[str, CheckpointPart]:
    """The checkpoint's DCP parts, each checked to hold exactly the base model's parameters of
    that part (``fusion``: the fusion parameters; ``decoder`` / ``encoder``: the others; ``lora``:
    the LoRA matrices of the manifest's ``lora``). A parameter the model declares never trained
    (``frozen_params()``: Whisper's sinusoidal positions) may be absent from its part: a trained
    encoder's part leaves it out unless ``checkpoint.save_frozen``; the base folder gives it."""
    shapes = {name: param.shape for name, param in model.named_parameters()}
    if lora is not None:
        shapes.update(lora_shapes(model, lora))
    fusion = set(get_fusion_params(model))
    fixed = never_trained(model)
    opened = open_parts(checkpoint, parts)
    if (lora is None) != ("lora" not in opened):
        raise ExportError(f"checkpoint {checkpoint}: its manifest's 'lora' and its parts {list(parts)} disagree")
    for part in opened.values():
        expected = {name: shape for name, shape in shapes.items() if _part_of(name, fusion) == part.name}
        required = {name: shape for name, shape in expected.items() if name not in fixed or name in part.entries}
        try:
            part.check_shapes(required, whole=True, what="the base model")
        except PartMismatch as error:
            raise ExportError(str(error)) from None
    return opened


class _Parameters:
    """Every parameter of the merged model, full and one at a time: trained ones from the DCP parts,
    the others from the base folders."""

    def __init__(self, base: _Base, parts: dict[str, CheckpointPart], lora: LoraSettings | None = None) -> None:
        self._shapes = {name: tuple(param.shape) for name, param in base.model.named_parameters()}
        self._trained = {name: part for part in parts.values() for name in part.names()}
        self._lora = lora
        self._merged = set() if lora is None else {f"{module}.weight" for module in lora.modules}
        self._routes = base.routes()
        orphans = sorted(name for name in self._shapes if name not in self._trained and name not in self._routes)
        if orphans:
            raise ExportError(
                f"parameters {orphans[:5]}{' ...' if len(orphans) > 5 else ''} are in no base folder and in no part of "
                "the checkpoint (a composed model's fusion parameters exist only in its 'fusion' part)"
            )

    def names(self) -> list[str]:
        return list(self._shapes)

    def read(self, name: str) -> torch.Tensor:
        """Parameter ``name``, full; an adapted linear's weight with its LoRA merged (fp32)."""
        tensor = self.read_unmerged(name)
        if name in self._merged:
            module = name.removesuffix(".weight")
            lora_a, lora_b = self._trained[f"{module}.lora_A.weight"], self._trained[f"{module}.lora_B.weight"]
            tensor = merged_weight(
                tensor, lora_a.read(f"{module}.lora_A.weight"), lora_b.read(f"{module}.lora_B.weight"), self._lora.scaling
            )
        return tensor

    def read_unmerged(self, name: str) -> torch.Tensor:
        """Parameter (or LoRA matrix) ``name``, full, as trained or as the base stores it."""
        if name in self._trained:
            tensor = self._trained[name].read(name)
        else:
            checkpoint, route = self._routes[name]
            tensor = checkpoint.read(route.hf_key, route.rows)
        shape = self._shapes.get(name, tuple(tensor.shape))  # a LoRA matrix: its part checked its shape
        if tuple(tensor.shape) != shape:
            if tensor.numel() != torch.Size(shape).numel():
                raise ExportError(f"{name}: read shape {tuple(tensor.shape)}, the model's {shape}")
            tensor = tensor.reshape(shape)
        return tensor


# -- dtypes -----------------------------------------------------------------------------------------


class _OutputDtypes:
    """The dtype each exported tensor is written in: ``forced`` for all, or else the dtype the
    base stores it in (see the module docstring for trained tensors)."""

    def __init__(self, base: _Base, forced: torch.dtype | None) -> None:
        self.forced = forced
        self._routes = base.routes()
        self._stored: dict[tuple[Path, str], torch.dtype] = {}
        elements: Counter[torch.dtype] = Counter()
        for checkpoint, route in self._routes.values():
            key = (checkpoint.folder, route.hf_key)
            if key not in self._stored:
                self._stored[key] = checkpoint.dtype(route.hf_key)
                elements[self._stored[key]] += torch.Size(checkpoint.shape(route.hf_key)).numel()
        if not elements:
            raise ExportError("the base holds no tensor of the model: there is no stored dtype to export in")
        # the dtype of the most elements; ties go to the wider dtype, so nothing is narrowed by chance
        self.dominant = max(elements, key=lambda dtype: (elements[dtype], dtype.itemsize, str(dtype)))

    @property
    def label(self) -> str:
        """What the configs record as the export's ``dtype``: ``"bfloat16"``, ``"float32"``, ..."""
        return str(self.dominant if self.forced is None else self.forced).removeprefix("torch.")

    def of_base_tensor(self, checkpoint: HFCheckpoint, hf_key: str) -> torch.dtype:
        """The dtype of base tensor ``hf_key`` in the export."""
        if self.forced is not None:
            return self.forced
        key = (checkpoint.folder, hf_key)
        if key not in self._stored:
            self._stored[key] = checkpoint.dtype(hf_key)
        return self._stored[key]

    def of_parameter(self, name: str) -> torch.dtype:
        """The dtype of our parameter ``name`` in the export: its base tensor's, or the dominant
        one for a parameter that no base tensor holds."""
        if self.forced is not None:
            return self.forced
        if name in self._routes:
            checkpoint, route = self._routes[name]
            return self.of_base_tensor(checkpoint, route.hf_key)
        return self.dominant


# -- writing ----------------------------------------------------------------------------------------


def _hf_tensors(layout: HFLayout, params: _Parameters) -> Iterator[tuple[str, torch.Tensor]]:
    """``(current HF name, full tensor)`` of every tensor of ``layout``, in weight-map order, each
    assembled from the parameters its routes fill (Mllama's ``embed_tokens`` from two row ranges)."""
    by_key: dict[str, list[TensorRoute]] = {}
    for route in layout.routes:
        by_key.setdefault(route.hf_key, []).append(route)
    for hf_key, routes in by_key.items():
        shape = layout.shapes[hf_key]
        if len(routes) == 1 and routes[0].rows is None:
            yield hf_key, params.read(routes[0].our_key).reshape(shape)
            continue
        if any(route.rows is None for route in routes):
            raise ExportError(f"{hf_key} is routed both whole and by rows")
        routes = sorted(routes, key=lambda route: route.rows[0])  # type: ignore[index]
        stops = [0] + [route.rows[1] for route in routes]  # type: ignore[index]
        if [route.rows[0] for route in routes] != stops[:-1] or stops[-1] != shape[0]:  # type: ignore[index]
            raise ExportError(f"the routes of {hf_key} do not tile its {shape[0]} rows: {[r.rows for r in routes]}")
        yield hf_key, torch.cat([params.read(route.our_key) for route in routes], dim=0).reshape(shape)


def _generation_config_from(config: dict) -> dict:
    text = config.get("text_config", {})
    generation = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key, text.get(key))
        if value is not None:
            generation[key] = value
    return generation


def _write_hf(
    base: _Base, params: _Parameters, folder: Path, dtypes: _OutputDtypes, max_shard_bytes: int, naming: str
) -> None:
    (role,) = base.family.roles  # a transformers layout exists for one-folder families only
    hf_folder = base.source.folder_of(role)
    config = dict(base.configs[role])
    config["dtype"] = dtypes.label
    config["torch_dtype"] = dtypes.label  # what transformers 4.x and other readers look at
    write_json(folder / "config.json", config)
    if not copy_files(hf_folder, folder, [GENERATION_CONFIG]):
        write_json(folder / GENERATION_CONFIG, _generation_config_from(config))
    copy_files(hf_folder, folder, TOKENIZER_FILES + PROCESSOR_FILES, TOKENIZER_FOLDERS)

    try:
        layout = base.source.hf_layout(base.pretrained)
    except ValueError as error:
        raise ExportError(str(error)) from None
    legacy = layout.legacy_names if naming == "base" else naming == "legacy"
    writer = ShardWriter(folder, max_shard_bytes)
    for name, tensor in _hf_tensors(layout, params):
        dtype = dtypes.forced or layout.dtypes[name]
        writer.add(base.family.hf_stored_name(name, legacy=legacy), tensor.to(dtype))
    writer.finish()


def _write_fusiontrain(
    base: _Base, params: _Parameters, folder: Path, dtypes: _OutputDtypes, max_shard_bytes: int, provenance: dict
) -> None:
    files = {role: base.family.config_file_of(role) for role in base.family.roles_of(base.configs)}
    export_config: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "family": base.family.name,
        "dtype": dtypes.label,
        "configs": files,
        "settings": sorted(base.settings),
        **base.settings,
        **base.family.export_config(base.configs),
        "source": provenance,
    }
    write_json(folder / EXPORT_CONFIG, export_config)
    for role, file in files.items():
        write_json(folder / file, base.configs[role])
    inputs = base.source.input_folders(base.model)
    copy_files(inputs.text_dir, folder, TOKENIZER_FILES + (GENERATION_CONFIG,), TOKENIZER_FOLDERS)
    copy_files(inputs.image_dir or inputs.text_dir, folder, PROCESSOR_FILES)
    for other in inputs.others:  # each other modality's feature extractor in a folder of its own
        sub = folder / base.family.export_subfolder(f"encoder.{other.name}")
        sub.mkdir(exist_ok=True)
        copy_files(other.folder, sub, PROCESSOR_FILES)

    writer = ShardWriter(folder, max_shard_bytes)
    for name in params.names():
        writer.add(name, params.read(name).to(dtypes.of_parameter(name)))
    writer.finish()


def _write_peft(base: _Base, params: _Parameters, folder: Path, dtypes: _OutputDtypes, lora: LoraSettings) -> None:
    """A PEFT adapter folder (see :mod:`fusiontrain.weights.peft`) for the base's transformers
    model: the LoRA matrices (in the base's dominant dtype unless forced) and the fusion weights."""
    try:
        layout = peft_layout(base.pretrained, hf_export=base.source.has_hf_layout, family_name=base.family.name)
    except ValueError as error:
        raise ExportError(str(error)) from None
    (role,) = base.family.roles
    write_adapter(
        folder,
        layout,
        lora,
        params.read_unmerged,
        lambda name: dtypes.of_parameter(name.rsplit(".", 2)[0] + ".weight") if is_lora_parameter(name) else dtypes.of_parameter(name),
        base_model_name_or_path=str(base.folders[role]),
    )


# -- API --------------------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    hf_naming: str = "base",
    verify_base: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Write one consolidated model folder from training checkpoint ``checkpoint``.

    Args:
        checkpoint: a checkpoint folder (``<output_dir>/checkpoints/step_<N>``).
        out: the folder to write; it must not exist or be empty unless ``force``.
        format: ``"hf"`` (Mllama only) or ``"fusiontrain"``; default ``"hf"`` for an Mllama base,
            ``"fusiontrain"`` for a composed one.
        dtype: None (the default): every tensor in the dtype the base stores it in, so frozen
            tensors are bit-identical to the base (trained ones take the dtype of the base tensor
            they replace, or the base's dominant dtype; see the module docstring). ``"bf16"`` or
            ``"fp32"``: every tensor is cast to it.
        max_shard_bytes: the most bytes of tensors per safetensors file (a larger tensor gets a file
            of its own).
        force: replace an existing, non-empty ``out``.
        hf_naming: tensor names of the ``hf`` format: ``"base"`` (as the base folder names them),
            ``"legacy"`` (``language_model.model.*``, what transformers 5.23 ``save_pretrained``
            writes) or ``"current"`` (``model.language_model.*``).
        verify_base: check the base files' sha256 against the checkpoint's fingerprint (reads the
            whole base); by default only their sizes are compared.
        allow_base_mismatch: export even when the base files differ from the fingerprint.

    Returns:
        ``out``.

    Raises:
        CheckpointError: the checkpoint folder is missing, incomplete or corrupt.
        ExportError: the output exists, the format does not fit the family, or the checkpoint does
            not match its base.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    manifest = layout.verify_checkpoint(checkpoint, checksums=True)  # refuses unsafe files unread
    family = model_family(manifest["base"]["family"])
    format = format or ("hf" if family.hf_export else "fusiontrain")
    if format not in FORMATS:
        raise ExportError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == "hf" and not family.hf_export:
        raise ExportError(
            f"the hf format needs a family with a transformers layout (such as mllama); checkpoint {checkpoint} is a "
            f"{family.name} model, which no transformers class loads: use --format fusiontrain"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be None (as the base stores it) or one of {list(DTYPES)}, got {dtype!r}")
    if hf_naming not in HF_NAMINGS:
        raise ExportError(f"hf_naming must be one of {list(HF_NAMINGS)}, got {hf_naming!r}")
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    lora = LoraSettings.from_dict(manifest["lora"], f"checkpoint {checkpoint}") if "lora" in manifest else None
    if format == "peft" and lora is None:
        raise ExportError(f"checkpoint {checkpoint} has no LoRA (model.lora): export it as hf or fusiontrain")
    base = _open_base(manifest, checkpoint)
    if not allow_base_mismatch:
        check_base_unchanged(manifest, base.folders, checkpoint, verify_hashes=verify_base, error=ExportError)
    params = _Parameters(base, _open_trained(checkpoint, manifest["parts"], base.model, lora), lora)
    dtypes = _OutputDtypes(base, None if dtype is None else DTYPES[dtype])
    check_out(out, force, [checkpoint, *base.folders.values()])

    tmp = start_tmp(out)
    try:
        if format == "hf":
            _write_hf(base, params, tmp, dtypes, max_shard_bytes, hf_naming)
        elif format == "peft":
            _write_peft(base, params, tmp, dtypes, lora)
        else:
            provenance = {
                "checkpoint": str(checkpoint.resolve()),
                "step": manifest["step"],
                "parts": manifest["parts"],
                "base": manifest["base"],
            }
            _write_fusiontrain(base, params, tmp, dtypes, max_shard_bytes, provenance)
    except BaseException:
        remove(tmp)
        raise
    commit(tmp, out)
    return out
