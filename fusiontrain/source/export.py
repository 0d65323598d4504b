"""Reading a ``fusiontrain``-format export: the model side of :mod:`fusiontrain.checkpoint.export`.

An export in fusiontrain's own layout is self-contained: ``fusiontrain_config.json`` (family,
settings, dtype, provenance), the base configs stored verbatim under the file names it lists,
``model.safetensors`` (or shards + index) with every parameter under its canonical name, and the
tokenizer and image processor files. :func:`read_export_config` reads and checks the config,
:func:`prepare_fusiontrain_export` builds the model on the meta device with the export's
safetensors as its only weight source (what training starts from, and what
:class:`~fusiontrain.source.model_source.ModelSource` loads for inference;
:func:`fusiontrain.models.load_fusiontrain_export` in one call).
No base folder is needed, and only safetensors are read.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusiontrain.families import MODEL_FAMILIES, TrainableFlags, model_family
from fusiontrain.weights.hf_checkpoint import HFCheckpoint, TensorRoute
from fusiontrain.weights.pretrained import PretrainedModel, WeightSource, check_routes_cover

EXPORT_CONFIG = "fusiontrain_config.json"
EXPORT_FORMAT = "fusiontrain-export"
EXPORT_VERSION = 1


def read_export_config(path: str | Path) -> dict:
    """The ``fusiontrain_config.json`` of an export, checked, with the base configs it names
    loaded under ``"config_dicts"``.

    Raises:
        FileNotFoundError: ``path`` has no ``fusiontrain_config.json``.
        ValueError: it is not a fusiontrain export config this version reads.
    """
    folder = Path(path)
    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {EXPORT_CONFIG}: not a fusiontrain export")
    config = json.loads(config_path.read_text())
    if config.get("format") != EXPORT_FORMAT or not isinstance(config.get("version"), int):
        raise ValueError(f"{config_path} is not a {EXPORT_FORMAT} config")
    if config["version"] > EXPORT_VERSION:
        raise ValueError(f"{config_path} has version {config['version']}, newer than {EXPORT_VERSION}")
    family = config.get("family")
    if family not in MODEL_FAMILIES:
        raise ValueError(f"{config_path}: unknown family {family!r}; known: {sorted(MODEL_FAMILIES)}")
    config["config_dicts"] = {
        name: json.loads((folder / file).read_text()) for name, file in config["configs"].items()
    }
    return config


def prepare_fusiontrain_export(
    path: str | Path,
    *,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> PretrainedModel:
    """The model of a ``fusiontrain``-format export, built on the meta device from the configs the
    export stores (the base folders are not needed), with the export's safetensors as its only
    weight source: :meth:`PretrainedModel.load` fills every parameter (also sharded)."""
    folder = Path(path)
    config = read_export_config(folder)
    family = model_family(config["family"])
    settings = {key: config[key] for key in config.get("settings", [])}
    flags = TrainableFlags(decoder_trainable, encoder_trainable, fusion_trainable)
    model = family.build_meta(config["config_dicts"], settings, flags)
    weights = HFCheckpoint(folder, require_config=False)
    source = WeightSource(weights, [TensorRoute(name, name) for name, _ in model.named_parameters()])
    check_routes_cover(source, set(weights.keys()), "fusiontrain export")
    return PretrainedModel(model, [source], init_buffers=family.init_buffers)
