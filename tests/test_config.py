"""The training configuration: loading, overrides, one-line errors, round trip, the CLI.

Every leaf key is exercised generically (from ``describe()`` and the dataclasses' type hints), so
a key added later is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from fusiontrain import config as config_module
from fusiontrain.cli import build_parser
from fusiontrain.config import ConfigError, TrainConfig, describe, load_config, save_config, section_type

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"

REQUIRED_KEYS = [
    "output_dir",
    "seed",
    "max_steps",
    "model.hf_mllama",
    "model.compose.decoder",
    "model.compose.encoder",
    "model.dtype",
    "model.decoder_trainable",
    "model.encoder_trainable",
    "model.fusion_trainable",
    "data.train.path",
    "data.format",
    "data.packing",
    "batch.micro_batch_size",
    "batch.grad_accum_steps",
    "batch.seq_len",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.max_grad_norm",
    "parallel.dp_shard",
    "parallel.dp_replicate",
    "parallel.activation_checkpointing",
    "parallel.mixed_precision",
    "loss.num_output_chunks",
    "checkpoint.every_n_steps",
    "checkpoint.resume",
    "logging.wandb.mode",
]


# -- helpers --------------------------------------------------------------------------------------


def _field_type(key: str) -> Any:
    """The declared type of a dotted leaf key, walked from TrainConfig's type hints."""
    cls: Any = TrainConfig
    *sections, leaf = key.split(".")
    for part in sections:
        cls = section_type(typing.get_type_hints(cls)[part])
    return typing.get_type_hints(cls)[leaf]


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _strip_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        assert len(options) == 1, f"unexpected union {kind}"
        return options[0]
    return kind


def _yaml_text(value: Any) -> str:
    """How a user types ``value`` on the command line (YAML flow syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _new_value(key: str, current: Any, folder: Path) -> tuple[Any, list[str]]:
    """A valid value for ``key`` different from ``current``, plus overrides it needs alongside."""
    if key == "model.hf_mllama":
        other = folder / "other_mllama"
        other.mkdir(exist_ok=True)
        return str(other), []
    if key in ("model.compose.decoder", "model.compose.encoder"):
        sibling = "model.compose.encoder" if key.endswith("decoder") else "model.compose.decoder"
        target = folder / key.rpartition(".")[2]
        target.mkdir(exist_ok=True)
        return str(target), ["model.hf_mllama=null", f"{sibling}={folder}"]
    if key == "model.compose.encoders":  # several encoders, one per modality, with a decoder
        for modality in ("image", "audio"):
            (folder / modality).mkdir(exist_ok=True)
        return {"image": str(folder / "image"), "audio": str(folder / "audio")}, ["model.hf_mllama=null", f"model.compose.decoder={folder}"]
    if key in ("model.compose.fusion_intervals", "model.compose.fusion_offsets"):  # per modality of the encoders
        (folder / "audio").mkdir(exist_ok=True)
        value = {"audio": 8} if key.endswith("intervals") else {"audio": 1}
        encoders = f"model.compose.encoders={{audio: {folder / 'audio'}}}"
        return value, ["model.hf_mllama=null", f"model.compose.decoder={folder}", encoders]
    if key in ("data.max_items_per_row", "data.max_item_tokens_per_row"):  # a modality beside images
        for modality in ("image", "audio"):
            (folder / modality).mkdir(exist_ok=True)
        encoders = f"model.compose.encoders={{image: {folder / 'image'}, audio: {folder / 'audio'}}}"
        return {"audio": 3}, ["model.hf_mllama=null", f"model.compose.decoder={folder}", encoders]
    if key == "parallel.activation_offloading":  # 'checkpointed' needs checkpointed blocks
        return "all", []
    if key == "parallel.activation_checkpointing":
        return ("2" if current != "2" else "full"), []
    if key == "model.fusiontrain_export":  # the only model source, and an existing folder
        target = folder / "export"
        target.mkdir(exist_ok=True)
        return str(target), ["model.hf_mllama=null"]
    if key == "model.fusion_init":  # an existing checkpoint folder
        target = folder / "checkpoints" / "step_5"
        target.mkdir(parents=True, exist_ok=True)
        return str(target), []
    if key == "batch.micro_batch_size":  # the global batch must stay a multiple of the micro-batch
        return current + 3, [f"batch.global_batch_size={2 * (current + 3)}"]
    if key == "batch.global_batch_size":
        return (current or 0) + 4, []
    if key == "model.lora.init_from":  # an existing adapter folder
        target = folder / "adapter"
        target.mkdir(exist_ok=True)
        return str(target), []
    if key == "model.lora.sides":
        return ("decoder", "encoder"), []
    if key == "model.lora.targets":
        return ("q_proj", "fc1"), []
    if key == "data.format":  # formats other than synthetic read a training file
        value = "caption" if current != "caption" else "chat"
        return value, [f"data.train.path={folder / 'train.jsonl'}"]
    if key in ("data.train.path", "data.eval.path"):  # a path needs a record format (not synthetic)
        return str(folder / "records.jsonl"), ["data.format=chat", f"data.train.path={folder / 'train.jsonl'}"]
    if key == "data.train.weight":  # a weight mixes sources: given alone, a list of one
        return 2.0, []
    if key == "data.eval.weight":  # parses; validation rejects it (eval sources are evaluated whole)
        return 2.0, []
    if key == "data.train.format":  # a real format reads a training file
        return "llava", [f"data.train.path={folder / 'train.jsonl'}"]
    split, _, field = key.removeprefix("data.").partition(".")
    if split in ("train", "eval") and field.partition(".")[0] in ("columns", "tags", "placeholder"):
        return f"custom-{key.replace('.', '-')}", ["data.format=sharegpt", f"data.train.path={folder / 'train.jsonl'}"]
    if key == "data.streaming":  # streams real data only
        return (not current), ["data.format=caption", f"data.train.path={folder / 'shards' / '*.tar'}"]
    kind = _strip_optional(_field_type(key))
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        others = [a for a in args if a != current]
        return (others or list(args))[0], []  # a single allowed value can only be re-set
    if origin is tuple:
        base = list(current) if current is not None else [0.5] * len(args)
        return tuple(_strip_optional(a)(v) * 0.5 + 0.25 for a, v in zip(args, base)), []
    if kind is bool:
        return (not current), []
    if kind is int:
        return (3 if current is None else (current + 3 if current != -1 else 2)), []
    if kind is float:
        return (0.5 if current is None else current + 0.5), []
    if kind is str:
        return f"custom-{key.replace('.', '-')}", []
    raise AssertionError(f"no test value for {key} of type {kind!r}; extend _new_value")


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, f"error is not one line: {text!r}"
    assert text.strip(), "empty error message"
    return text


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def base_overrides(folder: Path) -> list[str]:
    return [f"model.hf_mllama={folder}"]


ALL_KEYS = [key for key, _, _ in describe()]
# Keys of a section shared by several places that validation refuses in one of them, and why.
ALWAYS_REJECTED = {"data.eval.weight": "eval sources are each evaluated whole"}


# -- keys -------------------------------------------------------------------------------------------


def test_required_keys_exist() -> None:
    missing = [key for key in REQUIRED_KEYS if key not in ALL_KEYS]
    assert not missing, f"config keys missing: {missing}"
    assert set(typing.get_args(_field_type("optim.schedule"))) == {"constant", "linear", "cosine"}


def test_describe_covers_every_dataclass_leaf() -> None:
    """describe() lists exactly the non-section fields, with a help text for each."""

    def leaves(cls: type, prefix: str = "") -> list[str]:
        out = []
        for spec in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[spec.name]
            sections = [k for k in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(k)]  # X or X | tuple[X, ...]
            if sections:
                out += leaves(sections[0], f"{prefix}{spec.name}.")
            else:
                out.append(f"{prefix}{spec.name}")
        return out

    rows = describe()
    assert [key for key, _, _ in rows] == leaves(TrainConfig)
    assert len(set(ALL_KEYS)) == len(ALL_KEYS)
    assert all(help_text.strip() for _, _, help_text in rows)


def test_tiny_yaml_loads(base_overrides: list[str], folder: Path) -> None:
    config = load_config(TINY_YAML, base_overrides)
    assert config.model.hf_mllama == str(folder)
    # values taken from the file, not the defaults
    assert config.max_steps == 20 and config.batch.seq_len == 32 and config.optim.lr == pytest.approx(3e-3)
    assert config.loss.num_output_chunks == 4 and config.batch.global_batch_size == 8


# -- overrides --------------------------------------------------------------------------------------


def _override_via_cli(argv_overrides: list[str]) -> TrainConfig:
    """Parse like ``python -m fusiontrain train --config tiny.yaml k=v ...`` and load."""
    args = build_parser().parse_args(["train", "--config", str(TINY_YAML), *argv_overrides])
    return load_config(args.config, args.overrides)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_every_key_overrides_from_the_command_line(
    key: str, folder: Path, base_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing and coercion for every key (cross-field validation off; see
    test_every_key_override_is_applied_with_validation_on for the same overrides validated)."""
    monkeypatch.setattr(config_module, "validate", lambda config: None)
    baseline = _override_via_cli(base_overrides)
    value, companions = _new_value(key, _get(baseline, key), folder)
    kind = _strip_optional(_field_type(key))
    if len(typing.get_args(kind)) != 1 or typing.get_origin(kind) is not Literal:
        assert value != _get(baseline, key)
    config = _override_via_cli([*base_overrides, *companions, f"{key}={_yaml_text(value)}"])
    assert _get(config, key) == value
    if kind in (int, float, bool, str):
        assert type(_get(config, key)) is kind
    # nothing else changed except the companions
    touched = {key} | {c.partition("=")[0] for c in companions}
    for other in ALL_KEYS:
        if other not in touched:
            assert _get(config, other) == _get(baseline, other), other


@pytest.mark.parametrize("key", ALL_KEYS)
def test_every_key_override_is_applied_with_validation_on(key: str, folder: Path, base_overrides: list[str]) -> None:
    """With validation on, a valid override (with the companions it needs) lands in the config.
    A key whose test value validation rejects fails here: give it a valid value in _new_value."""
    baseline = load_config(TINY_YAML, base_overrides)
    value, companions = _new_value(key, _get(baseline, key), folder)
    overrides = [*base_overrides, *companions, f"{key}={_yaml_text(value)}"]
    if key in ALWAYS_REJECTED:
        with pytest.raises(ConfigError, match=ALWAYS_REJECTED[key]):
            load_config(TINY_YAML, overrides)
        return
    try:
        config = load_config(TINY_YAML, overrides)
    except ConfigError as error:
        pytest.fail(f"valid override {overrides[len(base_overrides):]} was rejected: {error}")
    assert _get(config, key) == value


@pytest.mark.parametrize(
    "override, companions, names",
    [
        ("model.fusiontrain_export={folder}", [], "model.fusiontrain_export"),  # a second model source
        ("model.fusion_init={folder}/absent", [], "'model.fusion_init'"),
        ("data.format=caption", ["data.train.path=null"], "'data.train.path'"),
        ("data.format=chat", ["data.train.path=null"], "'data.train.path'"),
        ("data.streaming=true", [], "'data.streaming'"),  # the synthetic data is not streamed
        ("data.train.path={folder}/s-*.tar", ["data.format=caption"], "set data.streaming=true"),
        ("data.eval.path={folder}/s-*.tar", ["data.format=caption", "data.train.path=t.jsonl"], "'data.eval.path'"),
        ("parallel.activation_offloading=checkpointed", [], "'parallel.activation_offloading'"),
        # frozen weights never wider than trained ones
        ("model.frozen_dtype=float32", ["model.dtype=bfloat16"], "'model.frozen_dtype'=float32 and 'model.dtype'=bfloat16"),
        # the global batch must split into whole micro-batches over the data-parallel ranks
        ("batch.global_batch_size=7", [], "batch.global_batch_size=7"),
        ("batch.global_batch_size=8", ["parallel.dp_shard=3"], "data-parallel ranks (3)"),
        ("batch.global_batch_size=8", ["parallel.dp_replicate=8"], "data-parallel ranks (8)"),
    ],
)
def test_override_without_what_it_needs_is_rejected_by_name(
    override: str, companions: list[str], names: str, folder: Path, base_overrides: list[str]
) -> None:
    message = _error(TINY_YAML, [*base_overrides, *companions, override.format(folder=folder)])
    assert names in message, message


def test_float_in_exponent_notation_is_accepted(base_overrides: list[str], tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-4 without a dot as the string '1e-4'
    import yaml

    assert yaml.safe_load("1e-4") == "1e-4"
    assert load_config(None, [*base_overrides, "optim.lr=1e-4"]).optim.lr == 1e-4
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  hf_mllama: {tmp_path}\noptim:\n  lr: 2e-5\n  eps: 1e-6\n")
    config = load_config(path)
    assert config.optim.lr == 2e-5 and type(config.optim.lr) is float and config.optim.eps == 1e-6


def test_null_clears_an_optional_key(base_overrides: list[str]) -> None:
    config = load_config(TINY_YAML, base_overrides)
    assert config.batch.global_batch_size == 8 and config.optim.max_grad_norm == 1.0
    cleared = load_config(TINY_YAML, [*base_overrides, "batch.global_batch_size=null", "optim.max_grad_norm=null"])
    assert cleared.batch.global_batch_size is None and cleared.optim.max_grad_norm is None


def test_later_override_wins_and_yaml_is_overridden(base_overrides: list[str]) -> None:
    config = load_config(TINY_YAML, [*base_overrides, "max_steps=7", "max_steps=9"])
    assert config.max_steps == 9


# -- errors -----------------------------------------------------------------------------------------


def _error(path: Any, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return _one_line(info.value)


@pytest.mark.parametrize(
    "override, names, fix",
    [
        ("optim.lrr=1", "optim.lrr", "did you mean 'optim.lr'"),
        ("optimm.lr=1", "optimm", "did you mean 'optim'"),
        ("parallel.dp_shrad=2", "parallel.dp_shrad", "did you mean 'parallel.dp_shard'"),
        ("max_steps=ten", "max_steps", "integer"),
        ("max_steps=2.5", "max_steps", "integer"),
        ("max_steps=true", "max_steps", "integer"),
        ("optim.lr=fast", "optim.lr", "number"),
        ("optim.lr=[1]", "optim.lr", "number"),
        ("optim.lr=true", "optim.lr", "number"),
        ("optim.max_grad_norm=big", "optim.max_grad_norm", "number"),
        ("data.packing=yes please", "data.packing", "true or false"),
        ("data.packing=1", "data.packing", "true or false"),
        ("optim.schedule=step", "optim.schedule", "'constant', 'linear', 'cosine'"),
        ("model.dtype=fp16", "model.dtype", "'float32', 'bfloat16'"),
        ("model.frozen_dtype=float16", "model.frozen_dtype", "'float32', 'bfloat16', 'auto'"),
        ("optim.betas=0.9", "optim.betas", "list of 2"),
        ("optim.betas=[0.9]", "optim.betas", "list of 2"),
        ("optim.betas=[0.9, x]", "optim.betas[1]", "number"),
        ("output_dir=[a, b]", "output_dir", "string"),
        ("model={a: 1}", "model.a", "known keys"),
        ("parallel.activation_checkpointing=sometimes", "parallel.activation_checkpointing", "positive integer"),
        ("parallel.activation_checkpointing=0", "parallel.activation_checkpointing", "positive integer"),
        ("parallel.activation_checkpointing=-2", "parallel.activation_checkpointing", "positive integer"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(
    override: str, names: str, fix: str, base_overrides: list[str]
) -> None:
    message = _error(TINY_YAML, [*base_overrides, override])
    assert f"'{names}'" in message, message
    assert fix in message, message


def test_missing_config_file(tmp_path: Path, base_overrides: list[str]) -> None:
    message = _error(tmp_path / "nope.yaml", base_overrides)
    assert "nope.yaml" in message and "does not exist" in message and "--config" in message


def test_invalid_yaml(tmp_path: Path, base_overrides: list[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1, 2\nmodel: {\n")
    message = _error(path, base_overrides)
    assert "broken.yaml" in message and "not valid YAML" in message and "fix the syntax" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    message = _error(path, [])
    assert "list.yaml" in message and "mapping" in message


def test_unknown_key_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(f"model:\n  hf_mllama: {tmp_path}\nbatch:\n  seq_lenn: 8\n")
    message = _error(path, [])
    assert "'batch.seq_lenn'" in message and "did you mean 'batch.seq_len'" in message


@pytest.mark.parametrize("override", ["foo", "=3", "optim.lr 3"])
def test_malformed_override(override: str, base_overrides: list[str]) -> None:
    message = _error(TINY_YAML, [*base_overrides, override])
    assert repr(override) in message and "dotted.key=value" in message


def test_missing_model_folder(tmp_path: Path) -> None:
    message = _error(TINY_YAML, [f"model.hf_mllama={tmp_path / 'absent'}"])
    assert "'model.hf_mllama'" in message and "does not exist" in message and "HF model folder" in message
    message = _error(None, ["model.hf_mllama=null", f"model.compose.decoder={tmp_path}", "model.compose.encoder=/no/such/dir"])
    assert "'model.compose.encoder'" in message and "does not exist" in message


def test_exactly_one_model_source(tmp_path: Path) -> None:
    both = _error(None, [f"model.hf_mllama={tmp_path}", f"model.compose.decoder={tmp_path}", f"model.compose.encoder={tmp_path}"])
    neither = _error(None, [])
    for message in (both, neither):
        assert "model.hf_mllama" in message and "model.compose.decoder" in message and "exactly one" in message
    half = _error(None, [f"model.compose.decoder={tmp_path}"])
    assert "'model.compose.encoder'" in half and "required" in half


def test_composed_model_with_both_folders_loads(tmp_path: Path) -> None:
    config = load_config(None, [f"model.compose.decoder={tmp_path}", f"model.compose.encoder={tmp_path}"])
    assert config.model.hf_mllama is None and config.model.compose.decoder == str(tmp_path)


def test_an_encoder_per_modality_is_configured_beside_the_one_encoder_shorthand(tmp_path: Path) -> None:
    """model.compose.encoders (modality -> folder) with per-modality intervals and offsets; it
    excludes model.compose.encoder; each mistake names its key."""
    decoder, image, audio = (tmp_path / name for name in ("decoder", "image", "audio"))
    for folder in (decoder, image, audio):
        folder.mkdir()
    both = [f"model.compose.decoder={decoder}", f"model.compose.encoders={{image: {image}, audio: {audio}}}"]
    config = load_config(None, [*both, "model.compose.fusion_intervals={audio: 8}", "model.compose.fusion_offsets={audio: 2}"])
    assert config.model.compose.encoders == {"image": str(image), "audio": str(audio)}
    assert (config.model.compose.fusion_intervals, config.model.compose.fusion_offsets) == ({"audio": 8}, {"audio": 2})
    shorthand_too = _error(None, [*both, f"model.compose.encoder={image}"])
    assert "exactly one" in shorthand_too and "model.compose.encoders" in shorthand_too
    missing = _error(None, [f"model.compose.decoder={decoder}", f"model.compose.encoders={{audio: {tmp_path / 'none'}}}"])
    assert "'model.compose.encoders.audio'" in missing and "does not exist" in missing
    unknown = _error(None, [*both, "model.compose.fusion_offsets={video: 1}"])
    assert "'model.compose.fusion_offsets' names ['video']" in unknown
    offset = _error(None, [*both, "model.compose.fusion_intervals={audio: 4}", "model.compose.fusion_offsets={audio: 4}"])
    assert "'model.compose.fusion_offsets.audio'=4" in offset and "0 <= offset < interval" in offset
    name = _error(None, [f"model.compose.decoder={decoder}", f"model.compose.encoders={{Audio: {audio}}}"])
    assert "'model.compose.encoders.Audio'" in name and "lower-case" in name
    no_decoder = _error(None, [f"model.compose.encoders={{audio: {audio}}}"])
    assert "'model.compose.decoder' is required" in no_decoder
    limits = _error(None, [*both, "data.max_items_per_row={image: 2}"])
    assert "'data.max_items_per_row' names ['image']" in limits and "data.max_images_per_row" in limits
    zero = _error(None, [*both, "data.max_item_tokens_per_row={audio: 0}"])
    assert "'data.max_item_tokens_per_row' maps modalities to counts >= 1" in zero
    lora = load_config(None, [*both, "model.lora.rank=4", "model.lora.sides=[encoder.audio]"])
    assert lora.model.lora.sides == ("encoder.audio",)
    video = _error(None, [*both, "model.lora.rank=4", "model.lora.sides=[decoder, encoder.video]"])
    assert "'encoder.video'" in video and "model.compose.encoders has no 'video'" in video


# -- round trip -------------------------------------------------------------------------------------


def test_save_config_round_trip(tmp_path: Path, base_overrides: list[str]) -> None:
    overrides = [
        *base_overrides,
        "optim.betas=[0.8, 0.99]",
        "optim.lr=1e-4",
        "optim.eps=1e-20",
        "optim.max_grad_norm=null",
        "parallel.activation_checkpointing=2",
        "output_dir=123",
        "batch.global_batch_size=null",
        "model.dtype=bfloat16",
    ]
    config = load_config(TINY_YAML, overrides)
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again == config
    assert again.parallel.activation_checkpointing == "2" and again.output_dir == "123"
    assert again.optim.betas == (0.8, 0.99) and again.optim.eps == 1e-20


# -- the CLI ----------------------------------------------------------------------------------------


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fusiontrain", "train", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_cli_bad_config_exits_2_with_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  hf_mllama: {tmp_path}\noptim:\n  lr: fast\n")
    result = _run_cli("--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "'optim.lr'" in lines[0]
    assert result.stdout == ""


def test_cli_bad_override_exits_2(tmp_path: Path) -> None:
    result = _run_cli("--config", str(TINY_YAML), f"model.hf_mllama={tmp_path}", "optim.shedule=linear", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'optim.shedule'" in lines[0], result.stderr
    assert "did you mean 'optim.schedule'" in lines[0]


def test_cli_help_config_lists_every_key(tmp_path: Path) -> None:
    result = _run_cli("--help-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {line.split(" = ")[0] for line in result.stdout.splitlines() if " = " in line and not line.startswith(" ")}
    assert listed == set(ALL_KEYS)
    for key, _, help_text in describe():
        assert help_text in result.stdout, key


# -- known gaps (reported; the markers come off when they are fixed) -----------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.max_grad_norm=-1.0", "optim.max_grad_norm"),  # clip_grad_norm_ then flips every gradient's sign
        ("optim.lr=.nan", "optim.lr"),  # nan <= 0 is False
        ("optim.lr=.inf", "optim.lr"),
        ("optim.min_lr_ratio=-1.0", "optim.min_lr_ratio"),  # the schedule's LR goes negative
    ],
)
def test_invalid_numbers_are_rejected(override: str, key: str, base_overrides: list[str]) -> None:
    message = _error(TINY_YAML, [*base_overrides, override])
    assert f"'{key}'" in message


def test_override_below_an_empty_yaml_section(tmp_path: Path) -> None:
    path = tmp_path / "empty_section.yaml"
    path.write_text("model:\noptim:\n  lr: 1e-3\n")
    config = load_config(path, [f"model.hf_mllama={tmp_path}"])
    assert config.model.hf_mllama == str(tmp_path)


def test_readme_config_table_is_generated_from_the_code() -> None:
    """docs/config.md's config table is what scripts/config_table.py writes from ``describe()``: every
    key, its default and its help, nothing stale."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "config_table.py"
    spec = importlib.util.spec_from_file_location("config_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert module.config_table() in readme, "docs/config.md's config table is stale: run python scripts/config_table.py"
    assert all(f"| `{key}` |" in readme for key, _, _ in describe())
