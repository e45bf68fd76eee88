"""The characterllm_experience source on the real Character-LLM Beethoven files and on small handmade ones,
and the characterllm_meta template's contract with the exported chat template."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from engine.errors import DataError
from engine.models import ModelConfig, resolve_base_model
from engine.persona import CharacterConfig
from engine.recipe import load_recipe
from engine.registry import SOURCES, InputFile
from engine.sources.characterllm import (
    CharacterLLMExperienceConfig,
    parse_output,
    prompt_status,
    read_characterllm_experience,
    read_experience,
)
from engine.templates import context_to_messages, export_chat_template, render_prompt
from tests.conftest import need_shared_data

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "characterllm_beethoven.yaml"
FORK = "character-llm/rishabhshah13__Character-LLM/processed/2023-10-08"
EXPERIENCE = f"{FORK}/prompted/prompted_agent_dialogue_Beethoven.jsonl"
PROTECTIVE = f"{FORK}/generated_agent_hallucination_Beethoven.json"
META_PROMPT = "character-llm/choosewhatulike__trainable-agents/data/seed_data/prompts/agent_meta_prompt_sft.txt"
QUIET = Console(quiet=True)


def read(data: Path, protective: Path | None = None, include_thinking: bool = False) -> list[dict]:
    config = CharacterLLMExperienceConfig(
        kind="characterllm_experience",
        data={"path": data.name},
        protective={"path": protective.name} if protective else None,
        include_thinking=include_thinking,
    )
    inputs = {"data": InputFile(path=data, sha256="0" * 64)}
    if protective:
        inputs["protective"] = InputFile(path=protective, sha256="0" * 64)
    return list(read_characterllm_experience(config, inputs, QUIET))


def jsonl(folder: Path, *rows, name: str = "x.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def assert_scenes_contiguous(turns: list[dict]) -> None:
    seen: dict[str, int] = {}
    previous = None
    for turn in turns:
        if turn["scene"] != previous:
            assert turn["scene"] not in seen, f"scene {turn['scene']} is split"
        assert turn["index"] == seen.get(turn["scene"], 0)
        seen[turn["scene"]] = turn["index"] + 1
        previous = turn["scene"]


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def shared() -> Path:
    return need_shared_data()


@pytest.fixture(scope="module")
def spoken(shared) -> list[dict]:
    return read(shared / EXPERIENCE)


def test_registered_with_its_files():
    kind = SOURCES["characterllm_experience"]
    config = CharacterLLMExperienceConfig(kind="characterllm_experience", data={"path": "a.jsonl"})
    assert list(kind.files(config)) == ["data"]
    config = CharacterLLMExperienceConfig(kind="characterllm_experience", data={"path": "a.jsonl"}, protective={"path": "b.json"})
    assert list(kind.files(config)) == ["data", "protective"]


def test_real_experience_counts(shared, spoken):
    stats = Counter(first_skipped=None)
    everything = list(read_experience(shared / EXPERIENCE, True, stats))
    assert stats["rows"] == 557
    assert stats["skipped"] == 13  # pieces the generator wrote without a `Name (action):` header
    assert stats["rows_without_turns"] == 1  # line 530: all four pieces are header-less
    assert stats["first_skipped"][0] == 129
    assert len(everything) == 7_412
    assert Counter(turn["meta"]["action"] for turn in everything)["thinking"] == 2_284
    speakers = Counter(turn["speaker"] for turn in everything)
    assert (speakers["Beethoven"], speakers["Ludwig"], speakers["Ludwig van Beethoven"]) == (4_296, 108, 25)
    assert len({turn["scene"] for turn in everything}) == 556

    # by default the thinking turns are not turns: 5,128 spoken turns remain, the thoughts are in meta
    assert len(spoken) == 7_412 - 2_284
    speakers = Counter(turn["speaker"] for turn in spoken)
    assert (speakers["Beethoven"], speakers["Ludwig"], speakers["Ludwig van Beethoven"]) == (2_082, 55, 10)
    thoughts = sum(len(t["meta"].get("thinking", [])) + len(t["meta"].get("thinking_after", [])) for t in spoken)
    assert thoughts == 2_283  # line 450 is a scene of one thought and nothing said: it has no turn to carry it
    assert len({turn["scene"] for turn in spoken}) == 555
    assert not any(turn["text"].startswith("(thinking)") for turn in spoken)
    assert_scenes_contiguous(spoken)


def test_real_first_turns_and_meta(shared, spoken):
    first = spoken[0]
    assert first["scene"] == "seed_dialogue_5/1"
    assert (first["index"], first["speaker"]) == (0, "Beethoven")
    assert first["text"].startswith("My friends, gathered here today, as we prepare to embark on this musical journey")
    assert first["meta"]["thinking"][0]["speaker"] == "Beethoven"
    assert first["meta"]["thinking"][0]["text"].startswith('The name "Bonaparte" echoed in my mind')
    assert first["meta"]["location"] == "Concert hall"
    assert first["meta"]["status"].startswith("The concert hall is filled with anticipation")
    assert first["meta"]["status"].endswith("the premiere of his groundbreaking Third Symphony, the Eroica.")
    assert (first["meta"]["source"], first["meta"]["line"], first["meta"]["action"]) == ("seed_dialogue_5", 1, "speaking")
    # a source id is not unique (line 543 is the converted protective scene seed_dialogue_5): lines keep them apart
    assert {"seed_dialogue_5/1", "seed_dialogue_5/543"} <= {turn["scene"] for turn in spoken}
    # the generator's quirks are gone from the text
    assert not any("\\n" in turn["text"] or "<|eot|>" in turn["text"] for turn in spoken)
    assert not any(turn["text"].count('"') % 2 and turn["text"].endswith('"') for turn in spoken)
    assert Counter(turn["speaker"] for turn in spoken)["Karl Alois, Prince Lichnowsky"] == 5


def test_real_protective_scenes_replace_their_converted_copies(shared):
    turns = read(shared / EXPERIENCE, shared / PROTECTIVE)
    protective = [turn for turn in turns if turn["meta"].get("protective")]
    assert len({turn["scene"] for turn in protective}) == 17
    assert Counter(turn["speaker"] for turn in protective) == {"Beethoven": 148, "Lily": 141}
    assert protective[0]["scene"] == "protective/seed_dialogue_7/1"
    assert protective[0]["meta"]["setting"].startswith("Lily, a mischievous and cunning individual")
    assert protective[0]["meta"]["location"] == ""  # "." in the file
    # rows 541-557 of the JSONL are the same 17 scenes, converted: they are left out
    assert not any(541 <= turn["meta"].get("line", 0) <= 557 for turn in turns)
    assert len({turn["scene"] for turn in turns}) == 555 - 17 + 17
    assert len(turns) == 5_131
    # the utterance that slipped into "action" (seed_dialogue_5) is put back in front of its content
    scene = [t for t in protective if t["scene"] == "protective/seed_dialogue_5/3"]
    assert [t["speaker"] for t in scene] == ["Beethoven", "Lily", "Lily", "Lily"]  # its converted copy kept 2 turns
    assert scene[1]["text"].startswith("Ah, Herr Beethoven, what a pleasure it is to be in your presence.")
    assert "the Pathétique?\nI imagine the clandestine meetings" in scene[1]["text"]
    assert scene[1]["text"].endswith("don't you think?")
    assert scene[1]["meta"]["action"] == "speaking"
    assert not any("\\n" in turn["text"] for turn in protective)
    assert_scenes_contiguous(turns)


def test_recipe_reads_the_real_files(monkeypatch, shared):
    from engine.stages.source import source_inputs

    monkeypatch.setenv("RECIPE_DATA_PATH", str(shared))
    recipe = load_recipe(RECIPE)
    inputs = source_inputs(recipe)  # paths resolved and sha256 checked
    turns = list(read_characterllm_experience(recipe.source, inputs, QUIET))
    aliases = recipe.clean.speaker_aliases
    assert aliases == {"Ludwig": "Beethoven", "Ludwig van Beethoven": "Beethoven"}
    speakers = Counter(aliases.get(turn["speaker"], turn["speaker"]) for turn in turns)
    assert speakers[recipe.character.name] == 2_148
    assert recipe.dataset.template == "characterllm_meta"


# ---------------------------------------------------------------- parsing, on small handmade strings


def test_parse_output_variants():
    output = (
        "Beethoven (thinking): A thought.<|eot|>\n"
        "Beethoven (speaking): \\nMy friends!\"\\n<|eot|>\n"
        "  Dr. Wawruch ( speaking ) :\n  Rest now.  <|eot|>\n \n"
        "Karl Alois, Prince Lichnowsky (in unison,  speaking): Bravo!\n"  # no <|eot|> before the next header
        "Audience (excited murmurs): Beethoven! Beethoven!\n"
        "Second line of the same turn.<|eot|>\n"
        "Beethoven As I stand here on the outskirts of Vienna, the bustling energy (speaking): lost<|eot|>\n"
        'Johann van Beethoven "Ludwig, focus! (speaking): lost too<|eot|>\n'
        "Beethoven (speaking): The last one has no end marker"
    )
    turns, skipped = parse_output(output)
    assert turns == [
        ("Beethoven", "thinking", "A thought."),
        ("Beethoven", "speaking", "My friends!"),  # literal \n and the unmatched quote are gone
        ("Dr. Wawruch", "speaking", "Rest now."),
        ("Karl Alois, Prince Lichnowsky", "in unison, speaking", "Bravo!"),
        ("Audience", "excited murmurs", "Beethoven! Beethoven!\nSecond line of the same turn."),
        ("Beethoven", "speaking", "The last one has no end marker"),
    ]
    assert [s[:20] for s in skipped] == ["Beethoven As I stand", 'Johann van Beethoven']
    assert parse_output("") == ([], [])
    assert parse_output("no header at all") == ([], ["no header at all"])


def test_prompt_status():
    prompt = (
        "I want you to act like Ludwig van Beethoven. ... \n\nThe status of you is as follows:\n"
        "Location: Concert hall \nStatus: Line one,\nline two.\n\nThe interactions are as follows:\n\n"
    )
    assert prompt_status(prompt) == {"location": "Concert hall", "status": "Line one, line two."}
    assert prompt_status("no status here") == {"location": "", "status": ""}


def test_thinking_goes_to_meta_or_stays_marked(tmp_path):
    path = jsonl(
        tmp_path,
        {
            "prompt": "Location: Bonn\nStatus: Lessons.\n\n",
            "output": "Johann (speaking): Practise!<|eot|>\nBeethoven (thinking): Again?<|eot|>\n"
            "Beethoven (thinking): Fine.<|eot|>\nBeethoven (speaking): Yes, father.<|eot|>\n"
            "Johann (thinking): Good.<|eot|>",
            "source": "seed_dialogue_1",
        },
        {"output": "Beethoven (thinking): Only a thought.<|eot|>"},  # no prompt, no source, nothing said
    )
    turns = read(path)
    assert [(t["scene"], t["index"], t["speaker"], t["text"]) for t in turns] == [
        ("seed_dialogue_1/1", 0, "Johann", "Practise!"),
        ("seed_dialogue_1/1", 1, "Beethoven", "Yes, father."),
    ]
    assert "thinking" not in turns[0]["meta"]
    assert turns[1]["meta"]["thinking"] == [{"speaker": "Beethoven", "text": "Again?"}, {"speaker": "Beethoven", "text": "Fine."}]
    assert turns[1]["meta"]["thinking_after"] == [{"speaker": "Johann", "text": "Good."}]
    assert turns[1]["meta"]["location"] == "Bonn" and turns[1]["meta"]["status"] == "Lessons."

    kept = read(path, include_thinking=True)
    assert [(t["scene"], t["index"], t["speaker"], t["text"]) for t in kept] == [
        ("seed_dialogue_1/1", 0, "Johann", "Practise!"),
        ("seed_dialogue_1/1", 1, "Beethoven", "(thinking) Again?"),
        ("seed_dialogue_1/1", 2, "Beethoven", "(thinking) Fine."),
        ("seed_dialogue_1/1", 3, "Beethoven", "Yes, father."),
        ("seed_dialogue_1/1", 4, "Johann", "(thinking) Good."),
        ("row/2", 0, "Beethoven", "(thinking) Only a thought."),
    ]
    assert kept[-1]["meta"] == {"source": "row", "line": 2, "location": "", "status": "", "action": "thinking"}


def test_protective_quirks_and_duplicates(tmp_path):
    data = jsonl(
        tmp_path,
        {"prompt": "Location: A room\nStatus: Chat.", "output": "Lily (speaking): Tell me!<|eot|>\nBeethoven (speaking): No.<|eot|>", "source": "seed_dialogue_0"},
        {"output": "Lily (speaking): Another scene.<|eot|>", "source": "seed_dialogue_0"},
    )
    protective = tmp_path / "p.json"
    protective.write_text(
        json.dumps(
            [
                {
                    "setting": ["Lily provokes.", "Beethoven resists."],
                    "dialogue": [
                        {"role": "Lily", "action": "Tell me, is it true that you once had a secret romance? \\n", "content": "Tell me!"},
                        {"role": "Beethoven", "action": "", "content": "No.\\n"},
                        {"role": "Beethoven", "action": "\\n", "content": "Never."},
                        {"role": "Beethoven", "action": "(thinking)", "content": "Impertinent."},
                    ],
                    "location": ".",
                    "background": "A salon",
                    "source": "seed_dialogue_0",
                }
            ]
        ),
        encoding="utf-8",
    )
    turns = read(data, protective)
    # line 1 is the converted copy of the protective scene (same source id, same first turn): left out
    assert [(t["scene"], t["speaker"], t["text"]) for t in turns] == [
        ("seed_dialogue_0/2", "Lily", "Another scene."),
        ("protective/seed_dialogue_0/1", "Lily", "Tell me, is it true that you once had a secret romance?\nTell me!"),
        ("protective/seed_dialogue_0/1", "Beethoven", "No."),
        ("protective/seed_dialogue_0/1", "Beethoven", "Never."),
    ]
    assert turns[-1]["meta"] == {
        "source": "seed_dialogue_0",
        "record": 1,
        "protective": True,
        "setting": "Lily provokes. Beethoven resists.",
        "location": "",
        "background": "A salon",
        "action": "speaking",
        "thinking_after": [{"speaker": "Beethoven", "text": "Impertinent."}],
    }


# ---------------------------------------------------------------- bad data: golden messages


def data_error(path: Path, protective: Path | None = None) -> str:
    with pytest.raises(DataError) as caught:
        read(path, protective)
    return str(caught.value)


def test_malformed_json_line_names_file_line_and_fix(tmp_path):
    path = jsonl(tmp_path, {"output": "A (speaking): hi<|eot|>"}, "", '{"prompt": "x", "output": "A (speaking): hi<|eot|>"')
    assert data_error(path) == (
        f"{path}:3: the line is not valid JSON (Expecting ',' delimiter at column 52)\n"
        '  fix: make each line one JSON object {"prompt": "...", "output": "Name (speaking): text<|eot|>...", '
        '"source": "..."} (Character-LLM\'s prompted format)'
    )


def test_row_without_output(tmp_path):
    path = jsonl(tmp_path, {"output": "A (speaking): hi<|eot|>"}, {"prompt": "I want you to act like X.", "source": "seed_dialogue_3"})
    assert data_error(path) == (
        f"{path}:2: the row has no 'output' (its keys: prompt, source)\n"
        "  fix: give every row an 'output' string with the scene's turns as `Name (speaking): text<|eot|>`"
    )


def test_rows_of_the_wrong_shape(tmp_path):
    path = jsonl(tmp_path, '["a list"]')
    assert data_error(path).startswith(f"{path}:1: the line is a JSON list, not an object\n  fix: make each line one JSON object")
    path = jsonl(tmp_path, {"output": ["A (speaking): hi"]})
    assert data_error(path).startswith(f"{path}:1: 'output' is list, not a string\n  fix: make 'output' a JSON string; ")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"output": "Beethoven (speaking): Schön<|eot|>"}\n'.encode("latin-1"))
    assert data_error(path) == f"{path}:1: byte 0xf6 at byte offset 37 is not valid UTF-8\n  fix: re-save the file as UTF-8"


def test_bad_protective_files(tmp_path):
    data = jsonl(tmp_path, {"output": "A (speaking): hi<|eot|>"})
    fix = '  fix: make the file a JSON list of scenes {"dialogue": [{"role": "...", "action": "(speaking)", "content": "..."}], ...}'
    protective = tmp_path / "p.json"
    protective.write_text('{"dialogue": []}', encoding="utf-8")
    assert data_error(data, protective) == f"{protective}: the file holds a JSON dict, not a list of scenes\n{fix}"
    protective.write_text('[{"dialogue": []},\n {"setting": "x"}]', encoding="utf-8")
    assert data_error(data, protective) == f"{protective}: scene 2 (of 2) has no 'dialogue' list\n{fix}"
    protective.write_text('[{"dialogue": [{"role": "Lily"}]}]', encoding="utf-8")
    assert data_error(data, protective) == (
        f"{protective}: turn 1 of scene 1 needs a 'role' and a 'content' string, got {{\"role\": \"Lily\"}}\n{fix}"
    )
    protective.write_text('[\n{"dialogue": []\n]', encoding="utf-8")
    assert data_error(data, protective) == f"{protective}:3: the file is not valid JSON (Expecting ',' delimiter at column 1)\n{fix}"


# ---------------------------------------------------------------- the template


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(ModelConfig()))


BEETHOVEN = CharacterConfig(
    name="Beethoven",
    system_prompt="I want you to act like Ludwig van Beethoven.\n\nThe status of you is as follows:\nLocation: Bonn\n"
    "Status: A lesson.\n\nThe interactions are as follows:\n",
)
CONTEXTS = {
    "empty": [],
    "others only": [("Johann", "Practise, Ludwig!"), ("Neefe", "Let him rest.")],
    "mixed": [("Johann", "Practise!"), ("Beethoven", "(thinking) Again?"), ("Beethoven", "Yes."), ("Karl Alois, Prince Lichnowsky", "Bravo: indeed.")],
    "odd text": [("Lily", 'Quotes " and \\ and {{ x }} and {% if %} and émoji 😀'), ("Beethoven", "Line\nbreak")],
}


def turns_of(pairs) -> list[dict]:
    return [{"speaker": speaker, "text": text} for speaker, text in pairs]


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("completion", ["My friends, I shall.", "(thinking) Quiet.", '"Ludwig!"', "...what?"])
def test_template_contract(tokenizer, context, completion):
    messages = context_to_messages(turns_of(CONTEXTS[context]), "Beethoven")
    prompt = render_prompt("characterllm_meta", tokenizer, messages, BEETHOVEN)
    exported = export_chat_template("characterllm_meta", tokenizer, BEETHOVEN)
    if messages:  # the exported template alone gives the training prompt (transformers refuses an empty chat)
        assert tokenizer.apply_chat_template(messages, chat_template=exported, add_generation_prompt=True, tokenize=False) == prompt
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], chat_template=exported, tokenize=False)
    assert full == prompt + completion + tokenizer.eos_token
    # the prompt ends on a token boundary: its tokens are a prefix of the whole sample's (TRL masks them)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert tokenizer(full)["input_ids"][: len(prompt_ids)] == prompt_ids


def test_template_renders_character_llm_turns(tokenizer):
    messages = context_to_messages(turns_of(CONTEXTS["mixed"]), "Beethoven")
    eos = tokenizer.eos_token
    assert render_prompt("characterllm_meta", tokenizer, messages, BEETHOVEN) == (
        BEETHOVEN.system.strip() + "\n\n"
        f"Johann (speaking):\nPractise!{eos}\n"
        f"Beethoven (thinking):\nAgain?{eos}\n"
        f"Beethoven (speaking):\nYes.{eos}\n"
        f"Karl Alois, Prince Lichnowsky (speaking):\nBravo: indeed.{eos}\n"
        "Beethoven (speaking):\n"
    )
    # a chat message with no speaker prefix is the interviewer's ("Man", as in Character-LLM's interviews);
    # lines without a prefix continue the turn before them
    exported = export_chat_template("characterllm_meta", tokenizer, BEETHOVEN)
    chat = [{"role": "user", "content": "What do you think of your father?\nTell me honestly."}]
    assert tokenizer.apply_chat_template(chat, chat_template=exported, add_generation_prompt=True, tokenize=False) == (
        BEETHOVEN.system.strip() + f"\n\nMan (speaking):\nWhat do you think of your father?\nTell me honestly.{eos}\nBeethoven (speaking):\n"
    )


def test_recipe_prompt_is_character_llm_meta_prompt(tokenizer, shared):
    """The recipe's preamble is Character-LLM's SFT meta prompt filled with its Location and Status."""
    recipe = load_recipe(RECIPE)
    system = recipe.character.system
    location = re.search(r"^Location: (.*)$", system, re.M).group(1)
    status = re.search(r"^Status: (.*)$", system, re.M).group(1)
    seed = (shared / META_PROMPT).read_text(encoding="utf-8")
    expected = seed.format(character="Ludwig van Beethoven", loc_time=location, status=status)
    prompt = render_prompt("characterllm_meta", tokenizer, [{"role": "user", "content": "Lily: Hello."}], recipe.character)
    preamble = prompt[: prompt.index("Lily (speaking):")]
    assert [line.rstrip() for line in preamble.splitlines()] == [line.rstrip() for line in (expected + "\n").splitlines()]
    assert preamble.endswith("The interactions are as follows:\n\n")
