"""Prompt templates render through the real transformers machinery and round-trip through the exported template."""

from __future__ import annotations

import pytest

from engine.models import ModelConfig, resolve_base_model
from engine.persona import CharacterConfig
from engine.templates import (
    TEMPLATES_DIR,
    available_templates,
    context_to_messages,
    export_chat_template,
    render_prompt,
    template_source,
)

SEED_PROMPT = (  # SEEDS.md section 1, the South Park chatbot's training code
    "Below is a script from the American animated sitcom South Park. Write a response that completes "
    "{character}'s last line in the conversation.\n\n### Script:\n{previous}\n\n ### {character}:"
)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(ModelConfig()))


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"speaker": speaker, "text": text} for speaker, text in pairs]


CONTEXTS = {
    "empty": [],
    "others only": turns(("Stan", "Dude."), ("Kyle", "What?")),
    "mixed": turns(("Stan", "Dude."), ("Kyle", "What?"), ("Cartman", "Screw you guys."), ("Stan", "Hey.")),
    "character first and twice": turns(("Cartman", "Respect my authoritah!"), ("Cartman", "I said respect it.")),
    "odd text": turns(("Kyle", 'Quotes " and \\ and {{ x }} and {% if %} and émoji 😀'), ("Cartman", "Line\nbreak")),
}
PERSONAS = {
    "default": CharacterConfig(name="Cartman"),
    "odd": CharacterConfig(
        name="Cartman",
        display_name="Eric Cartman",
        system_prompt='You are {display_name}.\n"Quoted", back\\slash, %} {{ no }} {# no #}, tab\t, 😀 é',
    ),
}


def test_available_templates_lists_builtin_and_files():
    names = available_templates()
    assert names[0] == "tokenizer"
    assert "southpark_alpaca" in names
    assert template_source("tokenizer") is None
    assert "### Script:" in template_source("southpark_alpaca")


def test_unknown_template_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown template 'southpark_alpac' — did you mean 'southpark_alpaca'\? Available: tokenizer, characterllm_meta, southpark_alpaca"):
        template_source("southpark_alpac")


def test_every_template_file_starts_with_a_comment_header():
    for path in TEMPLATES_DIR.glob("*.jinja"):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("{#"), path
        assert "source" in text[: text.index("#}")].lower() or "seeds.md" in text[: text.index("#}")].lower(), path


def test_context_to_messages_merges_other_speakers():
    messages = context_to_messages(CONTEXTS["mixed"] + turns(("Kenny", "Mmph."), ("Cartman", "Whatever.")), "Cartman")
    assert messages == [
        {"role": "user", "content": "Stan: Dude.\nKyle: What?"},
        {"role": "assistant", "content": "Screw you guys."},
        {"role": "user", "content": "Stan: Hey.\nKenny: Mmph."},
        {"role": "assistant", "content": "Whatever."},
    ]
    # the character's consecutive lines stay separate assistant messages
    assert [m["role"] for m in context_to_messages(CONTEXTS["character first and twice"], "Cartman")] == ["assistant", "assistant"]
    assert context_to_messages([], "Cartman") == []


@pytest.mark.parametrize("name", ["tokenizer", "southpark_alpaca"])
@pytest.mark.parametrize("persona", list(PERSONAS))
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_render_and_export_agree(tokenizer, name, persona, context):
    character = PERSONAS[persona]
    messages = context_to_messages(CONTEXTS[context], character.name)
    completion = "Screw you guys, I'm going home."
    prompt = render_prompt(name, tokenizer, messages, character)
    exported = export_chat_template(name, tokenizer, character)

    # the exported template alone reproduces the training prompt (transformers refuses an empty conversation)
    if messages:
        alone = tokenizer.apply_chat_template(messages, chat_template=exported, add_generation_prompt=True, tokenize=False)
        assert alone == prompt
    # and a finished conversation starts with exactly what training saw: prompt + completion + EOS
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": completion}], chat_template=exported, tokenize=False
    )
    trained = prompt + completion + tokenizer.eos_token
    assert full.startswith(trained) or full.rstrip("\n") == trained.rstrip("\n")


def _merges(tokenizer, prompt: str, completion: str) -> bool:
    prompt_ids = tokenizer(prompt)["input_ids"]
    return tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"][: len(prompt_ids)] != prompt_ids


def test_prompt_tokens_are_a_prefix_of_prompt_plus_completion(tokenizer):
    # TRL masks the loss on the prompt's tokens: the prompt's last token must not merge with the completion
    character = PERSONAS["default"]
    messages = context_to_messages(CONTEXTS["mixed"], "Cartman")
    chatml = render_prompt("tokenizer", tokenizer, messages, character)
    alpaca = render_prompt("southpark_alpaca", tokenizer, messages, character)
    for completion in ["Screw you guys.", "Hey!", "42 cats", "Über", "'quoted'", "...what?", "(whispers)"]:
        assert not _merges(tokenizer, chatml, completion), completion
    for completion in ["Screw you guys.", "Hey!", "42 cats", "Über", "...what?"]:
        assert not _merges(tokenizer, alpaca, completion), completion
    # the seed's prompt ends in ':' with no space, so a line that starts with punctuation merges with it
    # (about 3% of South Park lines); the dataset stage counts these as boundary_merges
    assert _merges(tokenizer, alpaca, "(whispers)")


def test_tokenizer_template_always_carries_the_persona(tokenizer):
    character = PERSONAS["default"]
    prompt = render_prompt("tokenizer", tokenizer, context_to_messages(CONTEXTS["mixed"], "Cartman"), character)
    assert "SmolLM" not in prompt
    assert prompt.startswith(f"<|im_start|>system\n{character.system}<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    # a conversation that brings its own system message keeps it, in training and in the export alike
    messages = [{"role": "system", "content": "Custom."}, {"role": "user", "content": "Stan: Hi."}]
    prompt = render_prompt("tokenizer", tokenizer, messages, character)
    assert prompt.startswith("<|im_start|>system\nCustom.<|im_end|>") and character.system not in prompt
    exported = export_chat_template("tokenizer", tokenizer, character)
    assert tokenizer.apply_chat_template(messages, chat_template=exported, add_generation_prompt=True, tokenize=False) == prompt


def test_southpark_prompt_is_the_seed_prompt(tokenizer):
    character = CharacterConfig(name="Cartman")
    context = turns(("Stan", "Dude, where's Kenny?"), ("Kyle", "I don't know."), ("Cartman", "Who cares."), ("Stan", "Cartman!"))
    prompt = render_prompt("southpark_alpaca", tokenizer, context_to_messages(context, "Cartman"), character)
    previous = "Stan: Dude, where's Kenny?\nKyle: I don't know.\nCartman: Who cares.\nStan: Cartman!"
    assert prompt == SEED_PROMPT.format(character="Cartman", previous=previous)

    # the display name is who the script calls the character
    shown = CharacterConfig(name="Cartman", display_name="Eric")
    prompt = render_prompt("southpark_alpaca", tokenizer, context_to_messages(context, "Cartman"), shown)
    assert prompt == SEED_PROMPT.format(character="Eric", previous=previous.replace("Cartman: Who", "Eric: Who"))

    # a finished conversation: the reply follows the marker, then EOS (the seed trained on prompt + line + EOS)
    exported = export_chat_template("southpark_alpaca", tokenizer, character)
    full = tokenizer.apply_chat_template(
        context_to_messages(context, "Cartman") + [{"role": "assistant", "content": "Screw you guys."}],
        chat_template=exported,
        tokenize=False,
    )
    assert full == SEED_PROMPT.format(character="Cartman", previous=previous) + "Screw you guys." + tokenizer.eos_token
