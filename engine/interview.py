"""Interviews, as Character-LLM runs them: the model answers questions in character, one at a time or in a conversation.

Questions come from a file in Character-LLM's question format (`data/seed_data/questions/
generated_agent_interview*_<Character>.json` in choosewhatulike/character-llm): a JSON list of

    {"topic_id": "topic-2", "topic": "interpersonal relationships", "question": "What do you think of your father?"}

When a recipe names no file, the character-neutral set shipped in evaluation/questions/general.json is used. Our
files may add `"follow_ups": ["...", "..."]` to an entry: the questions asked after it in the same conversation
(Character-LLM readers ignore the key; Character-LLM itself had an LLM interviewer improvise them). An entry without
its own follow-ups gets the config's generic ones when it is picked for a multi-turn interview.

`max_questions` entries are picked round-robin over the topics in the order they first appear (so a file grouped by
topic still yields one question of each kind); the first `multi_turn` of them are multi-turn interviews: the question,
then its follow-ups, each asked with the model's earlier answers in the history. The model folder is the exported one,
whose chat template already carries the persona's system prompt, so only user/assistant messages are sent.

Outputs in `out/`: interviews.jsonl (one interview a line: id, kind single|multi, topic, turns [{question, answer}],
generation settings) and interviews.md (a readable transcript).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.errors import DataError, MissingInputError
from engine.registry import InputFile

# The character-neutral questions used when a recipe names none (next to the lm-eval task templates).
GENERAL_QUESTIONS = Path(__file__).resolve().parents[1] / "evaluation" / "questions" / "general.json"

FORMAT_FIX = (
    'write a JSON list of {"topic_id": "...", "topic": "...", "question": "...", "follow_ups": ["...", ...]} '
    "(only `question` is required), as in Character-LLM's data/seed_data/questions/generated_agent_interview_*.json"
)


class InterviewConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Interview the tuned model (interviews.jsonl and interviews.md in the eval folder).")
    questions: Optional[str] = Field(
        None,
        description="A question file in Character-LLM's format (a JSON list of {topic_id, topic, question}, optional "
        "follow_ups), relative to the recipe's folder or to a RECIPE_DATA_PATH folder; null = the shipped "
        "character-neutral set (evaluation/questions/general.json).",
    )
    max_questions: int = Field(6, ge=1, description="How many questions are asked, picked round-robin over the file's topics.")
    multi_turn: int = Field(
        2, ge=0, description="How many of those questions open a multi-turn interview (the question, then its follow-ups, in one conversation)."
    )
    max_follow_ups: int = Field(2, ge=1, description="At most this many follow-ups per multi-turn interview.")
    follow_ups: list[str] = Field(
        ["Why do you say that?", "Tell me more about that. What happened then?"],
        description="Follow-ups for a multi-turn question that has no `follow_ups` of its own (Character-LLM's files have none).",
    )
    max_new_tokens: int = Field(96, ge=1, description="Longest answer, in tokens.")
    do_sample: bool = Field(False, description="Sample the answers instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (only with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (only with do_sample).")
    repetition_penalty: float = Field(1.3, ge=1.0, description="Penalty on repeated tokens (1.0 = none).")
    seed: int = Field(0, description="Seed of the sampling.")
    batch_size: int = Field(8, ge=1, description="Conversations generated together; does not change greedy answers beyond float noise.")

    @model_validator(mode="after")
    def _multi_within_max(self) -> "InterviewConfig":
        if self.multi_turn > self.max_questions:
            raise ValueError(
                f"multi_turn ({self.multi_turn}) is more than max_questions ({self.max_questions}): "
                "multi_turn counts how many of the asked questions get follow-ups"
            )
        return self

    def generation(self) -> dict[str, Any]:
        """The settings that shape the answers, recorded with each interview."""
        settings: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }
        if self.do_sample:
            settings.update(temperature=self.temperature, top_p=self.top_p)
        return settings


# ---------------------------------------------------------------- the question file


def question_file(cfg: InterviewConfig, recipe_dir: Path | None = None) -> InputFile:
    """The question file the config names (or the shipped set), with its sha256 (for the eval stage's cache key)."""
    from engine.datafiles import DataRef, resolve, sha256_file

    if cfg.questions is None:
        return InputFile(path=GENERAL_QUESTIONS, sha256=sha256_file(GENERAL_QUESTIONS))
    try:
        return resolve(DataRef(path=cfg.questions), recipe_dir or Path.cwd(), download=False)
    except MissingInputError as exc:
        raise DataError(
            cfg.questions,
            f"question file not found ({exc})",
            fix="set eval.interviews.questions to a Character-LLM question file (relative to the recipe or to a "
            "RECIPE_DATA_PATH folder), or to null for the shipped general questions",
        ) from None


def read_questions(path: Path) -> list[dict]:
    """The entries of a Character-LLM question file: {topic_id, topic, question, follow_ups}, checked one by one."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(name, "question file not found", fix=FORMAT_FIX) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(name, f"cannot read the question file ({exc})", fix="save it as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(name, f"not valid JSON: {exc.msg} (column {exc.colno})", row=exc.lineno, fix=FORMAT_FIX) from None
    if not isinstance(data, list):
        raise DataError(name, f"the file holds a JSON {type(data).__name__}, not a list of questions", fix=FORMAT_FIX)
    if not data:
        raise DataError(name, "the question list is empty", fix=FORMAT_FIX)
    return [_entry(name, number, raw) for number, raw in enumerate(data, start=1)]


def _entry(name: str, number: int, raw: Any) -> dict:
    where = f"entry {number}"
    if not isinstance(raw, dict):
        raise DataError(name, f"{where} is a JSON {type(raw).__name__}, not an object", fix=FORMAT_FIX)
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        got = "missing" if question is None else f"{json.dumps(question, ensure_ascii=False)[:60]}"
        raise DataError(name, f"{where}: 'question' must be a non-empty string (got {got})", fix=FORMAT_FIX)
    follow_ups = raw.get("follow_ups", [])
    if not isinstance(follow_ups, list) or not all(isinstance(f, str) and f.strip() for f in follow_ups):
        raise DataError(name, f"{where} ({question[:40]!r}): 'follow_ups' must be a list of non-empty strings", fix=FORMAT_FIX)
    return {
        "number": number,
        "topic_id": str(raw.get("topic_id") or ""),
        "topic": str(raw.get("topic") or ""),
        "question": question.strip(),
        "follow_ups": [f.strip() for f in follow_ups],
    }


def pick_questions(entries: list[dict], n: int) -> list[dict]:
    """`n` entries, round-robin over the topics in order of first appearance, file order within a topic."""
    by_topic: dict[str, list[dict]] = {}
    for entry in entries:
        by_topic.setdefault(entry["topic_id"] or entry["topic"], []).append(entry)
    queues = list(by_topic.values())
    picked: list[dict] = []
    depth = 0
    while len(picked) < min(n, len(entries)):
        for queue in queues:
            if depth < len(queue) and len(picked) < n:
                picked.append(queue[depth])
        depth += 1
    return picked


def plan_interviews(entries: list[dict], cfg: InterviewConfig) -> list[dict]:
    """The interviews to run: id, kind, topic and the questions in order (one, or one plus its follow-ups)."""
    plans = []
    for position, entry in enumerate(pick_questions(entries, cfg.max_questions)):
        multi = position < cfg.multi_turn
        follow = (entry["follow_ups"] or cfg.follow_ups)[: cfg.max_follow_ups] if multi else []
        plans.append(
            {
                "id": f"{position + 1:02d}-q{entry['number']}",
                "kind": "multi" if multi and follow else "single",
                "topic_id": entry["topic_id"],
                "topic": entry["topic"],
                "questions": [entry["question"], *follow],
            }
        )
    return plans


# ---------------------------------------------------------------- generation


def conversation(turns: list[dict], question: str, system_prompt: str | None = None) -> list[dict]:
    """The chat messages for the next answer: earlier questions and answers, then the new question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in turns:
        messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
    return messages + [{"role": "user", "content": question}]


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The model's input text for one conversation, ending where the character's answer starts."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


def _generate_texts(model: Any, tokenizer: Any, prompts: list[str], cfg: InterviewConfig) -> list[str]:
    """Answers to rendered prompts, `batch_size` at a time, left-padded, stopping at end of turn."""
    import torch

    eos = _eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    kwargs: dict[str, Any] = {
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.do_sample,
        "repetition_penalty": cfg.repetition_penalty,
        "eos_token_id": eos or None,
        "pad_token_id": pad,
    }
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:  # greedy: do not inherit sampling knobs from the model's generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    answers: list[str] = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        # the rendered text already holds the template's special tokens: no second BOS
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            output = model.generate(**encoded, **kwargs)
        width = encoded["input_ids"].shape[1]
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    return answers


def _load(model_dir: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- the run


def run_interviews(
    model_dir: Path,
    cfg: InterviewConfig,
    out: Path,
    console: Any,
    recipe_dir: Path | None = None,
    trust_remote_code: bool = False,
    *,
    character: Any = None,
    system_prompt: str | None = None,
) -> dict:
    """Interview the model in `model_dir`; write out/interviews.jsonl and out/interviews.md; return a small summary.

    `character` (engine.persona.CharacterConfig) names the character in the transcript. `system_prompt` is sent as a
    system message: leave it None for an exported model (its template carries the persona), set it to interview a
    model whose template does not (the base model with the persona's prompt).
    """
    import torch

    source = question_file(cfg, recipe_dir)
    plans = plan_interviews(read_questions(source.path), cfg)
    model, tokenizer = _load(Path(model_dir), trust_remote_code)
    torch.manual_seed(cfg.seed)
    records = [{**{k: plan[k] for k in ("id", "kind", "topic_id", "topic")}, "turns": []} for plan in plans]
    rounds = max(len(plan["questions"]) for plan in plans)
    _say(console, f"interviews: {len(plans)} ({sum(r['kind'] == 'multi' for r in records)} multi-turn) from {source.path.name}")
    for turn in range(rounds):  # every conversation's turn t is generated in one batch: the history is complete
        active = [i for i, plan in enumerate(plans) if turn < len(plan["questions"])]
        prompts = [
            render_prompt(tokenizer, conversation(records[i]["turns"], plans[i]["questions"][turn], system_prompt)) for i in active
        ]
        for i, answer in zip(active, _generate_texts(model, tokenizer, prompts, cfg)):
            records[i]["turns"].append({"question": plans[i]["questions"][turn], "answer": answer})
    settings = {**cfg.generation(), "questions": str(cfg.questions) if cfg.questions else "general"}
    for record in records:
        record["generation"] = settings

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "interviews.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    name = getattr(character, "shown_name", None) or "Character"
    write_transcript(out / "interviews.md", name, records)
    turns = sum(len(record["turns"]) for record in records)
    _say(console, f"interviews: {turns} answers written to {out / 'interviews.md'}")
    return {
        "interviews": len(records),
        "turns": turns,
        "samples": [{k: record["turns"][0][k] for k in ("question", "answer")} for record in records[:2]],
    }


def read_interviews(path: Path) -> list[dict]:
    """The records of an interviews.jsonl (what judge_interviews takes)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_transcript(path: Path, name: str, records: list[dict]) -> None:
    parts = [f"# Interviews with {name}\n"]
    for record in records:
        label = "multi-turn" if record["kind"] == "multi" else "single-turn"
        topic = f", {record['topic']}" if record.get("topic") else ""
        parts.append(f"## {record['id']} ({label}{topic})\n")
        for turn in record["turns"]:
            answer = turn["answer"] or "_(no answer)_"
            parts.append(f"**Interviewer:** {turn['question']}\n\n**{name}:** {answer}\n")
    path.write_text("\n".join(parts), encoding="utf-8")


def _say(console: Any, message: str) -> None:
    if console is not None:
        console.print(message)
