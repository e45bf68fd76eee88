"""Prompt templates: how a window of dialogue becomes the text the model continues as the character.

A template is a Hugging Face chat template (Jinja over `messages` and `add_generation_prompt`, plus the
variables `system_prompt`, `character` and `eos_token`) kept as `templates/<name>.jinja` at the repository
root, or the built-in name `tokenizer`: the base tokenizer's own chat template with the persona's system
prompt always passed as the first message (SmolLM2's template otherwise says "You are a helpful AI
assistant named SmolLM").

Everything renders through `tokenizer.apply_chat_template`, the same machinery TRL, `transformers serve`
and the exported model use, so the prompt a model is trained on is the prompt it is served with:

    render_prompt(name, tok, messages, character) + completion + tok.eos_token
        is a prefix of
    tok.apply_chat_template(messages + [assistant completion], chat_template=export_chat_template(...))

Nothing here imports transformers: the functions take a tokenizer object that was loaded elsewhere.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from engine.persona import CharacterConfig

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
BUILTIN = "tokenizer"
_PLAIN = " .,;:!?'()-_/"  # written as they are in Jinja string literals


def available_templates() -> list[str]:
    """Template names a recipe may use: `tokenizer` and the stems of templates/*.jinja."""
    files = sorted(path.stem for path in TEMPLATES_DIR.glob("*.jinja")) if TEMPLATES_DIR.is_dir() else []
    return [BUILTIN] + [name for name in files if name != BUILTIN]


def unknown_template_message(name: str) -> str:
    """"unknown template 'x' — did you mean 'y'? Available: ..." (shared with the recipe validation)."""
    names = available_templates()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" — did you mean '{close[0]}'?" if close else "."
    return f"unknown template '{name}'{hint} Available: {', '.join(names)} (files in {TEMPLATES_DIR})"


def template_source(name: str) -> str | None:
    """The Jinja source of a file template, or None for `tokenizer` (the base tokenizer's own template)."""
    if name == BUILTIN:
        return None
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file() or name not in available_templates():
        raise ValueError(unknown_template_message(name))
    return path.read_text(encoding="utf-8")


def context_to_messages(context: list[dict], character_name: str) -> list[dict]:
    """Turns before the character's line -> chat messages.

    The character's own turns become assistant messages; consecutive turns of everyone else are merged into
    one user message of "Speaker: text" lines, so a scene reads like a script from the character's seat.
    """
    messages: list[dict] = []
    for turn in context:
        if turn["speaker"] == character_name:
            messages.append({"role": "assistant", "content": turn["text"]})
            continue
        line = f"{turn['speaker']}: {turn['text']}"
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n" + line
        else:
            messages.append({"role": "user", "content": line})
    return messages


def _with_persona(messages: list[dict], character: CharacterConfig) -> list[dict]:
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": character.system}] + list(messages)


def _base_template(tokenizer: Any) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        raise ValueError(
            f"the base tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template, so the template "
            f"'{BUILTIN}' cannot be used; pick a file template instead: one of {', '.join(available_templates()[1:])}"
        ) from None


def render_prompt(name: str, tokenizer: Any, messages: list[dict], character: CharacterConfig) -> str:
    """The prompt text for `messages`, ending exactly where the character's reply starts.

    Every template gets the persona's system message first (unless the conversation brings its own) and
    the variables `system_prompt` and `character`; a file template may use or ignore either.
    """
    source = template_source(name)
    if source is None:
        _base_template(tokenizer)  # a clear error when the tokenizer has none
    return tokenizer.apply_chat_template(
        _with_persona(messages, character),
        chat_template=source,
        add_generation_prompt=True,
        tokenize=False,
        system_prompt=character.system,
        character=character.shown_name,
    )


def jinja_string(value: str) -> str:
    """A Jinja string literal that evaluates to `value`, whatever it contains.

    Anything but ASCII letters, digits, spaces and harmless punctuation is written as a \\uXXXX /
    \\UXXXXXXXX escape (Jinja decodes string literals like Python's unicode-escape), so quotes, backslashes,
    newlines and `%}` or `{{` can never end the literal or the tag early.
    """
    out = []
    for char in value:
        if char.isascii() and (char.isalnum() or char in _PLAIN):
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def export_chat_template(name: str, tokenizer: Any, character: CharacterConfig) -> str:
    """A self-contained chat template with the persona baked in, for the exported tokenizer.

    Rendered with add_generation_prompt=True and no extra variables it gives exactly `render_prompt(...)`.
    """
    source = template_source(name)
    persona = "[{'role': 'system', 'content': " + jinja_string(character.system) + "}]"
    # Each header line ends with a newline right after a block tag: transformers renders with trim_blocks,
    # which eats exactly that newline, so the original template starts on a line of its own and renders
    # character for character as before (lstrip_blocks included).
    header = (
        "{#- a prompt template of the recipe engine with its persona baked in (engine/templates.py) -#}\n"
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{%- set messages = " + persona + " + messages %}"
        "{%- endif %}\n"
    )
    if source is None:
        return header + _base_template(tokenizer)
    header += (
        "{%- set system_prompt = " + jinja_string(character.system) + " %}\n"
        "{%- set character = " + jinja_string(character.shown_name) + " %}\n"
    )
    return header + source
