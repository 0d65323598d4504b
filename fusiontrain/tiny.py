"""Tiny, deterministic Hugging Face checkpoints for the demo, tests and benchmarks.

A public helper, installed with the package on purpose: it backs ``python -m fusiontrain
make-tiny`` (checkpoints for trying ``configs/tiny.yaml``) and ``python -m fusiontrain demo``, and
lets users test their own code against real checkpoint folders. fusiontrain's tests and benchmarks
use it too; test-only fixtures live in ``tests/helpers``, which is not installed.

Everything here is built from config objects (never from the hub), seeded, and written with
``save_pretrained`` (safetensors) into a caller-supplied folder, so tests can exercise the real
loading paths on checkpoints that take milliseconds to build.

Shared shapes (kept in sync on purpose so fixtures can be combined):

* text side: vocab 128, hidden 64, 4 heads / 2 KV heads (head_dim 16), MLP 128, Llama-3 RoPE
  (theta 5e5, factor 8, low/high freq factor 1/4, original context 64, so with head_dim 16 all
  three branches of the llama3 frequency rule are hit), RMSNorm eps 1e-5, pad/bos/eos = 0/1/2;
* image token ``<|image|>`` has id 128 == text vocab size, i.e. it lives in the "extra" embedding
  rows (HF Mllama allocates ``vocab_size + 8`` rows, torchtune uses a fusion embedding);
* chat: Llama 3 header / end-of-turn specials and a Llama-3.2-Vision-style chat template
  (:data:`TINY_CHAT_TEMPLATE`) saved with the tokenizer and the Mllama processor;
* vision side: 28x28 tiles of 14x14 patches -> 4 patches + 1 CLS = 5 tokens per tile;
* audio side (Whisper): 16 kHz, 16 mel bins, a 1 s window of 100 frames -> at most 50 tokens per
  clip.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# Shared constants
# --------------------------------------------------------------------------------------------

TEXT_VOCAB_SIZE = 128
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
UNK_TOKEN_ID = 3
IMAGE_TOKEN_ID = 128

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
UNK_TOKEN = "<|unk|>"
IMAGE_TOKEN = "<|image|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"

# Llama 3.2 Vision's chat template, reduced to what the tiny models need: BOS, then per message a
# header and the content (a string, or a list of ``{"type": "image"}`` -> ``<|image|>`` and
# ``{"type": "text", "text": ...}`` items), closed by ``<|eot_id|>``; no system-prompt or tool
# logic. Assistant turns (content and ``<|eot_id|>``) are wrapped in ``{% generation %}`` so HF's
# ``return_assistant_tokens_mask`` works, which gives tests an independent assistant mask.
TINY_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(message['content']) + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- render_content(message['content']) + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

IMAGE_SIZE = 28
PATCH_SIZE = 14

# Distinct, non-zero gate values (cycled) so an image really reaches the logits.
_GATE_VALUES = (0.3, -0.5, 0.7, -0.2, 0.45, -0.65, 0.25, -0.35)


def _llama3_rope_parameters() -> dict[str, Any]:
    """RoPE settings shared by the tiny Mllama text model and the tiny Llama."""
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def _prepare_folder(folder: str | Path) -> Path:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def tiny_vocab() -> list[str]:
    """The 128 base tokens of the tiny tokenizer, index == id.

    Ids 0-3 are ``<|pad|>``, ``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|unk|>``; then single
    characters (letters, digits, space, newline, punctuation); then the chat specials
    ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``; the rest are reserved specials.
    ``<|image|>`` (id 128) is added on top of these as an added special token.
    """
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    chars = list("abcdefghijklmnopqrstuvwxyz")
    chars += list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    chars += list("0123456789")
    chars += [" ", "\n"] + list(".,!?;:'\"-()/")
    vocab = specials + chars + [START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN]
    n_reserved = TEXT_VOCAB_SIZE - len(vocab)
    vocab += [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)]
    assert len(vocab) == TEXT_VOCAB_SIZE
    return vocab


def build_tiny_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` matching the tiny models' special ids.

    Every character is one token (unknown characters map to ``<|unk|>``), decoding concatenates
    tokens back, and, like Llama 3, encoding with ``add_special_tokens=True`` prepends
    ``<|begin_of_text|>`` (no EOS is appended). ``<|image|>`` is an added special token with id 128.
    The chat template is :data:`TINY_CHAT_TEMPLATE`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # One piece per character; "[\s\S]" (not ".") so that newlines are characters too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    special = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    special += [START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN]
    special += [t for t in vocab if t.startswith("<|reserved_special_token_")]
    tok.add_special_tokens(special)
    tok.add_special_tokens([IMAGE_TOKEN])
    assert tok.token_to_id(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=256,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def save_tiny_tokenizer(folder: str | Path) -> Path:
    """Save the tiny tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) into ``folder``."""
    path = _prepare_folder(folder)
    build_tiny_tokenizer().save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Mllama
# --------------------------------------------------------------------------------------------


def tiny_mllama_config(**overrides: Any) -> Any:
    """A tiny ``transformers.MllamaConfig`` (eager attention).

    ``overrides`` may contain top-level ``MllamaConfig`` fields, or ``text_config`` /
    ``vision_config`` dicts whose entries update the tiny defaults of that sub-config.
    """
    from transformers import MllamaConfig

    text_kwargs: dict[str, Any] = {
        "vocab_size": TEXT_VOCAB_SIZE,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "cross_attention_layers": [1, 4],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "rope_parameters": _llama3_rope_parameters(),
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "tie_word_embeddings": False,
    }
    vision_kwargs: dict[str, Any] = {
        "hidden_size": 32,
        "attention_heads": 4,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_global_layers": 2,
        "intermediate_layers_indices": [1, 3],
        "vision_output_dim": 32 * (1 + 2),
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "max_num_tiles": 2,
        "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        "norm_eps": 1e-5,
    }
    text_kwargs.update(overrides.pop("text_config", None) or {})
    vision_kwargs.update(overrides.pop("vision_config", None) or {})
    top: dict[str, Any] = {"image_token_index": IMAGE_TOKEN_ID}
    top.update(overrides)
    config = MllamaConfig(text_config=text_kwargs, vision_config=vision_kwargs, **top)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def set_nonzero_mllama_gates(model: torch.nn.Module) -> None:
    """Give every gate that HF initialises to zero a distinct non-zero value.

    Covers the text cross-attention gates (``cross_attn_attn_gate`` / ``cross_attn_mlp_gate``) and
    the vision gates of the positional and pre/post tile embeddings, so that both an image and its
    aspect ratio change the logits. Works on ``MllamaForConditionalGeneration`` or ``MllamaModel``.
    """
    k = 0

    def nxt() -> float:
        nonlocal k
        val = _GATE_VALUES[k % len(_GATE_VALUES)] * (1.0 + 0.05 * (k // len(_GATE_VALUES)))
        k += 1
        return val

    found = 0
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
            param.fill_(nxt())
            found += 1
        elif leaf == "gate" and any(
            part in name
            for part in (
                "gated_positional_embedding",
                "pre_tile_positional_embedding",
                "post_tile_positional_embedding",
            )
        ):
            param.fill_(nxt())
            found += 1
    if found == 0:
        raise ValueError("no Mllama gates found on the given module")


def save_tiny_mllama(
    folder: str | Path,
    *,
    seed: int = 0,
    nonzero_gates: bool = True,
    sharded: bool = False,
    config: Any = None,
    save_tokenizer: bool = True,
    save_processor: bool = True,
) -> tuple[Path, Any]:
    """Build, seed and save a tiny ``MllamaForConditionalGeneration``.

    Args:
        folder: where to write (created if needed).
        seed: ``torch.manual_seed`` used before building the model and for the extra rows.
        nonzero_gates: set all zero-initialised gates to distinct non-zero values (see
            :func:`set_nonzero_mllama_gates`), so images affect the logits.
        sharded: save with a small ``max_shard_size`` so there are several
            ``model-0000x-of-0000y.safetensors`` files plus ``model.safetensors.index.json``.
        config: a config to use instead of :func:`tiny_mllama_config`.
        save_tokenizer: also save the tiny tokenizer (:func:`save_tiny_tokenizer`).
        save_processor: also save an ``MllamaImageProcessorPil`` for 28px tiles, 2 tiles max,
            so that ``AutoProcessor.from_pretrained(folder)`` gives an ``MllamaProcessor`` with
            the tiny chat template (needs ``save_tokenizer``).

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import MllamaForConditionalGeneration

    path = _prepare_folder(folder)
    config = tiny_mllama_config() if config is None else config
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    model.eval()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        n_base = config.text_config.vocab_size
        gen = torch.Generator().manual_seed(seed + 1)
        extra = torch.randn(emb.shape[0] - n_base, emb.shape[1], generator=gen)
        emb[n_base:] = extra.to(emb.dtype) * config.text_config.initializer_range
    if nonzero_gates:
        set_nonzero_mllama_gates(model)
    if sharded:
        model.save_pretrained(path, max_shard_size="300KB")
    else:
        model.save_pretrained(path)
    if save_tokenizer:
        save_tiny_tokenizer(path)
        if save_processor:
            _save_mllama_processor(path, config)
    return path, model


def _save_mllama_processor(path: Path, config: Any) -> None:
    from transformers import AutoTokenizer, MllamaImageProcessorPil, MllamaProcessor

    vc = config.vision_config
    image_processor = MllamaImageProcessorPil(
        size={"height": vc.image_size, "width": vc.image_size},
        max_image_tiles=vc.max_num_tiles,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    processor.save_pretrained(path)


# --------------------------------------------------------------------------------------------
# Llama decoder
# --------------------------------------------------------------------------------------------


def _tiny_text_kwargs() -> dict[str, Any]:
    """The sizes every tiny causal LM here shares (the tiny Mllama's text shapes)."""
    return {
        "vocab_size": TEXT_VOCAB_SIZE,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "tie_word_embeddings": False,
    }


def _save_causal_lm(path: Path, model: Any, *, save_tokenizer: bool) -> tuple[Path, Any]:
    """Save ``model`` (in eval mode) and, optionally, the tiny tokenizer into ``path``."""
    model.eval()
    model.save_pretrained(path)
    if save_tokenizer:
        save_tiny_tokenizer(path)
    return path, model


def tiny_llama_config(**overrides: Any) -> Any:
    """A tiny ``transformers.LlamaConfig`` (eager attention), same text shapes as the Mllama."""
    from transformers import LlamaConfig

    kwargs = {**_tiny_text_kwargs(), "rope_parameters": _llama3_rope_parameters(), **overrides}
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def save_tiny_llama(
    folder: str | Path,
    *,
    seed: int = 0,
    config: Any = None,
    save_tokenizer: bool = True,
) -> tuple[Path, Any]:
    """Build, seed and save a tiny ``LlamaForCausalLM`` (and the tiny tokenizer).

    Note the tokenizer's ``<|image|>`` id (128) is outside this model's 128-row embedding: a
    fusion model built on it must add rows for it.

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import LlamaForCausalLM

    path = _prepare_folder(folder)
    config = tiny_llama_config() if config is None else config
    torch.manual_seed(seed)
    return _save_causal_lm(path, LlamaForCausalLM(config), save_tokenizer=save_tokenizer)


# --------------------------------------------------------------------------------------------
# CLIP / SigLIP vision towers
# --------------------------------------------------------------------------------------------

_TINY_VISION_KWARGS: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}


def tiny_clip_vision_config(**overrides: Any) -> Any:
    """A tiny ``transformers.CLIPVisionConfig`` (eager attention)."""
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(**{**_TINY_VISION_KWARGS, "projection_dim": 32, **overrides})
    config._attn_implementation = "eager"
    return config


def tiny_siglip_vision_config(**overrides: Any) -> Any:
    """A tiny ``transformers.SiglipVisionConfig`` (eager attention)."""
    from transformers import SiglipVisionConfig

    config = SiglipVisionConfig(**{**_TINY_VISION_KWARGS, **overrides})
    config._attn_implementation = "eager"
    return config


def save_tiny_clip_vision(folder: str | Path, *, seed: int = 0) -> tuple[Path, Any]:
    """Build, seed and save a tiny ``CLIPVisionModel`` plus a 28px ``CLIPImageProcessorPil``.

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    path = _prepare_folder(folder)
    torch.manual_seed(seed)
    model = CLIPVisionModel(tiny_clip_vision_config())
    model.eval()
    model.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    ).save_pretrained(path)
    return path, model


def save_tiny_siglip_vision(folder: str | Path, *, seed: int = 0) -> tuple[Path, Any]:
    """Build, seed and save a tiny ``SiglipVisionModel`` plus a 28px ``SiglipImageProcessorPil``.

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import SiglipImageProcessorPil, SiglipVisionModel

    path = _prepare_folder(folder)
    torch.manual_seed(seed)
    model = SiglipVisionModel(tiny_siglip_vision_config())
    model.eval()
    model.save_pretrained(path)
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path, model


# --------------------------------------------------------------------------------------------
# Qwen3 decoder and SigLIP2 NaFlex vision tower
# --------------------------------------------------------------------------------------------

# SigLIP2 NaFlex: 4 px patches, at most 16 per image (so a 16x16 px image is one full 4x4 grid).
NAFLEX_PATCH_SIZE = 4
NAFLEX_MAX_PATCHES = 16


def tiny_qwen3_config(**overrides: Any) -> Any:
    """A tiny ``transformers.Qwen3Config`` (eager attention), same text shapes as the tiny Llama
    except ``head_dim`` 32 (not ``hidden_size / num_attention_heads`` = 16, so the field must be
    read), default RoPE with theta 1e6, RMSNorm eps 1e-6 and a tied LM head
    (``tie_word_embeddings``, as small Qwen3 checkpoints have: no ``lm_head.weight`` is stored)."""
    from transformers import Qwen3Config

    kwargs = {
        **_tiny_text_kwargs(),
        "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        **overrides,
    }
    config = Qwen3Config(**kwargs)
    config._attn_implementation = "eager"
    return config


def save_tiny_qwen3(
    folder: str | Path,
    *,
    seed: int = 0,
    config: Any = None,
    save_tokenizer: bool = True,
) -> tuple[Path, Any]:
    """Build, seed and save a tiny ``Qwen3ForCausalLM`` (and the tiny tokenizer).

    Every RMSNorm weight (the per-head ``q_norm`` / ``k_norm`` included) is set to
    ``1 + 0.3 N(0, 1)``: HF initialises them to ones, which would hide a missing or misplaced norm.
    As with :func:`save_tiny_llama`, the tokenizer's ``<|image|>`` id (128) is outside this model's
    128-row embedding: a fusion model built on it must add rows for it.

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import Qwen3ForCausalLM

    path = _prepare_folder(folder)
    config = tiny_qwen3_config() if config is None else config
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
    return _save_causal_lm(path, model, save_tokenizer=save_tokenizer)


def tiny_siglip2_naflex_config(**overrides: Any) -> Any:
    """A tiny ``transformers.Siglip2VisionConfig`` (eager attention): width 32, 2 layers, 4 heads,
    :data:`NAFLEX_PATCH_SIZE` px patches and at most :data:`NAFLEX_MAX_PATCHES` patches per image
    (``num_patches``, the processor's ``max_num_patches``)."""
    from transformers import Siglip2VisionConfig

    kwargs: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "patch_size": NAFLEX_PATCH_SIZE,
        "num_patches": NAFLEX_MAX_PATCHES,
    }
    kwargs.update(overrides)
    config = Siglip2VisionConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def save_tiny_siglip2_naflex(folder: str | Path, *, seed: int = 0) -> tuple[Path, Any]:
    """Build, seed and save a tiny SigLIP2 NaFlex ``Siglip2VisionModel`` plus a
    ``Siglip2ImageProcessorPil`` with the same patch size and ``max_num_patches``.

    The processor resizes each image, keeping its aspect ratio, to at most 16 patches of 4 px, so
    images of different shapes give different token counts (a 64x16 image (width x height) gets
    2x8 = 16 patches, a 20x44 one 5x3 = 15).

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionModel

    path = _prepare_folder(folder)
    config = tiny_siglip2_naflex_config()
    torch.manual_seed(seed)
    model = Siglip2VisionModel(config)
    model.eval()
    model.save_pretrained(path)
    Siglip2ImageProcessorPil(patch_size=config.patch_size, max_num_patches=config.num_patches).save_pretrained(path)
    return path, model


# --------------------------------------------------------------------------------------------
# Whisper audio encoder
# --------------------------------------------------------------------------------------------

# A 1 s window at 16 kHz: 100 frames of 10 ms, 50 encoder positions (real checkpoints: 30 s, 3000,
# 1500), so tests run the tower on a short window.
WHISPER_CHUNK_SECONDS = 1
WHISPER_MEL_BINS = 16
WHISPER_SOURCE_POSITIONS = 50


def tiny_whisper_config(**overrides: Any) -> Any:
    """A tiny ``transformers.WhisperConfig``: width 32, 2 encoder and 2 decoder layers of 4 heads,
    :data:`WHISPER_MEL_BINS` mel bins and a window of ``2 x`` :data:`WHISPER_SOURCE_POSITIONS`
    frames; a 64-token decoder vocabulary with its special ids inside it."""
    from transformers import WhisperConfig

    kwargs: dict[str, Any] = {
        "vocab_size": 64,
        "num_mel_bins": WHISPER_MEL_BINS,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_source_positions": WHISPER_SOURCE_POSITIONS,
        "max_target_positions": 32,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 3,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
    }
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def save_tiny_whisper(folder: str | Path, *, seed: int = 0) -> tuple[Path, Any]:
    """Build, seed and save a tiny ``WhisperModel`` (:func:`tiny_whisper_config`) plus a
    ``WhisperFeatureExtractor`` for its window: :data:`WHISPER_MEL_BINS` mel bins, 16 kHz, a
    :data:`WHISPER_CHUNK_SECONDS` s chunk (100 frames of 160 samples).

    Every LayerNorm weight and bias is perturbed (``1 + 0.3 N(0, 1)`` and ``0.3 N(0, 1)``): HF
    initialises them to ones and zeros, which would hide a missing or misplaced one.

    Returns:
        ``(path, model)`` with the model in eval mode, exactly as saved.
    """
    from transformers import WhisperFeatureExtractor, WhisperModel

    path = _prepare_folder(folder)
    config = tiny_whisper_config()
    torch.manual_seed(seed)
    model = WhisperModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                noise = 0.3 * torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + noise if name.endswith("weight") else noise)
    model.eval()
    model.save_pretrained(path)
    WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16_000, hop_length=160, chunk_length=WHISPER_CHUNK_SECONDS
    ).save_pretrained(path)
    return path, model
