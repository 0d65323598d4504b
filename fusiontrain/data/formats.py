"""Records -> :class:`~fusiontrain.data.batch.Sample` s: tokens, shifted labels, images, image spans.

Two record formats of our own (``data.format``), and three that open data ships in (``llava``,
``sharegpt``, ``cauldron``: :mod:`fusiontrain.data.conversations` reads each record of those as a
``chat`` record, then it goes the ``chat`` way):

- ``caption``: ``{"image": <ref>, "text": "..."}``. Tokens: BOS (when the tokenizer has one), the
  image token, the caption, EOS. This is Meta's Llama 3.2 layout (``ChatFormat.encode_content``:
  BOS, ``<|image|>``, text). ``MllamaProcessor`` on ``"<|image|>" + caption`` differs by one token:
  it inserts a second BOS after the leading image tokens (``build_string_from_input``) and the
  tokenizer adds its own BOS in front, giving ``BOS <|image|> BOS caption``; we do not duplicate BOS.
- ``chat``: ``{"images": [<ref>, ...], "messages": [{"role": ..., "content": ...}, ...]}`` (the
  TRL / HF processor shape). ``content`` is a string or a list of ``{"type": "image"}`` and
  ``{"type": "text", "text": ...}`` items; the k-th image item (in rendering order) is
  ``images[k]``. Roles: system, user, assistant. Rendered with the model's chat template
  (``apply_chat_template(..., tokenize=False)``), then tokenized without adding special tokens
  (the template writes BOS), as HF's ``apply_chat_template(tokenize=True)`` does. A record with
  images and nothing that places them (no image item, no image token as text) gets them at the
  start of its first user turn, as the_cauldron's records need.

Image tokens:

- Mllama: the template itself renders an image item (as ``<|image|>``); its id is the tokenizer's.
- Composed models (Llama + CLIP / SigLIP): the LM's tokenizer has no image token and its template
  may not know image items, so before rendering each message's content is flattened to a string in
  which every image item becomes :data:`IMAGE_PLACEHOLDER`. The rendered text is split at the
  placeholder, the pieces are tokenized separately and joined with the caller's
  ``image_token_id`` (``image_token_layout(model).image_token_id``, the first row past the LM's
  vocabulary). Both kinds go through the same split-and-join encoding; for Mllama it gives exactly
  the tokenizer's ids, since ``<|image|>`` is a special token and splits the text anyway.
  Literal placeholder text in the data therefore counts as an image, and the record is rejected
  with ``image_count_mismatch`` unless the counts still agree (as with ``MllamaProcessor``).

Labels (``train_on``): ``"assistant"`` (default) trains on the assistant turns (or the caption and
its EOS); ``"all"`` on every token. Image tokens are never targets (a composed model's LM head has
no row for its image id). Labels are shifted: ``labels[j]`` is the target of position ``j``.

Assistant spans are found by rendering prefixes: for the assistant message ``k``, the tokens of
``messages[:k]`` rendered with the generation prompt and of ``messages[:k + 1]`` must both be token
prefixes of the whole conversation's tokens, and the assistant tokens are the ones in between (the
reply and whatever the template closes the turn with, e.g. ``<|eot_id|>``). This needs no template
support (Llama 3.2's template has no ``{% generation %}`` markers) and is checked on every sample.
When the prefixes are not token prefixes the sample is rejected with ``template_unstable``, never
given a guessed mask. Two causes: a template that renders a prefix differently (Llama 3.2 Vision's
adds a dated system prompt only when the conversation has no image, so a conversation whose first
image comes after the first reply is one), or a reply whose first characters merge with the end of
the template's header into one token (with Llama 3's tokenizer, a reply that starts with a newline).

Length (``too_long``): ``"skip"`` rejects a sample of more than ``max_len`` tokens (``too_long``);
``"truncate"`` keeps its first ``max_len`` tokens and the images whose image token survives, and
rejects it (``too_long``) only when no trained position is left.

Other modalities (a composed model with an encoder per modality; :class:`OtherModality`): a
modality ``m`` (``audio``) is spelled in records as images are, ``m`` for a caption record's item
(``{"audio": <ref>, "text": ...}``; an ``image`` may come too), ``m + "s"`` for a chat record's list
(``"audios"``) and ``{"type": m}`` for a content item; its placeholder text is ``<|m|>`` and its
token id the caller's (its new embedding row). Its items are decoded and processed by its input
format (audio: :func:`fusiontrain.data.audio.load_audio`, then the model's feature extractor) into
``Sample.other_items[m]``, seen by the same span rule as images (``Sample.other_spans[m]``). A
count of placeholders that differs from the record's items is ``item_count_mismatch``; a caption
item comes after the image in the prompt; truncation keeps the items whose placeholder survives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fusiontrain.data.batch import Sample
from fusiontrain.data.conversations import (
    CONVERSATION_FORMATS,
    ConversationLayout,
    conversation_layout,
    images_first_when_unplaced,
)
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.errors import REASONS, BadSample
from fusiontrain.data.images import ImageTransform
from fusiontrain.data.other_modality import OtherModality
from fusiontrain.data.sources import ImageRef, Record, open_image

__all__ = [
    "IMAGE_PLACEHOLDER",
    "REASONS",
    "ROLES",
    "BadSample",
    "OtherModality",
    "SampleBuilder",
    "TokenizedRecord",
    "image_spans",
]

Format = Literal["caption", "chat", "llava", "sharegpt", "cauldron"]
FORMATS: tuple[str, ...] = ("caption", "chat", *CONVERSATION_FORMATS)
TrainOn = Literal["assistant", "all"]
TooLong = Literal["skip", "truncate"]

ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})

# What an image item becomes in a composed model's rendered chat (and where the image id goes).
IMAGE_PLACEHOLDER = "<|image|>"


def image_spans(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per image token, the token range ``[start, end)`` that sees its image (the Llama 3.2 rule).

    Image ``k`` is seen from its own token up to the next image token; the last image until the
    end. Consecutive image tokens form a group that shares the span of the group's last image, so
    every image of the group is seen by the text after it.
    """
    positions = [index for index, token in enumerate(tokens) if token == image_token_id]
    ends = [len(tokens)] * len(positions)
    for k in range(len(positions) - 2, -1, -1):
        adjacent = positions[k + 1] == positions[k] + 1
        ends[k] = ends[k + 1] if adjacent else positions[k + 1]
    return list(zip(positions, ends))


@dataclass
class TokenizedRecord:
    """A record's tokens before its images are decoded.

    Attributes:
        tokens: token ids (at most ``max_len``).
        trained: per token, whether it is a target (the position before it predicts it).
        images: the references of the images whose image token is in ``tokens``, in order.
        origin: the record's origin.
        base_dir: the folder relative image paths are relative to.
    """

    tokens: list[int]
    trained: list[bool]
    images: list[ImageRef]
    origin: str
    base_dir: Path | None
    others: dict[str, list[Any]] = field(default_factory=dict)  # other modalities' item references

    def labels(self, ignore_index: int) -> list[int]:
        """Shifted labels: ``labels[j] = tokens[j + 1]`` where that token is trained, the ignore
        index elsewhere and at the last position."""
        shifted = [token if trained else ignore_index for token, trained in zip(self.tokens[1:], self.trained[1:])]
        return shifted + [ignore_index]


class SampleBuilder:
    """Builds a :class:`Sample` from a :class:`Record`, with the model's own tokenizer, chat
    template and image processor (loaded from its HF folders; no remote code).

    Args:
        text_dir: the model folder with the tokenizer. Without ``image_token_id`` it must hold a
            whole HF multimodal processor (tokenizer with its image token, image processor and
            chat template, as a Llama 3.2 Vision checkpoint does); with it, a tokenizer only (a
            composed model's LM).
        image_format: the encoder's image format.
        image_dir: the folder with the image processor when the tokenizer has no image token (a
            composed model's vision tower); None or ``text_dir`` otherwise.
        format: ``"caption"``, ``"chat"``, ``"llava"``, ``"sharegpt"`` or ``"cauldron"`` (see the
            module docstring).
        layout: for ``llava``, ``sharegpt`` and ``cauldron``, the record layout with a mapping's
            names (:func:`~fusiontrain.data.conversations.conversation_layout`); None: the format's own.
        train_on: ``"assistant"`` or ``"all"``.
        max_len: most tokens per sample.
        too_long: ``"skip"`` or ``"truncate"``.
        ignore_index: label of untrained positions.
        image_token_id: the id to insert for each image, for a tokenizer that has no image token
            (composed models); None to use the processor's own image token.
        other_modalities: the modalities beside images a composed model's records may hold
            (needs ``image_token_id``); see the module docstring.

    Raises:
        ValueError: inconsistent arguments or folders (no chat template for ``chat``, no EOS for
            ``caption``, an image processor that does not fit ``image_format``, ...).
    """

    def __init__(
        self,
        text_dir: str | Path,
        image_format: ImageFormat,
        *,
        image_dir: str | Path | None = None,
        format: Format = "chat",
        layout: ConversationLayout | None = None,
        train_on: TrainOn = "assistant",
        max_len: int,
        too_long: TooLong = "skip",
        ignore_index: int = -100,
        image_token_id: int | None = None,
        other_modalities: Sequence[OtherModality] = (),
    ) -> None:
        from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer

        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
        if layout is not None and layout.format != format:
            raise ValueError(f"a {layout.format!r} layout given for format {format!r}")
        if format in CONVERSATION_FORMATS and layout is None:
            layout = conversation_layout(format)
        self.layout = layout
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        if too_long not in ("skip", "truncate"):
            raise ValueError(f"too_long must be 'skip' or 'truncate', got {too_long!r}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.image_format, self.format, self.train_on = image_format, format, train_on
        self.max_len, self.too_long, self.ignore_index = max_len, too_long, ignore_index

        if image_token_id is None:
            if image_dir is not None and Path(image_dir) != Path(text_dir):
                raise ValueError(
                    f"the processor in {text_dir} has its own image processor; image_dir ({image_dir}) is only for a "
                    "tokenizer without an image token (pass image_token_id too)"
                )
            processor = AutoProcessor.from_pretrained(text_dir, trust_remote_code=False)
            if not all(hasattr(processor, name) for name in ("tokenizer", "image_processor", "image_token_id")):
                raise ValueError(
                    f"{text_dir} holds a {type(processor).__name__}, not a multimodal processor with a tokenizer, an image "
                    "processor and an image token"
                )
            self.tokenizer = processor.tokenizer
            self.image_token_id: int = processor.image_token_id
            self.image_placeholder: str = processor.image_token
            self.flatten_content = False
            template_owner, template = f"the processor in {text_dir}", processor.chat_template
            self.transform = ImageTransform(processor.image_processor, image_format, folder=text_dir)
        else:
            if image_dir is None:
                raise ValueError(f"a tokenizer without an image token ({text_dir}) needs image_dir, the encoder's folder")
            self.tokenizer = AutoTokenizer.from_pretrained(text_dir, trust_remote_code=False)
            self.image_token_id = image_token_id
            self.image_placeholder = IMAGE_PLACEHOLDER
            self.flatten_content = True
            template_owner, template = f"the tokenizer in {text_dir}", self.tokenizer.chat_template
            self.transform = ImageTransform.from_pretrained(image_dir, image_format)

        if other_modalities and image_token_id is None:
            raise ValueError("other modalities (audio) need a composed model's tokenizer and image_token_id")
        self.others: dict[str, OtherModality] = {}
        self.feature_extractors: dict[str, Any] = {}
        for other in other_modalities:
            if other.name in self.others or other.name == "image":
                raise ValueError(f"modality {other.name!r} given twice (or as an other modality)")
            extractor = AutoFeatureExtractor.from_pretrained(other.folder, trust_remote_code=False)
            other.input_format.check_feature_extractor(extractor, other.folder)
            self.others[other.name] = OtherModality(
                other.name, other.input_format.with_too_long(too_long), Path(other.folder), other.token_id
            )
            self.feature_extractors[other.name] = extractor
        # placeholder text -> token id, for the split-and-join encoding
        self.placeholder_ids = {self.image_placeholder: self.image_token_id} | {
            other.placeholder: other.token_id for other in self.others.values()
        }
        self._placeholder_pattern = re.compile("(" + "|".join(map(re.escape, self.placeholder_ids)) + ")")

        self.chat_template: str | None = None
        if format != "caption":
            if isinstance(template, dict):
                if "default" not in template:
                    raise ValueError(f"{template_owner} has several chat templates and none named 'default'")
                template = template["default"]
            if not template:
                raise ValueError(f"format {format!r} needs a chat template, and {template_owner} has none")
            self.chat_template = template
        if format == "caption" and self.tokenizer.eos_token_id is None:
            raise ValueError(f"format 'caption' ends each caption with EOS, and the tokenizer in {text_dir} has none")

    # -- entry points ------------------------------------------------------------------------------

    def __call__(self, record: Record) -> Sample:
        """The sample of ``record``: tokens, labels, decoded images, spans.

        Raises:
            BadSample: naming ``record.origin``.
        """
        tokenized = self.tokenize(record)
        images, other_items = [], {}
        try:
            for ref in tokenized.images:
                images.append(self.transform(open_image(ref, tokenized.base_dir)))
            for name, refs in tokenized.others.items():
                other_items[name] = [self._process_other(name, ref, tokenized.base_dir) for ref in refs]
        except BadSample as error:
            raise error.at(record.origin) from error
        return Sample(
            tokens=torch.tensor(tokenized.tokens, dtype=torch.long),
            labels=torch.tensor(tokenized.labels(self.ignore_index), dtype=torch.long),
            images=images,
            image_spans=image_spans(tokenized.tokens, self.image_token_id),
            origin=record.origin,
            other_items=other_items,
            other_spans={name: image_spans(tokenized.tokens, self.others[name].token_id) for name in other_items},
        )

    def _process_other(self, name: str, ref: Any, base_dir: Path | None) -> dict[str, torch.Tensor]:
        """One item of modality ``name`` (audio: decoded, resampled, through the feature extractor)."""
        return self.others[name].process(self.feature_extractors[name], ref, base_dir)

    def tokenize(self, record: Record) -> TokenizedRecord:
        """The tokens and targets of ``record``, after the length policy; images not decoded.

        Raises:
            BadSample: naming ``record.origin``.
        """
        if record.error is not None:
            raise record.error
        try:
            return self._tokenize(record)
        except BadSample as error:
            raise error.at(record.origin) from error

    # -- internals ---------------------------------------------------------------------------------

    def _tokenize(self, record: Record) -> TokenizedRecord:
        data = record.data
        if not isinstance(data, dict):
            raise BadSample("bad_record", f"expected a record object, got {type(data).__name__}")
        if self.format == "caption":
            tokens, trained, images, others = self._caption(data)
        elif self.layout is not None:
            tokens, trained, images, others = self._chat(self.layout.to_chat(data, image_token_text=self.image_placeholder))
        else:
            tokens, trained, images, others = self._chat(
                images_first_when_unplaced(data, image_token_text=self.image_placeholder)
            )

        n_image_tokens = tokens.count(self.image_token_id)
        if n_image_tokens != len(images):
            raise BadSample(
                "image_count_mismatch", f"{n_image_tokens} image tokens in the text but {len(images)} images"
            )
        for name, refs in others.items():
            count = tokens.count(self.others[name].token_id)
            if count != len(refs):
                raise BadSample("item_count_mismatch", f"{count} {name} placeholders in the text but {len(refs)} {name} items")
        if self.train_on == "all":
            trained = [True] * len(tokens)
        placeholders = set(self.placeholder_ids.values())
        trained = [flag and token not in placeholders for token, flag in zip(tokens, trained)]
        if not any(trained[1:]):
            raise BadSample("no_target", "no token to train on")

        if len(tokens) > self.max_len:
            if self.too_long == "skip":
                raise BadSample("too_long", f"{len(tokens)} tokens, more than max_len={self.max_len}")
            tokens, trained = tokens[: self.max_len], trained[: self.max_len]
            images = images[: tokens.count(self.image_token_id)]
            others = {name: refs[: tokens.count(self.others[name].token_id)] for name, refs in others.items()}
            if not any(trained[1:]):
                raise BadSample("too_long", f"nothing to train on in the first max_len={self.max_len} tokens")
        others = {name: refs for name, refs in others.items() if refs}
        return TokenizedRecord(tokens, trained, images, record.origin, record.base_dir, others)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the chat template and the generation prompt
        (what training gives the same conversation up to the start of the assistant's reply),
        image tokens where the template puts them. Raises BadSample for an unusable conversation."""
        return self._encode(self._render(self._messages(messages), generation_prompt=True))

    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added), with each placeholder's id (the image
        token's, and each other modality's) where the placeholder stands."""
        ids: list[int] = []
        for piece in self._placeholder_pattern.split(text):
            if piece in self.placeholder_ids:
                ids.append(self.placeholder_ids[piece])
            elif piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def _caption(self, data: dict) -> tuple[list[int], list[bool], list[ImageRef], dict[str, list[Any]]]:
        text, image = data.get("text"), data.get("image")
        others = {name: [data[name]] for name in self.others if data.get(name) is not None}
        if not isinstance(text, str):
            raise BadSample("bad_record", f"a caption record needs a string 'text', got {type(text).__name__}")
        if image is None and not others:
            wanted = " or ".join(repr(name) for name in ["image", *self.others])
            raise BadSample("bad_record", f"a caption record needs an {wanted}")
        if not text.strip():
            raise BadSample("empty_text", "blank caption")
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        prompt = bos + ([] if image is None else [self.image_token_id]) + [self.others[name].token_id for name in others]
        caption = self._encode(text) + [self.tokenizer.eos_token_id]
        images = [] if image is None else [image]
        return prompt + caption, [False] * len(prompt) + [True] * len(caption), images, others

    def _chat(self, data: dict) -> tuple[list[int], list[bool], list[ImageRef], dict[str, list[Any]]]:
        messages = self._messages(data.get("messages"))
        images = data.get("images")
        images = [] if images is None else images
        if not isinstance(images, list):
            raise BadSample("bad_record", f"'images' must be a list, got {type(images).__name__}")
        others = {}
        for name in self.others:
            refs = data.get(f"{name}s")
            if refs is not None and not isinstance(refs, list):
                raise BadSample("bad_record", f"'{name}s' must be a list, got {type(refs).__name__}")
            others[name] = refs or []

        tokens = self._encode(self._render(messages, generation_prompt=False))
        trained = [False] * len(tokens)
        if self.train_on == "assistant":
            for k, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                if k == 0:
                    raise BadSample("bad_record", "the conversation opens with an assistant turn")
                start = self._encode(self._render(messages[:k], generation_prompt=True))
                end = self._encode(self._render(messages[: k + 1], generation_prompt=False))
                if tokens[: len(start)] != start or tokens[: len(end)] != end:
                    raise BadSample(
                        "template_unstable",
                        f"the tokens of the conversation up to message {k} are not a prefix of the whole "
                        "conversation's tokens (the chat template renders the prefix differently, or the reply's "
                        "first characters merge with the template's header into one token), so the assistant "
                        "tokens cannot be located",
                    )
                trained[len(start) : len(end)] = [True] * (len(end) - len(start))
        return tokens, trained, images, others

    def _render(self, messages: list[dict], *, generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as error:
            raise BadSample("bad_record", f"the chat template rejects the conversation: {error}") from error

    def _messages(self, messages: Any) -> list[dict]:
        """Validated messages, keys with None values dropped (as HF's ``apply_chat_template``
        does; Arrow-backed sources fill absent keys with None); for composed models, each content
        flattened to a string with :data:`IMAGE_PLACEHOLDER` for each image item."""
        if not isinstance(messages, list):
            raise BadSample("bad_record", f"a chat record needs a 'messages' list, got {type(messages).__name__}")
        if not messages:
            raise BadSample("empty_text", "no messages")
        cleaned = []
        any_text = False
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadSample("bad_record", f"message {index} is a {type(message).__name__}, not an object")
            message = {key: value for key, value in message.items() if value is not None}
            role = message.get("role")
            if role not in ROLES:
                raise BadSample("unknown_role", f"message {index} has role {role!r}; expected one of {sorted(ROLES)}")
            content = message.get("content")
            text = self._content_text(content, index)
            if role == "assistant" and not text.strip():
                raise BadSample("empty_text", f"assistant message {index} has no text")
            any_text = any_text or bool(text.strip())
            if isinstance(content, list):
                content = [{key: value for key, value in item.items() if value is not None} for item in content]
                if self.flatten_content:
                    content = "".join(item["text"] if item["type"] == "text" else self._placeholder(item["type"]) for item in content)
            cleaned.append({**message, "content": content})
        if not any_text:
            raise BadSample("empty_text", "no message has text")
        return cleaned

    def _placeholder(self, kind: str) -> str:
        """The placeholder text of a content item of type ``kind`` (``image``, or a modality)."""
        return self.image_placeholder if kind == "image" else self.others[kind].placeholder

    def _content_text(self, content: Any, index: int) -> str:
        """The text of one message's content; raises ``bad_record`` on a malformed content."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise BadSample(
                "bad_record", f"message {index}: content must be a string or a list, got {type(content).__name__}"
            )
        texts = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise BadSample("bad_record", f"message {index}: a text item without a string 'text'")
                texts.append(item["text"])
            elif kind != "image" and kind not in self.others:
                kinds = " | ".join(repr(k) for k in ["text", "image", *self.others])
                raise BadSample("bad_record", f"message {index}: content items must be {{'type': {kinds}}}, got {item!r}")
        return "".join(texts)
