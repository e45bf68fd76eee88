"""Character cards as a recipe's persona: SillyTavern / TavernAI cards (JSON or PNG) and text-generation-webui YAML.

`load_card(path)` reads any of these and returns a Card: the name, a system prompt built from the card's
fields, the first message and the example dialogue. `apply_card(character, card)` fills the `character`
section's system_prompt, first_message and display_name from it where the recipe left them unset.

Formats, told apart by content (not by the file's suffix):

- `chara_card_v2` / `chara_card_v3` JSON: `{"spec": "chara_card_v2", "data": {"name", "description",
  "personality", "scenario", "first_mes", "mes_example", "system_prompt", ...}}`.
- v1 cards: the same fields flat at the top level, and the older TavernAI / Pygmalion names `char_name`,
  `char_persona`, `world_scenario`, `char_greeting`, `example_dialogue`.
- PNG cards: an image whose tEXt (or zTXt, iTXt) chunk with keyword `chara` (v2) or `ccv3` (v3, preferred)
  holds the card's JSON, base64-encoded. The chunks are read with struct and zlib (no Pillow), CRCs checked.
- text-generation-webui characters (YAML, or JSON): `name`, `context`, `greeting`, optionally
  `example_dialogue`.

The system prompt of a Tavern card is the card's own `system_prompt` (its `{{original}}` replaced by the
default persona instruction) or that instruction, then the description, `<name>'s personality: ...` and
`Scenario: ...`, as SillyTavern lays out its story string; for a webui character it is the `context`.
`{{char}}` / `<BOT>` become the card's name and `{{user}}` / `<USER>` "User" (the speaker the dataset gives
the other side of a conversation with no name). `post_history_instructions`, lorebooks and alternate
greetings are not used. Bad cards raise DataError naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from engine.errors import DataError, MissingInputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # PNG text-chunk keywords holding a card, preferred first
TAVERN_SPECS = ("chara_card_v2", "chara_card_v3")
DEFAULT_INSTRUCTION = "You are {{char}}. Stay in character and answer as {{char}} would."
USER_NAME = "User"
_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
_LEGACY = {  # TavernAI / Pygmalion v1 field -> chara_card field
    "char_name": "name",
    "char_persona": "description",
    "world_scenario": "scenario",
    "char_greeting": "first_mes",
    "example_dialogue": "mes_example",
}
EXPORT_FIX = "export the character again from SillyTavern (a PNG or JSON character card) or write it by hand"


@dataclass(frozen=True)
class Card:
    """A character card reduced to what a recipe's persona uses."""

    name: str
    system_prompt: str
    first_message: Optional[str]
    example_dialogue: str
    format: str = ""  # chara_card_v2, chara_card_v3, chara_card_v1, textgen_webui; "png:" in front for a PNG


def load_card(path: str | Path) -> Card:
    """Read a character card (Tavern JSON or PNG, text-generation-webui YAML/JSON) into a Card."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MissingInputError(
            f"character card '{file}' not found; put the card (.png, .json or .yaml) there or fix character.card"
        ) from None
    except IsADirectoryError:
        raise DataError(file, "is a folder, not a character card", fix="name the card file itself (.png, .json or .yaml)") from None
    if raw.startswith(PNG_SIGNATURE):
        data, keyword = _card_from_png(raw, file)
        card = _from_mapping(data, file, f"the JSON in the PNG's '{keyword}' chunk")
        return Card(card.name, card.system_prompt, card.first_message, card.example_dialogue, "png:" + card.format)
    return _from_mapping(_parse_text(raw, file), file, "the card")


def apply_card(character: dict, card: Card) -> dict:
    """The recipe's `character` section (a plain dict) with system_prompt, first_message and display_name taken
    from the card wherever the recipe left them unset (absent or null); what the recipe sets always wins."""
    merged = dict(character)
    for key, value in (
        ("system_prompt", card.system_prompt),
        ("first_message", card.first_message),
        ("display_name", card.name),
    ):
        if merged.get(key) is None and value:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- text formats


def _parse_text(raw: bytes, file: str) -> dict:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            file,
            f"neither a PNG nor UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            row=line,
            fix="use a PNG character card, or save the JSON/YAML card as UTF-8",
        ) from None
    if not text.strip():
        raise DataError(file, "the file is empty", fix=EXPORT_FIX)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                file, f"not valid JSON: {exc.msg} (column {exc.colno})", row=exc.lineno, fix="fix the JSON syntax at that place"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise DataError(
                file,
                f"not valid YAML: {problem}",
                row=mark.line + 1 if mark else None,
                fix="fix the YAML syntax at that place (a text with ': ' in it needs quotes or a `|-` block)",
            ) from None
    if not isinstance(data, dict):
        raise DataError(
            file,
            f"a character card must be a mapping of fields (name, description, ...), not a {type(data).__name__}",
            fix=EXPORT_FIX,
        )
    return data


def _text(data: dict, key: str, file: str, where: str) -> str:
    """A text field of the card ('' when absent or null); DataError when it is not text."""
    value = data.get(key)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(
            file,
            f"{where}: field '{key}' must be text, not a {type(value).__name__}",
            fix=f"write '{key}' as one string (join list items with newlines)",
        )
    return value


def _macros(text: str, name: str) -> str:
    return _USER.sub(USER_NAME, _CHAR.sub(name, text)).strip()


def _from_mapping(data: dict, file: str, what: str) -> Card:
    spec = data.get("spec")
    if spec is not None:
        if spec not in TAVERN_SPECS:
            raise DataError(
                file,
                f"{what}: spec '{spec}' is not a character card format this reads "
                f"(expected {' or '.join(TAVERN_SPECS)}, or a v1 card without spec)",
                fix="export the card as a V2 character card",
            )
        fields = data.get("data")
        if not isinstance(fields, dict):
            raise DataError(
                file,
                f"{what}: a {spec} card keeps its fields in 'data', which is "
                + ("missing" if fields is None else f"a {type(fields).__name__}, not a mapping"),
                fix="put name, description, personality, scenario, first_mes and mes_example under 'data'",
            )
        return _tavern(fields, file, f"{what} (data)", spec)
    if "context" in data or "greeting" in data:
        return _textgen(data, file, what)
    if isinstance(data.get("data"), dict) and "name" not in data:
        return _tavern(data["data"], file, f"{what} (data)", "chara_card_v2")  # a v2 card that lost its spec
    fields = dict(data)
    for old, new in _LEGACY.items():  # TavernAI / Pygmalion names, where the chara_card name is not there
        if old in data and fields.get(new) is None:
            fields[new] = data[old]
    return _tavern(fields, file, what, "chara_card_v1")


def _name(data: dict, file: str, where: str) -> str:
    name = _text(data, "name", file, where).strip()
    if not name:
        raise DataError(file, f"{where}: 'name' is missing or empty", fix='give the character a name, e.g. "name": "Eric Cartman"')
    return name


def _tavern(fields: dict, file: str, where: str, spec: str) -> Card:
    name = _name(fields, file, where)
    description = _text(fields, "description", file, where)
    personality = _text(fields, "personality", file, where)
    scenario = _text(fields, "scenario", file, where)
    own_prompt = _text(fields, "system_prompt", file, where)
    first = _text(fields, "first_mes", file, where)
    examples = _text(fields, "mes_example", file, where)
    instruction = own_prompt.replace("{{original}}", DEFAULT_INSTRUCTION) if own_prompt.strip() else DEFAULT_INSTRUCTION
    parts = [instruction, description]
    if personality.strip():
        parts.append(f"{name}'s personality: {personality.strip()}")
    if scenario.strip():
        parts.append(f"Scenario: {scenario.strip()}")
    system = "\n\n".join(_macros(part, name) for part in parts if part.strip())
    return Card(name, system, _macros(first, name) or None, _macros(examples, name), spec)


def _textgen(data: dict, file: str, where: str) -> Card:
    name = _name(data, file, where)
    context = _text(data, "context", file, where)
    greeting = _text(data, "greeting", file, where)
    examples = _text(data, "example_dialogue", file, where)
    system = _macros(context, name) if context.strip() else _macros(DEFAULT_INSTRUCTION, name)
    return Card(name, system, _macros(greeting, name) or None, _macros(examples, name), "textgen_webui")


# ---------------------------------------------------------------- PNG


def png_text_chunks(raw: bytes, file: str) -> dict[str, str]:
    """{keyword: text} of a PNG's tEXt, zTXt and iTXt chunks (the first of each keyword), CRCs checked."""
    if not raw.startswith(PNG_SIGNATURE):
        raise DataError(file, "not a PNG file (its first 8 bytes are not the PNG signature)", fix=EXPORT_FIX)
    texts: dict[str, str] = {}
    offset, number = len(PNG_SIGNATURE), 0
    while offset < len(raw):
        number += 1
        if offset + 8 > len(raw):
            raise DataError(file, f"the PNG is cut short: chunk {number} at byte {offset} has no complete header", fix="download or export the card again")
        length, kind = struct.unpack(">I4s", raw[offset : offset + 8])
        end = offset + 8 + length + 4
        if end > len(raw):
            raise DataError(
                file,
                f"the PNG is cut short: chunk {number} ({kind.decode('latin-1')!r}) at byte {offset} needs {length} bytes, "
                f"the file ends {len(raw) - offset - 8} bytes later",
                fix="download or export the card again",
            )
        body = raw[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", raw[offset + 8 + length : end])
        if zlib.crc32(kind + body) != crc:
            raise DataError(
                file,
                f"the PNG is damaged: chunk {number} ({kind.decode('latin-1')!r}) at byte {offset} fails its CRC check",
                fix="download or export the card again",
            )
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text_chunk(kind, body, file, number)
            texts.setdefault(keyword, text)
        if kind == b"IEND":
            break
        offset = end
    return texts


def _text_chunk(kind: bytes, body: bytes, file: str, number: int) -> tuple[str, str]:
    keyword, sep, rest = body.partition(b"\0")
    if not sep:
        raise DataError(file, f"the PNG's {kind.decode()} chunk {number} has no keyword separator", fix="download or export the card again")
    try:
        if kind == b"tEXt":
            return keyword.decode("latin-1"), rest.decode("latin-1")
        if kind == b"zTXt":  # compression method byte (0: zlib), then the compressed latin-1 text
            return keyword.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
        # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
        flag = rest[0]
        language_and_rest = rest[2:]
        _, _, after_language = language_and_rest.partition(b"\0")
        _, _, text = after_language.partition(b"\0")
        return keyword.decode("latin-1"), (zlib.decompress(text) if flag else text).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, IndexError) as exc:
        raise DataError(
            file,
            f"the PNG's {kind.decode()} chunk {number} ('{keyword.decode('latin-1')}') cannot be read: {exc}",
            fix="download or export the card again",
        ) from None


def _card_from_png(raw: bytes, file: str) -> tuple[dict, str]:
    texts = png_text_chunks(raw, file)
    keyword = next((k for k in CARD_KEYWORDS if k in texts), None)
    if keyword is None:
        found = ", ".join(repr(k) for k in texts) or "none"
        raise DataError(
            file,
            f"the PNG holds no character card: no text chunk with keyword 'chara' or 'ccv3' (text chunks found: {found})",
            fix="use the PNG that SillyTavern exports for a character (an ordinary image has no card in it), or its JSON",
        )
    payload = texts[keyword].strip()
    try:
        decoded = base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        if not payload.startswith("{"):
            raise DataError(
                file,
                f"the PNG's '{keyword}' chunk is neither base64 nor JSON (it starts {payload[:20]!r})",
                fix="export the card again from SillyTavern",
            ) from None
        decoded = payload  # some tools write the JSON as is
    try:
        data = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise DataError(
            file,
            f"the JSON in the PNG's '{keyword}' chunk is not valid: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            fix="export the card again from SillyTavern",
        ) from None
    if not isinstance(data, dict):
        raise DataError(file, f"the PNG's '{keyword}' chunk holds a {type(data).__name__}, not a card", fix=EXPORT_FIX)
    return data, keyword
