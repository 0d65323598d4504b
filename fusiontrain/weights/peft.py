"""PEFT adapter folders in and out: LoRA plus the fusion weights, keyed by the transformers model.

A PEFT LoRA adapter folder holds ``adapter_config.json`` (a ``peft.LoraConfig``) and
``adapter_model.safetensors``, whose keys are the transformers model's module paths under
``base_model.model.``:

- ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` for
  each adapted linear ``<module>`` (``target_modules`` lists them, full paths);
- ``base_model.model.<module>.<tensor>`` for every tensor of each module in ``modules_to_save``:
  PEFT's way to carry modules trained in full. The fusion parameters go this way: the smallest set
  of HF modules that holds every fusion tensor (Mllama: the cross-attention decoder layers, the
  global vision layers, the projector, and ``embed_tokens`` for its new rows, written whole).

Our names map to the HF ones through the family's weight map (the routes of its transformers
checkpoint), so this works for every family with a transformers layout (``hf_export``) started
from its transformers folder. A composed model has no transformers class to key an adapter by, and
a run started from a fusiontrain export has no transformers folder for the adapter to name: both
are refused (they export merged).

``peft`` itself is an optional extra (``pip install 'fusiontrain[peft]'``), imported only here and
only when an adapter is written or read: it writes and reads ``adapter_config.json``, so the file
is exactly PEFT's. Tensors are read with ``safetensors`` (no pickle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.weights.hf_checkpoint import TensorRoute, copy_rows_into
from fusiontrain.weights.lora import LoraSettings
from fusiontrain.weights.pretrained import PretrainedModel
from fusiontrain.modules import get_fusion_params
from fusiontrain.modules.lora import LORA_A, LORA_B, lora_candidates
from fusiontrain.parallel.fsdp import canonical_parameters

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# LoraConfig options whose non-default values change the computation; fusiontrain computes only the defaults.
_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
}


def require_peft(what: str) -> Any:
    """The ``peft`` module, or an ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            f"{what} needs the optional 'peft' package: pip install 'fusiontrain[peft]' (peft==0.21.2)"
        ) from None
    return peft


@dataclass
class PeftLayout:
    """How a model's LoRA and fusion parameters are named in a PEFT adapter of its transformers
    class.

    Attributes:
        linears: our linear module name -> its HF module path, for every linear LoRA may target.
        modules_to_save: the HF modules that carry the fusion parameters.
        saved_routes: every HF tensor under ``modules_to_save`` -> the routes that fill it from our
            parameters (one, or several row ranges).
        shapes: the HF tensors' full shapes.
    """

    linears: dict[str, str]
    modules_to_save: list[str]
    saved_routes: dict[str, list[TensorRoute]]
    shapes: dict[str, tuple[int, ...]]

    def lora_key(self, parameter: str) -> str:
        """The adapter key of our LoRA parameter ``<linear>.lora_A.weight``."""
        module, which, local = parameter.rsplit(".", 2)
        return f"{PEFT_PREFIX}{self.linears[module]}.{which}.{local}"


def _module_of(hf_key: str) -> str:
    return hf_key.rsplit(".", 1)[0]


def peft_layout(pretrained: PretrainedModel, *, hf_export: bool, family_name: str) -> PeftLayout:
    """The PEFT naming of ``pretrained`` (its model built, its routes read from file headers).

    Raises:
        ValueError: the family has no transformers layout, or its layout cannot carry LoRA and the
            fusion parameters apart (a fusion module holding an adaptable linear).
    """
    if not hf_export:
        raise ValueError(
            f"this {family_name} model's base is no transformers folder (a composed model has no transformers class "
            "to key a PEFT adapter by; a run started from a fusiontrain export has no folder for the adapter to name): "
            "export it merged (python -m fusiontrain export --format fusiontrain, or --format hf where the family has a transformers layout) instead"
        )
    model = pretrained.model
    source = pretrained.sources[0]
    by_ours = {route.our_key: route for route in source.routes}
    linears = {}
    for name in lora_candidates(model, ("decoder", "encoder")):
        route = by_ours.get(f"{name}.weight")
        if route is not None and route.rows is None and route.hf_key.endswith(".weight"):
            linears[name] = _module_of(route.hf_key)
    fusion = set(get_fusion_params(model))
    fusion_modules = {_module_of(route.hf_key) for route in source.routes if route.our_key in fusion}
    kept = sorted(m for m in fusion_modules if not any(m.startswith(f"{other}.") for other in fusion_modules))
    saved_routes: dict[str, list[TensorRoute]] = {}
    for route in source.routes:
        if any(route.hf_key.startswith(f"{module}.") for module in kept):
            saved_routes.setdefault(route.hf_key, []).append(route)
    inside = [path for path in linears.values() if any(path.startswith(f"{module}.") for module in kept)]
    if inside:
        raise ValueError(f"the fusion modules {kept} hold adaptable linears {inside[:3]}: no PEFT layout carries both")
    shapes = {key: tuple(source.checkpoint.shape(key)) for key in saved_routes}
    return PeftLayout(linears, kept, saved_routes, shapes)


# -- writing --------------------------------------------------------------------------------------


def write_adapter(
    folder: Path,
    layout: PeftLayout,
    settings: LoraSettings,
    read: Callable[[str], torch.Tensor],
    dtype_of: Callable[[str], torch.dtype],
    *,
    base_model_name_or_path: str,
) -> None:
    """Write a PEFT LoRA adapter folder into ``folder`` (which exists).

    Args:
        layout: the model's PEFT naming.
        settings: the LoRA (rank, alpha, dropout, adapted linears).
        read: our parameter name -> its full tensor (trained value, or the base's).
        dtype_of: our parameter name -> the dtype to write it in.
        base_model_name_or_path: recorded in ``adapter_config.json`` (PEFT's field).
    """
    peft = require_peft("writing a PEFT adapter")
    from safetensors.torch import save_file

    missing = [name for name in settings.modules if name not in layout.linears]
    if missing:
        raise ValueError(f"adapted linears {missing[:3]} have no module of their own in the transformers model")
    tensors: dict[str, torch.Tensor] = {}
    for module in settings.modules:
        for which in (LORA_A, LORA_B):
            name = f"{module}.{which}.weight"
            tensors[layout.lora_key(name)] = read(name).to(dtype_of(name)).contiguous()
    for hf_key, routes in layout.saved_routes.items():
        parts = sorted(routes, key=lambda route: (route.rows or (0, 0))[0])
        full = torch.cat([read(route.our_key).to(dtype_of(route.our_key)) for route in parts], dim=0)
        tensors[f"{PEFT_PREFIX}{hf_key}"] = full.reshape(layout.shapes[hf_key]).contiguous()
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=[layout.linears[module] for module in settings.modules],
        modules_to_save=list(layout.modules_to_save),
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# -- reading --------------------------------------------------------------------------------------


def _adapter_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"PEFT adapter folder {folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    with safe_open(str(path), "pt") as file:
        return list(file.keys())


def adapter_settings(folder: str | Path, layout: PeftLayout) -> LoraSettings:
    """The LoRA of PEFT adapter ``folder`` in our terms: its rank, alpha and dropout, and the
    linears its weights adapt (mapped to our module names).

    Raises:
        ValueError: the adapter is not a plain LoRA of this base (another method, an option
            fusiontrain does not compute, or a module this model does not have).
    """
    folder = Path(folder)
    peft = require_peft("reading a PEFT adapter (model.lora.init_from, generate --adapter)")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}")
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as error:
        raise ValueError(f"PEFT adapter {folder}: {ADAPTER_CONFIG} is not a LoRA config ({error})") from None
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "LORA":
        raise ValueError(f"PEFT adapter {folder} is a {peft_type} adapter; only LoRA is read")
    for option, default in _UNSUPPORTED.items():
        value = getattr(config, option, default)
        if value != default and value not in (None, {}, []):
            raise ValueError(f"PEFT adapter {folder}: {option}={value!r} is not supported (only {default!r})")
    by_path = {path: ours for ours, path in layout.linears.items()}
    modules = []
    for key in _adapter_keys(folder):
        if key.endswith(f".{LORA_A}.weight"):
            path = key.removeprefix(PEFT_PREFIX).removesuffix(f".{LORA_A}.weight")
            if path not in by_path:
                raise ValueError(f"PEFT adapter {folder} adapts {path!r}, which is no adaptable linear of this base model")
            modules.append(by_path[path])
    if not modules:
        raise ValueError(f"PEFT adapter {folder} holds no lora_A weights")
    order = list(layout.linears)
    modules.sort(key=order.index)
    return LoraSettings(int(config.r), float(config.lora_alpha), float(config.lora_dropout), tuple(modules))


def load_adapter(folder: str | Path, layout: PeftLayout, settings: LoraSettings, params: Mapping[str, torch.Tensor]) -> None:
    """Copy PEFT adapter ``folder``'s LoRA weights, and its ``modules_to_save`` fusion weights,
    into the (allocated, possibly sharded) parameters ``params`` (canonical names) in place. Every
    adapter tensor must have a home and every LoRA parameter must be filled.

    Raises:
        ValueError: naming the first tensors without a home, or LoRA parameters not filled.
    """
    from safetensors import safe_open

    folder = Path(folder)
    # adapter key -> (the shape it must have, [(our parameter, its rows of the key's tensor or None)])
    homes: dict[str, tuple[tuple[int, ...], list[tuple[str, tuple[int, int] | None]]]] = {}
    for module in settings.modules:
        for which in (LORA_A, LORA_B):
            name = f"{module}.{which}.weight"
            homes[layout.lora_key(name)] = (tuple(params[name].shape), [(name, None)])
    for hf_key, routes in layout.saved_routes.items():
        homes[f"{PEFT_PREFIX}{hf_key}"] = (layout.shapes[hf_key], [(route.our_key, route.rows) for route in routes])
    filled, homeless = set(), []
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as file:
        for key in file.keys():
            if key not in homes:
                homeless.append(key)
                continue
            expected, targets = homes[key]
            tensor = file.get_tensor(key)
            if tuple(tensor.shape) != expected:  # before any reshape, which could make a wrong shape fit
                raise ValueError(
                    f"PEFT adapter {folder}: {key} has shape {tuple(tensor.shape)}, but this model needs "
                    f"{expected}; was the adapter trained on another base model or LoRA rank?"
                )
            for name, rows in targets:
                param = params[name]
                if rows is None:
                    part = tensor.reshape(param.shape)
                else:  # the inverse of save_adapter: our parameters' rows, concatenated, reshaped to HF's
                    part = tensor.reshape(-1, *param.shape[1:])[rows[0] : rows[1]]
                with torch.no_grad():
                    copy_rows_into(param, lambda start, stop, part=part, param=param: part[start:stop].to(param.dtype))
                filled.add(name)
    lora = [f"{module}.{which}.weight" for module in settings.modules for which in (LORA_A, LORA_B)]
    unfilled = [name for name in lora if name not in filled]
    if homeless or unfilled:
        raise ValueError(
            f"PEFT adapter {folder} does not fit this model: tensors without a parameter {homeless[:3]}, "
            f"LoRA parameters it does not fill {unfilled[:3]}"
        )


def adapted_model_loader(folder: str | Path, layout: PeftLayout, settings: LoraSettings) -> Callable[[nn.Module], None]:
    """``load(model)``: :func:`load_adapter` into ``model``'s canonical parameters."""

    def load(model: nn.Module) -> None:
        load_adapter(folder, layout, settings, canonical_parameters(model))

    return load
