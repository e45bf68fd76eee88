"""Interviews: Character-LLM's question files (the real Beethoven ones and broken ones), the shipped general set, the
choice of questions, and a run on a tiny random model (the files, the multi-turn history).

    RECIPE_DATA_PATH=../shared/data python -m pytest -q tests/test_interview.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from pydantic import ValidationError

from engine import interview
from engine.errors import DataError
from engine.interview import (
    GENERAL_QUESTIONS,
    InterviewConfig,
    conversation,
    pick_questions,
    plan_interviews,
    question_file,
    read_interviews,
    read_questions,
    run_interviews,
)
from engine.persona import CharacterConfig

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = "character-llm/choosewhatulike__trainable-agents/data/seed_data/questions"
CHARACTER_LLM_KEYS = {"topic_id", "topic", "question"}


# ---------------------------------------------------------------- question files


def test_general_set_is_in_character_llm_format_and_covers_the_kinds():
    raw = json.loads(GENERAL_QUESTIONS.read_text(encoding="utf-8"))
    assert 10 <= len(raw) <= 16
    for entry in raw:  # what a Character-LLM reader needs, plus our optional follow_ups
        assert CHARACTER_LLM_KEYS <= set(entry) <= CHARACTER_LLM_KEYS | {"follow_ups"}
        assert entry["topic_id"].startswith("topic-") and entry["question"].strip()
        assert 1 <= len(entry["follow_ups"]) <= 2
    entries = read_questions(GENERAL_QUESTIONS)
    picked = pick_questions(entries, InterviewConfig().max_questions)
    # the default six: one of each topic (who are you, a provocation, values, a relationship, what it cannot know) + a memory
    assert [e["topic_id"] for e in picked] == ["topic-1", "topic-4", "topic-3", "topic-2", "topic-5", "topic-1"]
    assert picked[0]["question"].startswith("Who are you")


def test_reads_the_real_character_llm_files(data_path_env, tmp_path):
    single = question_file(InterviewConfig(questions=f"{QUESTIONS}/generated_agent_interview_Beethoven.json"), tmp_path)
    assert single.path.is_file() and len(single.sha256) == 64  # found through RECIPE_DATA_PATH
    entries = read_questions(single.path)
    assert len(entries) == 82
    assert entries[0] == {
        "number": 1,
        "topic_id": "topic-2",
        "topic": "interpersonal relationships",
        "question": "What do you think of your father?",
        "follow_ups": [],
    }
    picked = pick_questions(entries, 6)  # the file is grouped loosely by topic: round-robin reaches all four
    assert {e["topic_id"] for e in picked} == {"topic-1", "topic-2", "topic-3", "topic-4"}
    assert [e["number"] for e in picked[:2]] == [1, 3]

    multi = read_questions(data_path_env / QUESTIONS / "generated_agent_interview_for_multiturn_Beethoven.json")
    assert len(multi) == 50 and multi[0]["question"].startswith("Ludwig, what preference")
    plans = plan_interviews(multi, InterviewConfig(max_questions=3, multi_turn=2, follow_ups=["Why?", "How so?", "And then?"]))
    assert [p["kind"] for p in plans] == ["multi", "multi", "single"]
    assert plans[0]["questions"][1:] == ["Why?", "How so?"]  # no follow-ups in the file: the config's, at most 2
    assert len(plans[2]["questions"]) == 1


def test_shipped_set_is_the_default_and_is_hashed():
    found = question_file(InterviewConfig())
    assert found.path == GENERAL_QUESTIONS and len(found.sha256) == 64


@pytest.mark.parametrize(
    ("text", "expected", "row"),
    [
        ('[{"question": "Who are you?"},\n {"question": "Why?",}]', "not valid JSON", 2),
        ('{"question": "Who are you?"}', "JSON dict, not a list", None),
        ("[]", "the question list is empty", None),
        ('[{"question": "Who?"}, {"topic": "values", "question": ""}]', "entry 2: 'question' must be a non-empty string", None),
        ('[{"question": "Who?"}, {"topic": "values"}]', "entry 2: 'question' must be a non-empty string (got missing)", None),
        ('["Who are you?"]', "entry 1 is a JSON str, not an object", None),
        ('[{"question": "Who?", "follow_ups": "Why?"}]', "entry 1 ('Who?'): 'follow_ups' must be a list", None),
    ],
)
def test_broken_question_file_names_the_entry_and_the_fix(tmp_path, text, expected, row):
    path = tmp_path / "questions.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_questions(path)
    assert expected in str(caught.value)
    assert caught.value.row == row and caught.value.file == str(path)
    assert "fix:" in str(caught.value) and "generated_agent_interview" in caught.value.fix


def test_missing_question_file_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_DATA_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as caught:
        question_file(InterviewConfig(questions="questions/mine.json"), tmp_path)
    assert caught.value.file == "questions/mine.json"
    assert "not found" in str(caught.value) and "eval.interviews.questions" in caught.value.fix


def test_config_checks():
    with pytest.raises(ValidationError, match="multi_turn"):
        InterviewConfig(max_questions=2, multi_turn=3)
    with pytest.raises(ValidationError, match="extra"):
        InterviewConfig(max_question=3)
    assert all(field.description for field in InterviewConfig.model_fields.values())
    assert InterviewConfig().generation() == {"max_new_tokens": 96, "do_sample": False, "repetition_penalty": 1.3, "seed": 0}
    assert InterviewConfig(do_sample=True).generation()["temperature"] == 0.7


def test_conversation_messages():
    turns = [{"question": "Who are you?", "answer": "Sir John."}]
    assert conversation(turns, "Why?") == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Sir John."},
        {"role": "user", "content": "Why?"},
    ]
    assert conversation([], "Who?", "You are Falstaff.")[0] == {"role": "system", "content": "You are Falstaff."}


def test_importing_is_light():
    code = "import sys, engine.interview, engine.judge; print(sorted(m for m in ('torch', 'transformers', 'openai') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- a run on a tiny random model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rich.console import Console

    from engine.models import TINY_OVERRIDES, ModelConfig, resolve_base_model

    model_dir = resolve_base_model(ModelConfig(random_init=True, config_overrides=dict(TINY_OVERRIDES)))
    out = tmp_path_factory.mktemp("interviews")
    cfg = InterviewConfig(max_questions=3, multi_turn=1, max_new_tokens=6)
    calls: list[list[str]] = []
    real = interview._generate_texts

    def spy(model, tokenizer, prompts, config):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, config)

    interview._generate_texts = spy
    try:
        character = CharacterConfig(name="FALSTAFF", display_name="Sir John Falstaff")
        summary = run_interviews(model_dir, cfg, out, Console(quiet=True), character=character)
    finally:
        interview._generate_texts = real
    return summary, out, calls


def test_run_writes_records_and_transcript(tiny_run):
    summary, out, calls = tiny_run
    records = read_interviews(out / "interviews.jsonl")
    assert [r["kind"] for r in records] == ["multi", "single", "single"]
    assert [len(r["turns"]) for r in records] == [3, 1, 1]
    assert records[0]["turns"][0]["question"] == "Who are you? Tell me a little about yourself."
    assert records[0]["turns"][1]["question"] == "What would the people who know you best say about you?"
    assert records[0]["topic_id"] == "topic-1" and records[0]["id"] == "01-q1"
    assert records[0]["generation"] == {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.3, "seed": 0, "questions": "general"}
    assert summary == {
        "interviews": 3,
        "turns": 5,
        "samples": [{k: records[i]["turns"][0][k] for k in ("question", "answer")} for i in (0, 1)],
    }
    text = (out / "interviews.md").read_text(encoding="utf-8")
    assert text.startswith("# Interviews with Sir John Falstaff")
    assert "**Sir John Falstaff:**" in text and "**Interviewer:** Who are you?" in text and "multi-turn" in text


def test_multi_turn_history_holds_the_earlier_answers(tiny_run):
    _, out, calls = tiny_run
    records = read_interviews(out / "interviews.jsonl")
    assert [len(c) for c in calls] == [3, 1, 1]  # turn 1 of all three interviews batched, then the follow-ups
    first, second = records[0]["turns"][:2]
    assert first["answer"], "the tiny model produced no text to look for"
    follow_up_prompt = calls[1][0]
    assert first["question"] in follow_up_prompt and first["answer"] in follow_up_prompt
    assert follow_up_prompt.rstrip().endswith("assistant")  # SmolLM2's template: the generation prompt comes last
    assert second["answer"] in calls[2][0] and first["answer"] in calls[2][0]
    assert records[1]["turns"][0]["question"] not in follow_up_prompt  # conversations do not leak into each other
