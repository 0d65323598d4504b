"""The conversation layouts open image-text data ships in, read as chat records.

Three formats (``data.format``, or a source's own ``format``), each converted record by record as
it is read (the data is never rewritten) into the ``chat`` record that
:class:`~fusiontrain.data.formats.SampleBuilder` renders with the model's chat template:
``{"images": [...], "messages": [{"role": ..., "content": [{"type": "image"}, {"type": "text",
"text": ...}, ...]}, ...]}``.

- ``llava``: LLaVA-1.5's instruction mix, ShareGPT4V and much of the hub:
  ``{"image": "coco/....jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``. ``image`` is one reference, a list of them, or absent (a
  text-only record).
- ``sharegpt``: ShareGPT as LLaMA-Factory reads it: ``{"conversations": [{"from": "human",
  "value": ...}, ...], "images": [...], "system": ...}``, or the same with ``messages`` of
  ``{"role": "user", "content": ...}``. Without a mapping both shapes are read (the first column
  and keys present win; the roles human/user, gpt/assistant and system are known).
- ``cauldron``: HuggingFaceM4/the_cauldron: ``{"images": [...], "texts": [{"user": ...,
  "assistant": ..., "source": ...}, ...]}``, each ``texts`` item one exchange.

Other layouts are read through a mapping, in the manner of LLaMA-Factory's ``dataset_info.json``:
``columns`` name the record's fields (``messages``, ``images``, ``system``) and ``tags`` the keys
and role names inside a turn (``role_tag``, ``content_tag``, ``user_tag``, ``assistant_tag``,
``system_tag``; for ``cauldron``, ``user_tag`` and ``assistant_tag`` are the keys of an exchange).
A mapped name replaces the format's default names for that field.

Images:

- A turn's placeholder (``<image>`` for ``llava`` and ``sharegpt``; ``placeholder`` sets another)
  becomes an image item at its position, the k-th placeholder the record's k-th image; the model's
  chat template then writes its image token there. The text around it is kept as it is (LLaVA's
  ``"<image>\\n"`` keeps its newline).
- A record with images and no placeholder at all (every ``cauldron`` record) gets its images, in
  order, at the start of its first user turn. So does a ``chat`` record with images and no image
  item (:func:`images_first_when_unplaced`).
- Any other difference between the number of placeholders and of images is a bad record
  (``image_count_mismatch``, its detail naming both counts).
- The model's own image token written literally in a turn's text (``<|image|>``) is a bad record
  too (``image_count_mismatch``), unless it is the format's placeholder: in these formats only the
  placeholder marks an image, and text that would tokenize to an image token would otherwise add
  an image the record does not have. (In the ``caption`` and ``chat`` formats such text counts as
  an image, as with ``MllamaProcessor``.)

Roles outside the mapping (``observation``, ``function_call``, ...) are bad records
(``unknown_role``); a text-only record trains as text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from fusiontrain.data.errors import BadSample

__all__ = [
    "CONVERSATION_FORMATS",
    "ConversationLayout",
    "conversation_layout",
    "images_first_when_unplaced",
]

ConversationFormat = Literal["llava", "sharegpt", "cauldron"]
CONVERSATION_FORMATS: tuple[str, ...] = ("llava", "sharegpt", "cauldron")

#: The placeholder LLaVA and ShareGPT data mark an image's position with.
DEFAULT_PLACEHOLDER = "<image>"

#: The fields a mapping may name, per kind (``columns`` of a record; ``tags`` inside a turn).
COLUMN_FIELDS: tuple[str, ...] = ("messages", "images", "system")
TAG_FIELDS: tuple[str, ...] = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")

Content = list[dict[str, Any]]


@dataclass(frozen=True)
class ConversationLayout:
    """Where a format keeps a record's turns, images and system prompt, and how a turn names its
    speaker. Each field lists the names accepted, the first one present in a record winning.

    Attributes:
        format: the format's name (for messages).
        messages: the column of the turns (of exchanges, for ``cauldron``).
        images: the column of the image references.
        system: the column of a system prompt (a string), if any.
        role_tag: a turn's key naming its speaker (unused by ``cauldron``).
        content_tag: a turn's key holding its text (unused by ``cauldron``).
        user_tag: the speaker names of the user (for ``cauldron``: an exchange's key of the user's text).
        assistant_tag: the speaker names of the assistant (``cauldron``: the key of the reply).
        system_tag: the speaker names of a system turn (unused by ``cauldron``).
        placeholder: the text that marks an image's position in a turn; None: images are never
            placed by the text (they go first, see the module docstring).
    """

    format: str
    messages: tuple[str, ...]
    images: tuple[str, ...]
    system: tuple[str, ...]
    role_tag: tuple[str, ...]
    content_tag: tuple[str, ...]
    user_tag: tuple[str, ...]
    assistant_tag: tuple[str, ...]
    system_tag: tuple[str, ...]
    placeholder: str | None

    def to_chat(self, data: dict[str, Any], *, image_token_text: str) -> dict[str, Any]:
        """The ``chat`` record of one record of this layout.

        Args:
            data: the record's fields.
            image_token_text: the model's image token as text (``<|image|>``), refused in turns
                unless it is the placeholder.

        Raises:
            BadSample: the record lacks the layout's fields, a turn has an unknown role, or the
                placeholders and images do not match (see the module docstring).
        """
        images = self._images(data)
        system = self._system(data)
        turns = self._exchanges(data) if self.format == "cauldron" else self._turns(data)
        if system is not None:
            turns = [("system", system), *turns]
        messages, placed = [], 0
        for index, (role, text) in enumerate(turns):
            if image_token_text in text and image_token_text != self.placeholder:
                marks = f"only {self.placeholder!r} marks an image" if self.placeholder else "images are placed first"
                raise BadSample(
                    "image_count_mismatch",
                    f"turn {index} holds the model's image token {image_token_text!r} as text; in format "
                    f"{self.format!r} {marks}",
                )
            content = self._content(text)
            placed += sum(item["type"] == "image" for item in content)
            messages.append({"role": role, "content": content})
        if placed and placed != len(images):
            raise BadSample(
                "image_count_mismatch",
                f"{placed} {self.placeholder!r} placeholders in the turns but {len(images)} images",
            )
        return images_first_when_unplaced({"images": images, "messages": messages}, image_token_text=image_token_text)

    # -- internals ---------------------------------------------------------------------------------

    def _column(self, data: dict[str, Any], names: tuple[str, ...]) -> Any:
        """The value of the first of ``names`` present (not None) in ``data``, else None."""
        for name in names:
            value = data.get(name)
            if value is not None:
                return value
        return None

    def _images(self, data: dict[str, Any]) -> list[Any]:
        value = self._column(data, self.images)
        if value is None:
            return []
        if isinstance(value, (str, dict)):  # one path, or HF Image storage {"bytes", "path"}
            return [value]
        if isinstance(value, list):
            return value
        raise BadSample("bad_record", f"{_names(self.images)} must be an image reference or a list, got {type(value).__name__}")

    def _system(self, data: dict[str, Any]) -> str | None:
        value = self._column(data, self.system)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise BadSample("bad_record", f"{_names(self.system)} must be a string, got {type(value).__name__}")
        return value

    def _turn_list(self, data: dict[str, Any]) -> list[Any]:
        value = self._column(data, self.messages)
        if not isinstance(value, list):
            found = "none" if value is None else type(value).__name__
            raise BadSample("bad_record", f"a {self.format} record needs a list under {_names(self.messages)}, got {found}")
        return value

    def _turns(self, data: dict[str, Any]) -> list[tuple[str, str]]:
        """``(role, text)`` of each turn, roles mapped to system / user / assistant."""
        turns = []
        for index, turn in enumerate(self._turn_list(data)):
            if not isinstance(turn, dict):
                raise BadSample("bad_record", f"turn {index} is a {type(turn).__name__}, not an object")
            speaker = self._column(turn, self.role_tag)
            role = self._role(speaker)
            if role is None:
                known = [*self.system_tag, *self.user_tag, *self.assistant_tag]
                raise BadSample(
                    "unknown_role",
                    f"turn {index} has {_names(self.role_tag)} {speaker!r}; format {self.format!r} knows {known} "
                    "(a mapping's tags name others)",
                )
            turns.append((role, _string(self._column(turn, self.content_tag), f"turn {index}", self.content_tag)))
        return turns

    def _exchanges(self, data: dict[str, Any]) -> list[tuple[str, str]]:
        """``cauldron``: each exchange, a user turn and the assistant's reply."""
        turns = []
        for index, exchange in enumerate(self._turn_list(data)):
            if not isinstance(exchange, dict):
                raise BadSample("bad_record", f"exchange {index} is a {type(exchange).__name__}, not an object")
            for role, names in (("user", self.user_tag), ("assistant", self.assistant_tag)):
                turns.append((role, _string(self._column(exchange, names), f"exchange {index}", names)))
        return turns

    def _role(self, speaker: Any) -> str | None:
        for role, names in (("system", self.system_tag), ("user", self.user_tag), ("assistant", self.assistant_tag)):
            if speaker in names:
                return role
        return None

    def _content(self, text: str) -> Content:
        """A turn's text as content items, an image item at each placeholder."""
        if not self.placeholder:
            return [{"type": "text", "text": text}] if text else []
        content: Content = []
        for index, piece in enumerate(text.split(self.placeholder)):
            if index:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        return content


def _names(names: tuple[str, ...]) -> str:
    return " or ".join(repr(name) for name in names)


def _string(value: Any, where: str, names: tuple[str, ...]) -> str:
    """``value`` when it is a string, else a ``bad_record`` naming ``where`` and the keys read."""
    if not isinstance(value, str):
        found = "none" if value is None else type(value).__name__
        raise BadSample("bad_record", f"{where} needs a string under {_names(names)}, got {found}")
    return value


_PRESETS: dict[str, ConversationLayout] = {
    "llava": ConversationLayout(
        format="llava",
        messages=("conversations",),
        images=("image", "images"),
        system=("system",),
        role_tag=("from",),
        content_tag=("value",),
        user_tag=("human",),
        assistant_tag=("gpt",),
        system_tag=("system",),
        placeholder=DEFAULT_PLACEHOLDER,
    ),
    "sharegpt": ConversationLayout(
        format="sharegpt",
        messages=("conversations", "messages"),
        images=("images",),
        system=("system",),
        role_tag=("from", "role"),
        content_tag=("value", "content"),
        user_tag=("human", "user"),
        assistant_tag=("gpt", "assistant"),
        system_tag=("system",),
        placeholder=DEFAULT_PLACEHOLDER,
    ),
    "cauldron": ConversationLayout(
        format="cauldron",
        messages=("texts",),
        images=("images",),
        system=(),
        role_tag=(),
        content_tag=(),
        user_tag=("user",),
        assistant_tag=("assistant",),
        system_tag=(),
        placeholder=None,
    ),
}


def conversation_layout(
    format: str,
    *,
    columns: dict[str, str | None] | None = None,
    tags: dict[str, str | None] | None = None,
    placeholder: str | None = None,
) -> ConversationLayout:
    """The layout of ``format``, with a mapping's names in place of its defaults.

    Args:
        format: ``llava``, ``sharegpt`` or ``cauldron``.
        columns: field -> column name, fields from :data:`COLUMN_FIELDS`; None values keep the default.
        tags: field -> key or role name, fields from :data:`TAG_FIELDS`; None values keep the default.
        placeholder: the image placeholder, None for the format's own.

    Raises:
        ValueError: an unknown format or field, or an empty name.
    """
    if format not in _PRESETS:
        raise ValueError(f"unknown conversation format {format!r}; known: {', '.join(CONVERSATION_FORMATS)}")
    layout = _PRESETS[format]
    changes: dict[str, Any] = {}
    for kind, mapping, fields in (("columns", columns, COLUMN_FIELDS), ("tags", tags, TAG_FIELDS)):
        for field, name in (mapping or {}).items():
            if field not in fields:
                raise ValueError(f"unknown {kind} field {field!r}; known: {', '.join(fields)}")
            if name is None:
                continue
            if not isinstance(name, str) or not name:
                raise ValueError(f"{kind}.{field} must be a non-empty name, got {name!r}")
            changes[field] = (name,)
    if placeholder is not None:
        if not placeholder:
            raise ValueError("the image placeholder must be non-empty text")
        changes["placeholder"] = placeholder
    return replace(layout, **changes)


def images_first_when_unplaced(record: dict[str, Any], *, image_token_text: str) -> dict[str, Any]:
    """``record`` (a ``chat`` record) with its images as image items at the start of the first
    user turn when it has images and nothing places them: no image item, and no image token
    written as text (``image_token_text``, which places an image in a ``chat`` record); else
    ``record`` unchanged (a count that still differs is the sample builder's
    ``image_count_mismatch``).

    Only well-formed records are changed; anything else is left for the sample builder to name.
    """
    images, messages = record.get("images"), record.get("messages")
    if not isinstance(images, list) or not images or not isinstance(messages, list):
        return record
    if any(_places_an_image(message, image_token_text) for message in messages):
        return record
    first_user = next(
        (k for k, message in enumerate(messages) if isinstance(message, dict) and message.get("role") == "user"), None
    )
    if first_user is None:
        return record
    message = messages[first_user]
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content else []
    elif not isinstance(content, list):
        return record
    placed = {**message, "content": [{"type": "image"} for _ in images] + list(content)}
    return {**record, "messages": [*messages[:first_user], placed, *messages[first_user + 1 :]]}


def _places_an_image(message: Any, image_token_text: str) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return image_token_text in content
    if not isinstance(content, list):
        return False
    for item in content:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "image" or (isinstance(item.get("text"), str) and image_token_text in item["text"]):
            return True
    return False
