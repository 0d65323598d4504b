"""The model a run starts from: :class:`ModelSource`.

A source is a model family (:mod:`fusiontrain.families`), the folders its weights come from, the
settings that rebuild it (a composed model's fusion interval, say), and where those weights are:

- **Hugging Face folders**, by the family's roles (``hf_mllama``; ``decoder`` + ``encoder``);
- **a fusiontrain export** (``python -m fusiontrain export --format fusiontrain``): one folder
  holding the base configs, every weight, and the tokenizer and processor files, whatever the
  family (:mod:`fusiontrain.source.export`).

Everything that builds a model from its base asks the source: training (prepare, then load into
the sharded model), the planner and ``prepare`` (build on the meta device from ``config.json``
alone), checkpoints (the manifest's ``base`` entry, and the source read back from it), export and
inference (the base of a checkpoint, tokenizer and processor folders). Only this module knows the
two kinds apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.families import MODEL_FAMILIES, InputFolders, ModelFamily, TrainableFlags, model_family
from fusiontrain.families.model import read_config_json
from fusiontrain.source.export import prepare_fusiontrain_export, read_export_config
from fusiontrain.weights.hf_checkpoint import HFLayout, materialize
from fusiontrain.weights.pretrained import PretrainedModel

# The role a manifest records a fusiontrain export under, in place of the family's own roles.
EXPORT_ROLE = "fusiontrain_export"
# The config key that names a fusiontrain export (the families name the keys of their HF folders).
EXPORT_CONFIG_KEY = "model.fusiontrain_export"


def config_key_groups() -> list[tuple[str, ...]]:
    """The groups of ``model.*`` config keys that each name a model a run can start from: one per
    family (its folders' keys, which go together), and the fusiontrain export's. A run config sets
    exactly one group (:func:`fusiontrain.config.validate` asks)."""
    groups = [group for family in MODEL_FAMILIES.values() for group in family.config_key_groups()]
    return [*groups, (EXPORT_CONFIG_KEY,)]


@dataclass(frozen=True)
class ModelSource:
    """A family, its weight folders and settings, and their kind (see the module docstring).

    Attributes:
        family: the model family.
        folders: where the weights are: the family's HF folders by role, or one fusiontrain export
            (``{EXPORT_ROLE: folder}``), as a checkpoint's manifest records them.
        settings: what rebuilds the model beyond its folders' configs (recorded in manifests).
    """

    family: ModelFamily
    folders: Mapping[str, Path]
    settings: Mapping[str, Any] = field(default_factory=dict)

    # -- where a source comes from ----------------------------------------------------------------

    @classmethod
    def from_config(cls, model_config: Any) -> ModelSource:
        """The source the run config's ``model`` section names (``model.fusiontrain_export``, or
        the folder keys of one family).

        Raises:
            ValueError: no family, or more than one, is configured.
        """
        if model_config.fusiontrain_export is not None:
            return cls.from_export(model_config.fusiontrain_export)
        chosen = [
            (family, folders)
            for family in MODEL_FAMILIES.values()
            if (folders := family.folders_from_config(model_config)) is not None
        ]
        if len(chosen) != 1:
            keys = ", or ".join(" + ".join(group) for group in config_key_groups())
            raise ValueError(f"the model config must name exactly one model: set {keys}")
        family, folders = chosen[0]
        return cls(family, {role: Path(folder) for role, folder in folders.items()}, family.settings_from_config(model_config))

    @classmethod
    def from_export(cls, folder: str | Path) -> ModelSource:
        """A fusiontrain-format export: its family and settings are in its own config."""
        exported = read_export_config(folder)
        settings = {key: exported[key] for key in exported.get("settings", [])}
        return cls(model_family(exported["family"]), {EXPORT_ROLE: Path(folder)}, settings)

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> ModelSource:
        """A HF folder holding a whole model of a family with a transformers layout (Llama 3.2
        Vision), picked by its ``config.json`` model type.

        Raises:
            ValueError: no family reads that model type as a whole model.
        """
        model_type = read_config_json(folder, str(folder)).get("model_type")
        for family in MODEL_FAMILIES.values():
            if model_type in family.hf_model_types:
                return cls(family, {family.roles[0]: Path(folder)})
        raise ValueError(f"{folder} holds a {model_type!r} model, which no fusion model family reads directly")

    @classmethod
    def from_manifest(cls, base: Mapping[str, Any], folders: Mapping[str, Path]) -> ModelSource:
        """The source a checkpoint's manifest records in ``base`` (``family``, ``folders``, the
        settings), with its folders resolved to ``folders`` (``checkpoint.layout.base_folders``).

        Raises:
            ValueError: the recorded export holds a model of another family.
        """
        family = model_family(base["family"])
        if EXPORT_ROLE in folders:
            source = cls.from_export(folders[EXPORT_ROLE])
            if source.family is not family:
                raise ValueError(
                    f"the checkpoint says family {family.name!r}, its base export {folders[EXPORT_ROLE]} holds a "
                    f"{source.family.name!r} model"
                )
            return source
        settings = {key: value for key, value in base.items() if key not in ("family", "folders")}
        return cls(family, dict(folders), settings)

    @staticmethod
    def recorded_roles(base: Mapping[str, Any]) -> tuple[str, ...]:
        """The folders a manifest's ``base`` must name: a fusiontrain export, or its family's roles."""
        if EXPORT_ROLE in base["folders"]:
            return (EXPORT_ROLE,)
        return model_family(base["family"]).roles_of(base["folders"])

    # -- what it is -------------------------------------------------------------------------------

    @property
    def export(self) -> Path | None:
        """The fusiontrain export the weights come from, or None for HF folders."""
        folder = self.folders.get(EXPORT_ROLE)
        return None if folder is None else Path(folder)

    @property
    def has_hf_layout(self) -> bool:
        """Whether the model's base is a transformers checkpoint that a PEFT adapter can name (a
        family with a transformers layout, started from its HF folder). An ``hf`` export needs only
        the family's layout (:meth:`hf_layout`)."""
        return self.family.hf_export and self.export is None

    def hf_layout(self, pretrained: PretrainedModel) -> HFLayout:
        """The transformers checkpoint layout of this source's model (``pretrained``: what
        :meth:`prepare` returned). From an HF folder: its own tensors' names, shapes and dtypes, and
        its naming. From a fusiontrain export: the family's layout worked out from the stored
        config, each tensor in the dtype the export stores its parameters in, in the older naming
        (what transformers' ``save_pretrained`` writes).

        Raises:
            ValueError: the family has no transformers layout.
        """
        if not self.family.hf_export:
            raise ValueError(f"a {self.family.name} model has no transformers layout")
        (source,) = pretrained.sources
        checkpoint = source.checkpoint
        if self.export is None:
            keys = {route.hf_key for route in source.routes}
            return HFLayout(
                list(source.routes),
                {key: tuple(checkpoint.shape(key)) for key in keys},
                {key: checkpoint.dtype(key) for key in keys},
                self.family.hf_uses_legacy_names({role: Path(folder) for role, folder in self.folders.items()}),
            )
        routes, shapes = self.family.hf_layout(self.configs())
        dtypes: dict[str, torch.dtype] = {}
        for route in routes:  # the export stores each parameter under its own name
            dtypes.setdefault(route.hf_key, checkpoint.dtype(route.our_key))
        return HFLayout(routes, shapes, dtypes, legacy_names=True)

    def folder_of(self, role: str) -> Path:
        """The folder that holds role ``role``'s config, tokenizer or processor files (an export
        holds every role's: at its top, or in the subfolder its family names for the role)."""
        if self.export is None:
            return Path(self.folders[role])
        sub = self.family.export_subfolder(role)
        return self.export if sub is None else self.export / sub

    def manifest_entry(self) -> dict[str, Any]:
        """What a checkpoint's manifest records in ``base``: the family, the folders (absolute)
        and the settings."""
        folders = {role: str(Path(folder).resolve()) for role, folder in self.folders.items()}
        return {"family": self.family.name, "folders": folders, **self.settings}

    def configs(self) -> dict[str, dict]:
        """Each role's ``config.json`` as a dict (an export stores them under its own names).

        Raises:
            FileNotFoundError: a folder has no ``config.json`` (the message names its config key).
        """
        if self.export is not None:
            return read_export_config(self.export)["config_dicts"]
        return {
            role: read_config_json(folder, f"config key '{self.family.config_key_of(role)}'")
            for role, folder in self.folders.items()
        }

    # -- building ---------------------------------------------------------------------------------

    def prepare(self, flags: TrainableFlags = TrainableFlags(), *, seed: int = 0) -> PretrainedModel:
        """The model on the meta device and the weight sources that fill it (checked against the
        file headers; nothing is allocated). ``seed``: the fresh parameters' initial values."""
        if self.export is not None:
            return prepare_fusiontrain_export(self.export, **flags.as_kwargs())
        return self.family.prepare(self.folders, dict(self.settings), flags, seed=seed)

    def build_meta(self, flags: TrainableFlags = TrainableFlags()) -> nn.Module:
        """The model on the meta device from the configs alone: no weight is read or needed."""
        if self.export is not None:
            return prepare_fusiontrain_export(self.export, **flags.as_kwargs()).model
        return self.family.build_meta(self.configs(), dict(self.settings), flags)

    def load(
        self,
        flags: TrainableFlags = TrainableFlags(),
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> nn.Module:
        """The model allocated in ``dtype`` on ``device`` and filled (one process, no sharding)."""
        pretrained = self.prepare(flags, seed=seed)
        materialize(pretrained.model.to(dtype), device)
        pretrained.load()
        return pretrained.model

    # -- what the model takes ---------------------------------------------------------------------

    def input_folders(self, model: nn.Module) -> InputFolders:
        """Where ``model``'s tokenizer and image processor are (an export holds both)."""
        folders = {role: self.folder_of(role) for role in self.family.roles_of(self.folders if self.export is None else self.configs())}
        return self.family.input_folders(folders, model)
