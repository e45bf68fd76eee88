"""Character cards: Tavern JSON (v1, v2, v3), PNG cards written here byte by byte, webui YAML, and their errors."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import pytest

from engine.cards import PNG_SIGNATURE, Card, apply_card, load_card, png_text_chunks
from engine.errors import DataError, MissingInputError
from engine.persona import CharacterConfig

V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Eric Cartman",
        "description": "{{char}} is a loud, scheming fourth-grader from South Park, Colorado.",
        "personality": "selfish, manipulative, easily offended",
        "scenario": "{{user}} meets {{char}} at the bus stop.",
        "first_mes": "Screw you guys, I'm going home! ...What do you want, {{user}}?",
        "mes_example": "<START>\n{{user}}: Hi.\n{{char}}: Respect my authoritah!",
        "creator_notes": "not used",
        "system_prompt": "",
        "post_history_instructions": "not used",
        "alternate_greetings": ["not used"],
        "tags": ["south park"],
        "creator": "test",
        "character_version": "1",
        "extensions": {},
    },
}
V2_SYSTEM = (
    "You are Eric Cartman. Stay in character and answer as Eric Cartman would.\n\n"
    "Eric Cartman is a loud, scheming fourth-grader from South Park, Colorado.\n\n"
    "Eric Cartman's personality: selfish, manipulative, easily offended\n\n"
    "Scenario: User meets Eric Cartman at the bus stop."
)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def text_chunk(keyword: str, text: str) -> bytes:
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))


def png(*extra: bytes) -> bytes:
    """A real 1x1 red RGB PNG with the given chunks before its image data."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))  # filter byte 0, then one red pixel
    return PNG_SIGNATURE + header + b"".join(extra) + pixels + chunk(b"IEND", b"")


def card_b64(card: dict) -> str:
    return base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii")


def write(tmp_path: Path, name: str, content: bytes | str | dict) -> Path:
    path = tmp_path / name
    if isinstance(content, dict):
        content = json.dumps(content, ensure_ascii=False, indent=2)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def problem(path: Path) -> str:
    with pytest.raises(DataError) as caught:
        load_card(path)
    return str(caught.value).replace(str(path), "CARD")


# ---------------------------------------------------------------- formats


def test_v2_json_card(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, "cartman.json", V2))
    assert card == Card(
        name="Eric Cartman",
        system_prompt=V2_SYSTEM,
        first_message="Screw you guys, I'm going home! ...What do you want, User?",
        example_dialogue="<START>\nUser: Hi.\nEric Cartman: Respect my authoritah!",
        format="chara_card_v2",
    )


def test_own_system_prompt_and_original(tmp_path: Path) -> None:
    data = {**V2["data"], "system_prompt": "{{original}} Never admit you are an AI.", "personality": "", "scenario": None}
    card = load_card(write(tmp_path, "c.json", {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}))
    assert card.format == "chara_card_v3"
    assert card.system_prompt == (
        "You are Eric Cartman. Stay in character and answer as Eric Cartman would. Never admit you are an AI.\n\n"
        "Eric Cartman is a loud, scheming fourth-grader from South Park, Colorado."
    )
    data["system_prompt"] = "<BOT> speaks to <USER> in short lines."
    card = load_card(write(tmp_path, "d.json", {"spec": "chara_card_v2", "data": data}))
    assert card.system_prompt.startswith("Eric Cartman speaks to User in short lines.\n\nEric Cartman is a loud")


def test_v1_and_legacy_cards(tmp_path: Path) -> None:
    flat = {key: V2["data"][key] for key in ("name", "description", "personality", "scenario", "first_mes", "mes_example")}
    card = load_card(write(tmp_path, "v1.json", flat))
    assert (card.format, card.system_prompt, card.first_message) == (
        "chara_card_v1",
        V2_SYSTEM,
        "Screw you guys, I'm going home! ...What do you want, User?",
    )
    legacy = {
        "char_name": "Butters",
        "char_persona": "A sweet, naive kid.",
        "world_scenario": "",
        "char_greeting": "Oh, hamburgers!",
        "example_dialogue": "{{user}}: Hey Butters.\n{{char}}: Oh, hi fellas!",
    }
    card = load_card(write(tmp_path, "pyg.json", legacy))
    assert card == Card(
        "Butters",
        "You are Butters. Stay in character and answer as Butters would.\n\nA sweet, naive kid.",
        "Oh, hamburgers!",
        "User: Hey Butters.\nButters: Oh, hi fellas!",
        "chara_card_v1",
    )
    # a v2 card whose spec was lost on the way still reads from data
    assert load_card(write(tmp_path, "nospec.json", {"data": V2["data"]})).system_prompt == V2_SYSTEM


def test_png_card_with_a_text_chunk(tmp_path: Path) -> None:
    path = write(tmp_path, "cartman.png", png(text_chunk("Title", "a picture"), text_chunk("chara", card_b64(V2))))
    card = load_card(path)
    assert card.format == "png:chara_card_v2"
    assert (card.name, card.system_prompt) == ("Eric Cartman", V2_SYSTEM)
    assert set(png_text_chunks(path.read_bytes(), str(path))) == {"Title", "chara"}
    # the file written here is a real image (Pillow comes with matplotlib in the train extras)
    image = pytest.importorskip("PIL.Image")
    with image.open(path) as opened:
        opened.load()
        assert (opened.size, opened.getpixel((0, 0))) == ((1, 1), (255, 0, 0))


def test_png_ztxt_itxt_and_v3_preferred(tmp_path: Path) -> None:
    v3 = {"spec": "chara_card_v3", "data": {**V2["data"], "name": "Cartman III"}}
    ztxt = chunk(b"zTXt", b"chara\0\0" + zlib.compress(card_b64(V2).encode("ascii")))
    itxt = chunk(b"iTXt", b"ccv3\0\1\0en\0\0" + zlib.compress(card_b64(v3).encode("ascii")))
    card = load_card(write(tmp_path, "v3.png", png(ztxt, itxt)))
    assert (card.name, card.format) == ("Cartman III", "png:chara_card_v3")
    plain_itxt = chunk(b"iTXt", b"chara\0\0\0\0\0" + json.dumps(V2, ensure_ascii=False).encode("utf-8"))
    card = load_card(write(tmp_path, "raw.png", png(plain_itxt)))  # raw JSON, not base64: accepted too
    assert card.system_prompt == V2_SYSTEM


def test_text_generation_webui_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Chiharu.yaml",
        "name: Chiharu Yamada\n"
        "greeting: |-\n"
        "  *Chiharu strides into the room with a smile.* Hey! I'm so excited to finally meet you.\n"
        "context: |-\n"
        "  Chiharu Yamada's Persona: {{char}} is a young computer engineer-nerd who talks to {{user}}.\n"
        "example_dialogue: |-\n"
        "  {{user}}: So how did you get into computer engineering?\n"
        "  {{char}}: I've always loved tinkering!\n",
    )
    assert load_card(path) == Card(
        "Chiharu Yamada",
        "Chiharu Yamada's Persona: Chiharu Yamada is a young computer engineer-nerd who talks to User.",
        "*Chiharu strides into the room with a smile.* Hey! I'm so excited to finally meet you.",
        "User: So how did you get into computer engineering?\nChiharu Yamada: I've always loved tinkering!",
        "textgen_webui",
    )
    bare = load_card(write(tmp_path, "bare.yml", "name: Kyle\ngreeting: Dude.\n"))
    assert (bare.system_prompt, bare.first_message, bare.example_dialogue) == (
        "You are Kyle. Stay in character and answer as Kyle would.",
        "Dude.",
        "",
    )


# ---------------------------------------------------------------- apply_card


def test_apply_card_fills_only_what_the_recipe_left_unset() -> None:
    card = Card("Eric Cartman", V2_SYSTEM, "Screw you guys!", "", "chara_card_v2")
    filled = apply_card({"name": "Cartman", "card": "cards/cartman.png"}, card)
    assert filled == {
        "name": "Cartman",
        "card": "cards/cartman.png",
        "system_prompt": V2_SYSTEM,
        "first_message": "Screw you guys!",
        "display_name": "Eric Cartman",
    }
    mine = {"name": "Cartman", "display_name": "Cartman", "system_prompt": "You are {display_name}.", "first_message": None}
    assert apply_card(mine, card) == {**mine, "first_message": "Screw you guys!"}
    assert mine["first_message"] is None  # the input is not changed
    assert apply_card({"name": "Kyle"}, Card("Kyle", "You are Kyle.", None, "")) == {
        "name": "Kyle",
        "system_prompt": "You are Kyle.",
        "display_name": "Kyle",
    }
    persona = CharacterConfig.model_validate(apply_card({"name": "Cartman"}, card))
    assert (persona.shown_name, persona.system) == ("Eric Cartman", V2_SYSTEM)


# ---------------------------------------------------------------- bad cards


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="character card '.*nope.png' not found; put the card"):
        load_card(tmp_path / "nope.png")


def test_png_without_a_card(tmp_path: Path) -> None:
    assert problem(write(tmp_path, "photo.png", png(text_chunk("Software", "GIMP")))) == (
        "CARD: the PNG holds no character card: no text chunk with keyword 'chara' or 'ccv3' (text chunks found: "
        "'Software')\n  fix: use the PNG that SillyTavern exports for a character (an ordinary image has no card in "
        "it), or its JSON"
    )


def test_damaged_pngs(tmp_path: Path) -> None:
    good = png(text_chunk("chara", card_b64(V2)))
    assert problem(write(tmp_path, "cut.png", good[:60])) == (
        "CARD: the PNG is cut short: chunk 2 ('tEXt') at byte 33 needs 878 bytes, the file ends 19 bytes later\n"
        "  fix: download or export the card again"
    )
    flipped = bytearray(good)
    flipped[50] ^= 0xFF
    assert problem(write(tmp_path, "crc.png", bytes(flipped))) == (
        "CARD: the PNG is damaged: chunk 2 ('tEXt') at byte 33 fails its CRC check\n  fix: download or export the card again"
    )
    assert problem(write(tmp_path, "b64.png", png(text_chunk("chara", "not base64 at all!")))) == (
        "CARD: the PNG's 'chara' chunk is neither base64 nor JSON (it starts 'not base64 at all!')\n"
        "  fix: export the card again from SillyTavern"
    )
    broken = base64.b64encode(b'{"spec": "chara_card_v2", "data": {').decode("ascii")
    assert problem(write(tmp_path, "json.png", png(text_chunk("chara", broken)))) == (
        "CARD: the JSON in the PNG's 'chara' chunk is not valid: Expecting property name enclosed in double quotes "
        "(line 1, column 36)\n  fix: export the card again from SillyTavern"
    )
    nameless = {"spec": "chara_card_v2", "data": {**V2["data"], "name": " "}}
    assert problem(write(tmp_path, "noname.png", png(text_chunk("chara", card_b64(nameless))))) == (
        "CARD: the JSON in the PNG's 'chara' chunk (data): 'name' is missing or empty\n"
        '  fix: give the character a name, e.g. "name": "Eric Cartman"'
    )


def test_malformed_text_cards(tmp_path: Path) -> None:
    assert problem(write(tmp_path, "a.json", '{\n  "name": "Kyle",\n  "description": oops\n}')) == (
        "CARD:3: not valid JSON: Expecting value (column 18)\n  fix: fix the JSON syntax at that place"
    )
    assert problem(write(tmp_path, "b.json", {"spec": "chara_card_v2", "data": {**V2["data"], "personality": ["a", "b"]}})) == (
        "CARD: the card (data): field 'personality' must be text, not a list\n"
        "  fix: write 'personality' as one string (join list items with newlines)"
    )
    assert problem(write(tmp_path, "c.json", {"spec": "chara_card_v9", "data": V2["data"]})) == (
        "CARD: the card: spec 'chara_card_v9' is not a character card format this reads (expected chara_card_v2 or "
        "chara_card_v3, or a v1 card without spec)\n  fix: export the card as a V2 character card"
    )
    assert problem(write(tmp_path, "d.json", {"spec": "chara_card_v2", "name": "Kyle"})) == (
        "CARD: the card: a chara_card_v2 card keeps its fields in 'data', which is missing\n"
        "  fix: put name, description, personality, scenario, first_mes and mes_example under 'data'"
    )
    assert problem(write(tmp_path, "e.yaml", "- name: Kyle\n- name: Stan\n")) == (
        "CARD: a character card must be a mapping of fields (name, description, ...), not a list\n"
        "  fix: export the character again from SillyTavern (a PNG or JSON character card) or write it by hand"
    )
    assert problem(write(tmp_path, "f.yaml", "name: Kyle\ncontext: Kyle: a kid: from Jersey\n")) == (
        "CARD:2: not valid YAML: mapping values are not allowed here\n"
        "  fix: fix the YAML syntax at that place (a text with ': ' in it needs quotes or a `|-` block)"
    )
    assert problem(write(tmp_path, "g.yaml", "context: a kid\n")) == (
        "CARD: the card: 'name' is missing or empty\n  fix: give the character a name, e.g. \"name\": \"Eric Cartman\""
    )
    assert problem(write(tmp_path, "h.json", "  \n")).startswith("CARD: the file is empty")
    assert problem(write(tmp_path, "i.bin", b"GIF89a\x01\x00\xff\xfe")) == (
        "CARD:1: neither a PNG nor UTF-8 text (byte 0xff at offset 8)\n"
        "  fix: use a PNG character card, or save the JSON/YAML card as UTF-8"
    )
