"""The Ollama Modelfile: its Go TEMPLATE renders a chat exactly as the exported tokenizer's chat template does.

Ollama is not installed here, so the test carries a small interpreter for the Go text/template subset that
engine/ollama.py emits (range over .Messages with $i, variables, if / else if / else on .Role, eq / ne / and
/ not / len / slice, string literals, {{ .Content }}, trim markers {{- -}}), and a port of Ollama's Modelfile
reader (parser/parser.go: no escapes, values end at a newline once their quotes are closed).

    python -m pytest -q tests/test_ollama.py
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from engine.models import TINY_OVERRIDES, ModelConfig, resolve_base_model
from engine.ollama import (
    OllamaTemplate,
    TurnFormat,
    derive_turn_format,
    go_string,
    go_template,
    modelfile_value,
    ollama_template,
    render_modelfile,
    render_turns,
    stop_sequences,
    tokenizer_render,
)
from engine.persona import CharacterConfig
from engine.templates import available_templates, export_chat_template

CHARACTER = CharacterConfig(name="FALSTAFF", display_name="Sir John Falstaff")
CONVERSATION = [  # multi-turn, plain chat text as typed in Ollama (a line break inside one message)
    {"role": "user", "content": "Good morrow, Jack. Where hast thou been?"},
    {"role": "assistant", "content": "At the tavern, Hal, where else?\nThe sack was good."},
    {"role": "user", "content": "And the money for the king?"},
    {"role": "assistant", "content": "Spent, lad, on the king's health."},
    {"role": "user", "content": "Thou art a rogue."},
]


# ---------------------------------------------------------------- a Go text/template subset


def go_unquote(literal: str) -> str:
    """The value of a Go interpreted string literal (the escapes go_string writes, and \\x)."""
    assert literal[0] == literal[-1] == '"'
    out, body, index = [], literal[1:-1], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    while index < len(body):
        char = body[index]
        if char != "\\":
            assert char != '"', f"unescaped quote in {literal!r}"
            out.append(char)
            index += 1
            continue
        kind = body[index + 1]
        if kind in simple:
            out.append(simple[kind])
            index += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            out.append(chr(int(body[index + 2 : index + 2 + width], 16)))
            index += 2 + width
    return "".join(out)


def lex(template: str) -> list[tuple[str, str]]:
    """("text", ...) and ("action", ...) pieces, with Go's trim markers applied to the text around them."""
    pieces: list[tuple[str, str]] = []
    index, trim_next = 0, False
    while True:
        start = template.find("{{", index)
        text = template[index:] if start < 0 else template[index:start]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if start < 0:
            pieces.append(("text", text))
            return pieces
        inner_start = start + 2
        if template.startswith("- ", inner_start) or template.startswith("-\n", inner_start):
            text = text.rstrip(" \t\r\n")
            inner_start += 1
        pieces.append(("text", text))
        position, quoted = inner_start, False  # the action ends at the first }} outside a string literal
        while quoted or not template.startswith("}}", position):
            char = template[position]
            if quoted and char == "\\":
                position += 1
            elif char == '"':
                quoted = not quoted
            position += 1
        inner = template[inner_start:position]
        trim_next = inner.endswith(" -")
        pieces.append(("action", inner[:-2] if trim_next else inner))
        index = position + 2


TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$\.[A-Za-z]+|\.[A-Za-z]+|\$[A-Za-z]*|[A-Za-z]+|\d+)')


def tokens_of(expression: str) -> list[str]:
    found, index = [], 0
    expression = expression.strip()
    while index < len(expression):
        match = TOKEN.match(expression, index)
        assert match, f"cannot read {expression[index:]!r}"
        found.append(match.group(1))
        index = match.end()
    return found


def truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and value != []


FUNCTIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not truthy(a),
    "len": len,
    "slice": lambda items, start: items[start:],
}


def evaluate(tokens: list[str], scope: dict) -> Any:
    """A command: `fn arg...` or one operand; parenthesised sub-commands."""

    def operand(position: int) -> tuple[Any, int]:
        token = tokens[position]
        if token == "(":
            depth, end = 1, position + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[end], 0)
                end += 1
            return evaluate(tokens[position + 1 : end - 1], scope), end
        if token.startswith('"'):
            return go_unquote(token), position + 1
        if token.isdigit():
            return int(token), position + 1
        if token.startswith("$."):
            return scope["$"][token[2:]], position + 1
        if token.startswith("$"):
            return scope[token], position + 1
        if token.startswith("."):
            return scope["."][token[1:]], position + 1
        raise AssertionError(f"unexpected {token!r}")

    if tokens[0] in FUNCTIONS or tokens[0] == "and":
        args, position = [], 1
        while position < len(tokens):
            value, position = operand(position)
            args.append(value)
        if tokens[0] == "and":
            return next((a for a in args if not truthy(a)), args[-1])
        return FUNCTIONS[tokens[0]](*args)
    value, position = operand(0)
    assert position == len(tokens), f"trailing tokens in {tokens}"
    return value


def parse(pieces: list[tuple[str, str]], position: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """Nodes up to one of the `stop` keywords (end / else); returns (nodes, next position, keyword seen)."""
    nodes: list = []
    while position < len(pieces):
        kind, value = pieces[position]
        words = value.strip()
        position += 1
        if kind == "text":
            nodes.append(("text", value))
        elif words.startswith("/*"):
            continue
        elif words == "end" or words == "else" or words.startswith("else if "):
            assert words.split()[0] in stop or words == "end" and "end" in stop, f"unexpected {words!r}"
            return nodes, position, words
        elif words.startswith("range "):
            match = re.fullmatch(r"range (\$\w+), (\$\w+) := (.+)", words)
            assert match, words
            body, position, keyword = parse(pieces, position, ("end",))
            nodes.append(("range", match.group(1), match.group(2), tokens_of(match.group(3)), body))
        elif words.startswith("if "):
            branches = []
            condition = words[3:]
            while True:
                body, position, keyword = parse(pieces, position, ("end", "else"))
                branches.append((tokens_of(condition) if condition is not None else None, body))
                if keyword == "end":
                    break
                condition = keyword[8:] if keyword.startswith("else if ") else None
            nodes.append(("if", branches))
        elif ":=" in words:
            name, expression = (part.strip() for part in words.split(":=", 1))
            nodes.append(("set", name, tokens_of(expression)))
        else:
            nodes.append(("print", tokens_of(words)))
    assert not stop, f"missing {stop}"
    return nodes, position, ""


def execute(nodes: list, scope: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            value = evaluate(node[1], scope)
            assert isinstance(value, str), f"printing a non-string {value!r}"
            out.append(value)
        elif node[0] == "set":
            scope[node[1]] = evaluate(node[2], scope)
        elif node[0] == "range":
            _, index_var, item_var, expression, body = node
            for index, item in enumerate(evaluate(expression, scope)):
                execute(body, {**scope, ".": item, index_var: index, item_var: item}, out)
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or truthy(evaluate(condition, scope)):
                    execute(body, dict(scope), out)
                    break


def run_go_template(template: str, messages: list[dict]) -> str:
    """Render as Ollama does for a chat: .Messages (system messages included), .System their text."""
    go_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    root = {"Messages": go_messages, "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system")}
    nodes, _, _ = parse(lex(template))
    out: list[str] = []
    execute(nodes, {"$": root, ".": root}, out)
    return "".join(out)


# ---------------------------------------------------------------- Ollama's Modelfile reader


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as parser/parser.go reads them; PARAMETER names come as `parameter:<name>`."""

    def unquote(value: str) -> tuple[str, bool]:
        if value.startswith('"""'):
            return (value[3:-3], True) if len(value) >= 6 and value.endswith('"""') else ("", False)
        if value.startswith('"'):
            return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
        return value, True

    commands, state, buffer, name = [], "nil", "", ""
    for char in text:
        if state == "nil":
            if char == "#":
                state = "comment"
            elif char not in " \t\r\n":
                state, buffer = "name", char
        elif state == "comment":
            state = "nil" if char in "\r\n" else "comment"
        elif state == "name":
            if char in " \t":
                name, buffer = {"from": "model"}.get(buffer.lower(), buffer.lower()), ""
                state = "parameter" if name == "parameter" else "value"
            else:
                assert char.isascii() and char.isalpha(), f"bad command character {char!r}"
                buffer += char
        elif state == "parameter":
            if char in " \t":
                name, buffer, state = f"parameter:{buffer}", "", "value"
            else:
                buffer += char
        elif state == "value":
            if char in "\r\n":
                value, ok = unquote(buffer.strip())
                if ok:
                    commands.append((name, value))
                    state, buffer = "nil", ""
                    continue
                buffer += char
            elif char in " \t" or char.isprintable():
                buffer += char  # Ollama drops other non-printing characters
    if state == "value":
        value, ok = unquote(buffer.strip())
        assert ok, "unterminated value at the end of the Modelfile"
        commands.append((name, value))
    return commands


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(ModelConfig(random_init=True, config_overrides=dict(TINY_OVERRIDES))))


def exported_tokenizer(tokenizer, template: str):
    import copy

    exported = copy.deepcopy(tokenizer)
    exported.chat_template = export_chat_template(template, tokenizer, CHARACTER)
    return exported


@pytest.mark.parametrize("template", available_templates())
def test_go_template_renders_like_the_chat_template(tokenizer, template):
    """For the tokenizer's template and every file template: the Go TEMPLATE (as Ollama runs it, with SYSTEM
    as the first message) gives exactly `apply_chat_template`'s text, for a chat that asks for a reply and for
    a reply to continue (Ollama's prefill = continue_final_message)."""
    exported = exported_tokenizer(tokenizer, template)
    result = ollama_template(tokenizer_render(exported), CHARACTER.system, exported.eos_token)
    assert result.go_template is not None, result.notes
    persona = [{"role": "system", "content": CHARACTER.system}]
    for turns in (CONVERSATION[:1], CONVERSATION[:3], CONVERSATION):
        expected = exported.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)  # persona from the template
        assert run_go_template(result.go_template, persona + turns) == expected
        assert exported.apply_chat_template(persona + turns, add_generation_prompt=True, tokenize=False) == expected
        assert render_turns(result.turn_format, persona + turns) == expected  # the Python meaning agrees
    prefill = CONVERSATION[:4] + [{"role": "assistant", "content": "Why, Hal, I"}]
    expected = exported.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert run_go_template(result.go_template, persona + prefill) == expected
    # a chat that brings its own system message replaces the persona, in both
    own = [{"role": "system", "content": "You are Hal."}] + CONVERSATION[:3]
    assert run_go_template(result.go_template, own) == exported.apply_chat_template(own, add_generation_prompt=True, tokenize=False)
    assert exported.eos_token in result.stops


def test_template_notes(tokenizer):
    """Only the Character-LLM template rewrites message text ('Name: text' lines become turns): a note, not a failure."""
    notes = {name: ollama_template(tokenizer_render(exported_tokenizer(tokenizer, name)), CHARACTER.system, "</s>").notes for name in available_templates()}
    assert notes["tokenizer"] == [] and notes["southpark_alpaca"] == []
    assert len(notes["characterllm_meta"]) == 1 and "rewrites some message text" in notes["characterllm_meta"][0]


def test_chatml_format_and_stops(tokenizer):
    fmt = derive_turn_format(tokenizer_render(exported_tokenizer(tokenizer, "tokenizer")))
    assert fmt.prefix == {"system": "<|im_start|>system\n", "user": "<|im_start|>user\n", "assistant": "<|im_start|>assistant\n"}
    assert set(fmt.suffix.values()) == {"<|im_end|>\n"} and fmt.generation == "<|im_start|>assistant\n" and fmt.header == ""
    assert stop_sequences(fmt, "<|im_end|>") == ["<|im_end|>"]
    assert stop_sequences(fmt, "</s>") == ["</s>", "<|im_end|>"]


def test_system_not_shown_gives_a_header(tokenizer):
    fmt = derive_turn_format(tokenizer_render(exported_tokenizer(tokenizer, "southpark_alpaca")))
    assert not fmt.shows_system and fmt.header.startswith("Below is a script") and fmt.generation == "\n\n ### Sir John Falstaff:"
    assert 'eq .Role "system"' not in go_template(fmt)


def test_not_per_role_template_is_left_out():
    """A template that reorders messages cannot be a Go template of per-role text: no TEMPLATE, a note."""

    def render(messages: list[dict], mode: str) -> str:  # users first, then the assistant's lines
        users = [m["content"] for m in messages if m["role"] == "user"]
        others = [m["content"] for m in messages if m["role"] == "assistant"]
        return "Q: " + " | ".join(users) + "\nA: " + " | ".join(others) + ("\nA:" if mode == "generation" else "")

    result = ollama_template(render, "You are X.", "</s>")
    assert result.go_template is None and result.stops == ["</s>"]
    assert result.notes[0].startswith("No TEMPLATE: the chat template cannot be written as text around each message")
    text = render_modelfile(result, "You are X.", {"temperature": 0.7}, ["header"])
    assert "TEMPLATE" not in [command for command, _ in read_modelfile(text)]
    assert "\n# Note: No TEMPLATE" in text


@pytest.mark.parametrize(
    "text",
    ['plain', 'quotes "inside" and \\ backslash', "new\nlines\tand tabs\r", "{{ .Content }} and }} {{-", '"""', "\u00a0nbsp \u200bzero width", "emoji \U0001f600 ü"],
)
def test_go_string_round_trip(text):
    literal = go_string(text)
    assert go_unquote(literal) == text
    assert '"""' not in literal and all(char == " " or char.isprintable() for char in literal)
    assert run_go_template("{{ " + literal + " }}", []) == text  # inside an action, braces in the text are harmless


def test_modelfile_reads_back(tokenizer):
    """Ollama's reader gives back the TEMPLATE, the SYSTEM text (quotes, line breaks) and each PARAMETER."""
    exported = exported_tokenizer(tokenizer, "tokenizer")
    system = 'You are "Sir John".\nSpeak as he would: "Banish plump Jack, and banish all the world."'
    result = ollama_template(tokenizer_render(exported), system, exported.eos_token)
    text = render_modelfile(result, system, {"temperature": 0.7, "repeat_penalty": 1.3}, ["Ollama Modelfile", "", "more"])
    commands = read_modelfile(text)
    assert commands[0] == ("model", ".")
    assert dict(commands)["template"] == result.go_template
    assert dict(commands)["system"] == system
    assert [value for command, value in commands if command == "parameter:stop"] == ["<|im_end|>"]
    assert ("parameter:temperature", "0.7") in commands and ("parameter:repeat_penalty", "1.3") in commands
    assert text.startswith("# Ollama Modelfile\n#\n# more\n")


def test_modelfile_values():
    assert modelfile_value("<|im_end|>") == '"<|im_end|>"'
    assert modelfile_value('say "hi"') == '"""say "hi""""'
    assert read_modelfile('FROM .\nSYSTEM """say "hi""""\n') == [("model", "."), ("system", 'say "hi"')]
    with pytest.raises(ValueError, match="three double quotes"):
        modelfile_value('a """ b')
    result = OllamaTemplate(go_template=None, stops=["</s>"])
    text = render_modelfile(result, 'a """ b', {}, [])
    assert "system" not in dict(read_modelfile(text)) and "# Note: No SYSTEM" in text


def test_render_turns_meaning():
    fmt = TurnFormat(header="H", prefix={"system": "<s>", "user": "<u>", "assistant": "<a>"}, suffix={"system": "</s>", "user": "</u>", "assistant": "</a>"}, generation="<g>")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert render_turns(fmt, messages[:2]) == "H<s>S</s><u>U</u><g>"
    assert render_turns(fmt, messages) == "H<s>S</s><u>U</u><g>A"  # a final assistant message is continued
    assert run_go_template(go_template(fmt), messages) == render_turns(fmt, messages)
    assert run_go_template(go_template(fmt), messages[:2] + messages[1:]) == render_turns(fmt, messages[:2] + messages[1:])
