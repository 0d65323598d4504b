"""The model-family seam: what a checkpoint's manifest names, and what everything else asks.

A :class:`ModelFamily` knows, for its kind of fusion model:

- which config keys and pretrained folders (by *role*) it is built from, and the settings a
  checkpoint must record to rebuild it;
- its meta-device build, from the folders' ``config.json`` files alone or with its weight sources;
- its encoder's input (:class:`~fusiontrain.data.image_format.ImageFormat`) and the text side
  (tokenizer folder, image token);
- its export layout (the base configs it stores, and whether a transformers layout exists).

The trainer, data pipeline, planner, checkpoint, export and inference code call these methods;
none of them asks which family it holds. Families register in :mod:`fusiontrain.families`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.input_format import EncoderInputFormat
from fusiontrain.data.other_modality import OtherModality
from fusiontrain.weights.hf_checkpoint import TensorRoute
from fusiontrain.weights.pretrained import PretrainedModel




@dataclass(frozen=True)
class TrainableFlags:
    """What trains (see :class:`~fusiontrain.modules.DeepFusionModel`)."""

    decoder_trainable: bool = False
    encoder_trainable: bool = False
    fusion_trainable: bool = True

    def as_kwargs(self) -> dict[str, bool]:
        return {
            "decoder_trainable": self.decoder_trainable,
            "encoder_trainable": self.encoder_trainable,
            "fusion_trainable": self.fusion_trainable,
        }


@dataclass(frozen=True)
class InputFolders:
    """Where a model's text and image preprocessing come from.

    Attributes:
        text_dir: the tokenizer (and chat template) folder.
        image_dir: the image processor's folder when the tokenizer has no image token; None when
            ``text_dir`` holds a whole multimodal processor.
        image_token_id: the id to insert for each image when the tokenizer has none; None to use
            the processor's own image token.
        others: for a model with an encoder per modality, the modalities beside images: each
            one's input format, feature-extractor folder and placeholder id.
    """

    text_dir: Path
    image_dir: Path | None
    image_token_id: int | None
    others: tuple[OtherModality, ...] = ()


def read_config_json(folder: str | Path, what: str) -> dict:
    """``folder/config.json`` as a dict, or a ``FileNotFoundError`` naming ``what`` (a config key
    or a role)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing; point it at a Hugging Face model folder")
    return json.loads(path.read_text())


class ModelFamily(ABC):
    """One kind of fusion model. Subclasses fill in every method; see the module docstring.

    Attributes:
        name: what manifests and exports record in ``family``.
        roles: the pretrained folders the family is built from, by role (``{"hf_mllama"}``,
            ``{"decoder", "encoder"}``).
        config_keys: per role, the run-config key that names its folder (for messages).
        config_files: per role, the file name its ``config.json`` takes inside a fusiontrain
            export.
        hf_export: whether an export in a transformers layout exists for this family.
        hf_model_types: ``config.json`` model types of a transformers checkpoint that holds a
            whole model of this family (one folder, role ``roles[0]``).
    """

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]]
    config_keys: ClassVar[dict[str, str]]
    config_files: ClassVar[dict[str, str]]
    hf_export: ClassVar[bool] = False
    hf_model_types: ClassVar[tuple[str, ...]] = ()

    # -- roles ------------------------------------------------------------------------------------

    def roles_of(self, folders: Mapping[str, Any]) -> tuple[str, ...]:
        """The roles of one model of this family, whose folders (or configs) by role are
        ``folders``: :attr:`roles`, unless the family's roles vary from model to model (a composed
        model with an encoder per modality)."""
        return self.roles

    def config_key_of(self, role: str) -> str:
        """The run-config key that names ``role``'s folder (for messages)."""
        return self.config_keys[role]

    def config_file_of(self, role: str) -> str:
        """The file name ``role``'s ``config.json`` takes inside a fusiontrain export."""
        return self.config_files[role]

    def export_subfolder(self, role: str) -> str | None:
        """The subfolder of a fusiontrain export that holds ``role``'s processor files, or None
        for the export's top (the tokenizer's and the image processor's)."""
        return None

    def config_key_groups(self) -> list[tuple[str, ...]]:
        """The groups of run-config keys that each name a model of this family (all the keys of
        one group go together; a key may hold a mapping of folders)."""
        return [tuple(self.config_keys[role] for role in self.roles)]

    # -- from the run config ----------------------------------------------------------------------

    @abstractmethod
    def folders_from_config(self, model_config: Any) -> dict[str, str] | None:
        """The pretrained folders by role, when ``model_config`` (the ``model`` section) selects
        this family; None when it does not."""

    def settings_from_config(self, model_config: Any) -> dict[str, Any]:
        """Settings beyond the folders that a checkpoint records to rebuild the model."""
        return {}

    def check_settings(self, base: dict[str, Any]) -> None:
        """Raise ``ValueError`` when a manifest's ``base`` lacks or mistypes a setting."""

    # -- building ---------------------------------------------------------------------------------

    @abstractmethod
    def build_meta(self, configs: dict[str, dict], settings: dict[str, Any], flags: TrainableFlags) -> nn.Module:
        """The model on the meta device, from each role's ``config.json`` dict alone."""

    @abstractmethod
    def prepare(
        self, folders: dict[str, str | Path], settings: dict[str, Any], flags: TrainableFlags, *, seed: int
    ) -> PretrainedModel:
        """The model on the meta device with the weight sources that fill it (checked against
        the file headers; nothing is allocated)."""

    def init_buffers(self, model: nn.Module) -> None:
        """Rebuild non-persistent buffers after a meta-device model is allocated."""

    # -- what the model takes ---------------------------------------------------------------------

    @abstractmethod
    def image_format(self, model: nn.Module) -> ImageFormat:
        """How the model's encoder takes images."""

    def input_formats(self, model: nn.Module) -> dict[str, EncoderInputFormat]:
        """How each of the model's encoders takes its items, by modality: ``{"image":
        image_format(model)}`` for a model with one (image) encoder."""
        return {"image": self.image_format(model)}

    @abstractmethod
    def input_folders(self, folders: dict[str, str | Path], model: nn.Module) -> InputFolders:
        """Where the tokenizer and image processor of a model built from ``folders`` (by role)
        live."""

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` is of this family (for code handed a model without its family)."""

    # -- the transformers layout (families with hf_export) ----------------------------------------

    def hf_layout(self, configs: dict[str, dict]) -> tuple[list[TensorRoute], dict[str, tuple[int, ...]]]:
        """The transformers checkpoint a model of ``configs`` (by role) is stored as, worked out
        without any weight file: the routes from each tensor (current naming) to our parameters,
        and each tensor's shape. For a model whose base is no transformers folder (a fusiontrain
        export), to write it in the ``hf`` format."""
        raise NotImplementedError(f"the {self.name} family has no transformers layout")

    def hf_uses_legacy_names(self, folders: dict[str, Path]) -> bool:
        """Whether the base checkpoint in ``folders`` (by role) stores its tensors under an older
        naming of the transformers class (an export in ``base`` naming then writes that naming too)."""
        return False

    def hf_stored_name(self, name: str, *, legacy: bool) -> str:
        """The stored name of tensor ``name`` (the current transformers naming) in the export."""
        return name

    def export_config(self, configs: dict[str, dict]) -> dict[str, Any]:
        """Extra fields an export's ``fusiontrain_config.json`` records (descriptive)."""
        return {}
