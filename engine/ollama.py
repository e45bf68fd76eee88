"""Ollama Modelfile for an exported model folder: `FROM .`, the chat template as a Go template, the persona.

Ollama imports a safetensors folder itself (`ollama create NAME -f Modelfile`, run in the folder), but it does
not run Hugging Face Jinja templates: a Modelfile's TEMPLATE is a Go text/template over `.Messages`. The
Jinja template is not translated; it is measured. Rendered with sentinel messages it shows, for each role,
the text before and after a message (`TurnFormat`), what opens the reply (the generation prompt) and any
fixed header. That becomes one Go template of the form

    {{- "header" }}
    {{- range $i, $_ := .Messages }}
    {{- $last := eq (len (slice $.Messages $i)) 1 }}
    {{- if eq .Role "system" }}{{ "prefix" }}{{ .Content }}{{ "suffix" }}
    {{- else if eq .Role "user" }}...
    {{- else if eq .Role "assistant" }}{{ if $last }}{{ "reply prompt" }}{{ .Content }}{{ else }}...{{ end }}
    {{- end }}
    {{- if and $last (ne .Role "assistant") }}{{ "reply prompt" }}{{ end }}
    {{- end }}

where every piece of text is a Go string literal, so that the template's own line breaks (trimmed by `{{-`)
never leak into the prompt. A trailing assistant message is a reply to continue (Ollama's prefill), rendered
as transformers' `continue_final_message=True` does. Ollama puts the Modelfile's SYSTEM in front of a chat
that brings no system message, as the exported template does with the persona.

The format is checked before it is written: rendered in Python (`render_turns`, the Go template's meaning)
it must give exactly the Jinja template's text on a few multi-turn conversations; otherwise the Modelfile
gets no TEMPLATE, a comment that says why, and the caller a warning. Nothing here imports transformers: a
template is seen through a `Render` function (`tokenizer_render` wraps a tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# (messages, mode) -> text; mode: "generation" (add_generation_prompt), "continue" (continue_final_message)
# or "closed" (neither: a finished conversation)
Render = Callable[[list[dict], str], str]

SENTINELS = {"system": "QSYSTEMSENTINELQ", "user1": "QUSERSENTINELONEQ", "assistant": "QASSISTANTSENTINELQ",
             "user2": "QUSERSENTINELTWOQ", "user3": "QUSERSENTINELTHREEQ"}  # fmt: skip

# Plain chat text, as a person types it in Ollama: the conversations the TEMPLATE must render exactly.
PLAIN_TURNS = [
    ("user", "Good morrow, Jack. What news?"),
    ("assistant", "Marry, the best of news.\nThe king is coming, and I am ready."),
    ("user", "And what of the money?"),
    ("assistant", "Hang the money! 'Tis a small matter."),
    ("user", "You are a rogue, sir."),
]
CONTINUED_REPLY = "Why, then, I"
# Text that some templates rewrite (speaker prefixes, blank lines, surrounding spaces): a difference is a note.
TRICKY_TURNS = [("user", "HAL: Good morrow.\n\n  A second paragraph.  "), ("assistant", "  A reply with spaces.  "), ("user", "Next")]


class NotPerRole(ValueError):
    """The chat template cannot be written as per-role text around each message."""


@dataclass(frozen=True)
class TurnFormat:
    """A chat template as text around each message: header + blocks + reply prompt."""

    header: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # opens the reply: after a final non-assistant message, before a final assistant one
    shows_system: bool = True


@dataclass
class OllamaTemplate:
    """What the Modelfile gets: the Go template (None when the chat template is not per-role) and notes."""

    go_template: Optional[str]
    stops: list[str]
    notes: list[str] = field(default_factory=list)  # comments in the Modelfile; warnings for the caller
    turn_format: Optional[TurnFormat] = None


def tokenizer_render(tokenizer: Any) -> Render:
    """A Render over a tokenizer's own chat template (tokenize=False)."""

    def render(messages: list[dict], mode: str) -> str:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=mode == "generation",
            continue_final_message=mode == "continue",
        )

    return render


# ---------------------------------------------------------------- measuring the template


def _locate(text: str, sentinels: list[str]) -> list[tuple[int, int]]:
    """(start, end) of each sentinel, in order; NotPerRole when one is missing or out of order."""
    spans = []
    position = 0
    for sentinel in sentinels:
        start = text.find(sentinel, position)
        if start < 0:
            raise NotPerRole(f"the message text {sentinel!r} does not appear as it is, in order, in the rendered conversation")
        spans.append((start, start + len(sentinel)))
        position = start + len(sentinel)
    return spans


def _without_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise NotPerRole(f"{what}: {text!r} does not start with {prefix!r}")
    return text[len(prefix) :]


def _without_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise NotPerRole(f"{what}: {text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)] if suffix else text


def derive_turn_format(render: Render) -> TurnFormat:
    """Measure a chat template with sentinel messages (see the module docstring); NotPerRole when it cannot be."""
    s = SENTINELS
    system, user1, assistant, user2 = (
        {"role": "system", "content": s["system"]}, {"role": "user", "content": s["user1"]},
        {"role": "assistant", "content": s["assistant"]}, {"role": "user", "content": s["user2"]},
    )  # fmt: skip
    try:
        full = render([system, user1, assistant, user2], "generation")
        closed = render([system, user1], "closed")
    except Exception as exc:  # a template that raises on a plain system/user/assistant/user chat
        raise NotPerRole(f"the template fails on a plain chat: {exc}") from None
    shows_system = s["system"] in full
    names = ([s["system"]] if shows_system else []) + [s["user1"], s["assistant"], s["user2"]]
    spans = _locate(full, names)
    *head, (u1_start, u1_end), (a_start, a_end), (u2_start, u2_end) = spans

    before_user1 = full[:u1_start]
    [(c_start, c_end)] = _locate(closed, [s["user1"]])
    if closed[:c_start] != before_user1:
        raise NotPerRole("the text before the first user message changes with what follows it")
    user_suffix = closed[c_end:]  # a finished chat ends right after the user block (no footer)

    try:  # two user messages in a row separate the user prefix from the previous block's suffix
        twice = render([system, user1, {"role": "user", "content": s["user3"]}], "generation")
        (_, t1_end), (t3_start, _) = _locate(twice, [s["user1"], s["user3"]])
        user_prefix = _without_prefix(twice[t1_end:t3_start], user_suffix, "between two user messages")
    except Exception:  # a template that insists on alternating roles: the separator goes to the next prefix
        user_prefix = full[a_end:u2_start]

    assistant_prefix = _without_prefix(full[u1_end:a_start], user_suffix, "between a user and an assistant message")
    assistant_suffix = _without_suffix(full[a_end:u2_start], user_prefix, "between an assistant and a user message")
    generation = _without_prefix(full[u2_end:], user_suffix, "after the last user message")
    if shows_system:
        s_start, s_end = head[0]
        header, system_prefix = "", full[:s_start]
        system_suffix = _without_suffix(full[s_end:u1_start], user_prefix, "between the system and the first user message")
    else:
        header = _without_suffix(before_user1, user_prefix, "before the first user message")
        system_prefix = system_suffix = ""
    return TurnFormat(
        header=header,
        prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation=generation,
        shows_system=shows_system,
    )


def render_turns(fmt: TurnFormat, messages: list[dict]) -> str:
    """What the Go template of `fmt` renders for `messages` (its meaning, in Python)."""
    parts = [fmt.header]
    for index, message in enumerate(messages):
        role, content, last = message["role"], message["content"], index == len(messages) - 1
        if role == "system" and fmt.shows_system or role == "user":
            parts += [fmt.prefix[role], content, fmt.suffix[role]]
        elif role == "assistant":
            parts += [fmt.generation, content] if last else [fmt.prefix[role], content, fmt.suffix[role]]
        if last and role != "assistant":
            parts.append(fmt.generation)
    return "".join(parts)


def _first_difference(expected: str, got: str) -> str:
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"at character {index}: the chat template gives {expected[index:index + 40]!r}, the per-role form {got[index:index + 40]!r}"


def check_turn_format(fmt: TurnFormat, render: Render, system: str) -> Optional[str]:
    """None when `fmt` renders the plain conversations exactly as the template does, else what differs."""
    persona = [{"role": "system", "content": system}]
    turns = [{"role": role, "content": text} for role, text in PLAIN_TURNS]
    cases = [(persona + turns[:3], "generation"), (persona + turns, "generation"),
             (persona + turns[:4] + [{"role": "assistant", "content": CONTINUED_REPLY}], "continue")]  # fmt: skip
    for messages, mode in cases:
        try:
            expected = render(messages, mode)
        except Exception as exc:
            return f"the template fails on a {len(messages)}-message chat ({mode}): {exc}"
        got = render_turns(fmt, messages)
        if got != expected:
            return f"{len(messages)}-message chat ({mode}) {_first_difference(expected, got)}"
    return None


# ---------------------------------------------------------------- writing Go templates and Modelfiles


def go_string(text: str) -> str:
    """A Go interpreted string literal for `text`: quotes, backslashes and anything Ollama's Modelfile reader
    would drop (control and other non-printing characters) escaped, the rest written as it is."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif char == " " or char.isprintable():
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _text(text: str) -> str:
    return "{{ " + go_string(text) + " }}" if text else ""


def go_template(fmt: TurnFormat) -> str:
    """The Ollama TEMPLATE for `fmt` (see the module docstring); only trimmed whitespace outside the actions."""

    def block(role: str) -> str:
        return _text(fmt.prefix[role]) + "{{ .Content }}" + _text(fmt.suffix[role])

    lines = []
    if fmt.header:
        lines.append("{{- " + go_string(fmt.header) + " }}")
    lines += ["{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    branches = ([("system", block("system"))] if fmt.shows_system else []) + [
        ("user", block("user")),
        ("assistant", "{{ if $last }}" + _text(fmt.generation) + "{{ .Content }}{{ else }}" + block("assistant") + "{{ end }}"),
    ]
    for index, (role, body) in enumerate(branches):
        lines.append("{{- " + ("if" if index == 0 else "else if") + f' eq .Role "{role}" }}}}' + body)
    lines.append("{{- end }}")
    lines.append('{{- if and $last (ne .Role "assistant") }}' + _text(fmt.generation) + "{{ end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


def stop_sequences(fmt: Optional[TurnFormat], eos_token: Optional[str]) -> list[str]:
    """The EOS the model learned, then the template's turn-end markers (suffixes without their whitespace)."""
    found = [eos_token or ""]
    if fmt is not None:
        found += [fmt.suffix["assistant"].strip(), fmt.suffix["user"].strip()]
    return [text for index, text in enumerate(found) if text and text not in found[:index]]


def ollama_template(render: Render, system: str, eos_token: Optional[str]) -> OllamaTemplate:
    """Measure and check the chat template behind `render`; the Go template, or None with the reason in notes."""
    try:
        fmt = derive_turn_format(render)
        problem = check_turn_format(fmt, render, system)
    except NotPerRole as exc:
        fmt, problem = None, str(exc)
    if fmt is None or problem is not None:
        return OllamaTemplate(
            go_template=None,
            stops=stop_sequences(None, eos_token),
            notes=[
                "No TEMPLATE: the chat template cannot be written as text around each message for Ollama "
                f"({problem}). Ollama will pick a template itself; format prompts as chat_template.jinja does."
            ],
        )
    notes = []
    persona = [{"role": "system", "content": system}]
    tricky = persona + [{"role": role, "content": text} for role, text in TRICKY_TURNS]
    try:
        rewrites = render(tricky, "generation") != render_turns(fmt, tricky)
    except Exception:
        rewrites = True
    if rewrites:
        notes.append(
            "The chat template rewrites some message text (speaker prefixes such as 'HAL: ', blank lines or spaces "
            "around a message); this TEMPLATE passes message text through unchanged, so only such messages are "
            "formatted differently than by transformers."
        )
    return OllamaTemplate(go_template=go_template(fmt), stops=stop_sequences(fmt, eos_token), notes=notes, turn_format=fmt)


def modelfile_value(text: str) -> str:
    """`text` quoted so that Ollama's Modelfile reader gives it back unchanged (it has no escapes).

    "..." ends early at a quote followed by a space, \"\"\"...\"\"\" at three quotes: the form that cannot
    end early is chosen; ValueError when neither fits."""
    if '"' not in text:
        return f'"{text}"'
    if '"""' not in text:
        return f'"""{text}"""'
    raise ValueError(f"{text[:40]!r}... contains three double quotes in a row, which a Modelfile cannot hold")


def dropped_by_ollama(text: str) -> list[str]:
    """Characters Ollama's Modelfile reader silently drops (it keeps printable ones, spaces, tabs, newlines)."""
    return sorted({char for char in text if not (char in " \t\r\n" or char.isprintable())})


def render_modelfile(
    template: OllamaTemplate, system: str, parameters: dict[str, Any], header: list[str], source: str = "."
) -> str:
    """The Modelfile text: comments, FROM, TEMPLATE (when there is one), SYSTEM, PARAMETER lines."""
    notes = list(template.notes)
    try:
        system_line = "SYSTEM " + modelfile_value(system)
    except ValueError as exc:
        system_line = ""
        notes.append(f"No SYSTEM: {exc}; the persona is still in the chat template and model card.")
    dropped = dropped_by_ollama(system)
    if system_line and dropped:
        notes.append(f"Ollama drops these characters of the SYSTEM text: {', '.join(repr(c) for c in dropped)}.")
    stops = []
    for stop in template.stops:
        try:
            stops.append(f"PARAMETER stop {modelfile_value(stop)}")
        except ValueError as exc:
            notes.append(f"No stop for {stop[:40]!r}: {exc}.")
    lines = [f"# {line}" if line else "#" for line in header]
    lines += ["# Note: " + " ".join(note.split()) for note in notes]  # one comment line each
    lines += ["", f"FROM {source}", ""]
    if template.go_template is not None:
        lines += [f'TEMPLATE """{template.go_template}"""', ""]
    if system_line:
        lines += [system_line, ""]
    lines += stops
    for name, value in parameters.items():
        lines.append(f"PARAMETER {name} {value}")
    return "\n".join(lines) + "\n"
