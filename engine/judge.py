"""The optional judge: an LLM behind any OpenAI-compatible chat-completions endpoint scores each interview 1-7 on
Character-LLM's five dimensions (memorization, values, personality, hallucination, stability).

As in Character-LLM (data/seed_data/prompts/prompt_score_llm_*.txt), every dimension is its own request: the judge
reads the character brief (the persona's system prompt), an optional profile, the whole interview, ONE criterion
with its steps, reasons briefly and ends with `{"score": N}`. One request per dimension costs five times the calls
of one all-in-one request, but a small local judge keeps to one criterion far better, one dimension's impression
does not colour the others, and a reply that cannot be read loses one score, not five.

The reply is read robustly: the last JSON object with a `score` key first, then a line that holds only a number
("6", "Score: 6", "**6/7**"), then "score: N" anywhere. A score outside 1-7, or none, is recorded as null with the
raw reply kept. A request that still fails after the client's retries (HTTP error, timeout, no server) is a
StageError naming the endpoint and the fix, never a traceback.

The API key is read from the environment variable `api_key_env` at run time, never from the recipe; local servers
that need none get the placeholder "EMPTY". Output: out/judge.jsonl, one interview a line with, per dimension, the
score, the raw reply and why a score is missing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.errors import DataError, MissingInputError, StageError

Dimension = Literal["memorization", "values", "personality", "hallucination", "stability"]
DIMENSIONS: tuple[str, ...] = ("memorization", "values", "personality", "hallucination", "stability")


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Score the interviews with an LLM judge (needs base_url and model).")
    base_url: Optional[str] = Field(
        None, description="The judge's OpenAI-compatible API, up to /v1 (e.g. http://127.0.0.1:8000/v1 for vLLM, llama.cpp or `transformers serve`)."
    )
    model: Optional[str] = Field(None, description="The model name the endpoint serves (the `model` of each request).")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Environment variable that holds the API key (never put the key in the recipe); unset is fine for local servers.",
    )
    dimensions: list[Dimension] = Field(
        list(DIMENSIONS), min_length=1, description="Which of Character-LLM's five dimensions to score (one request each per interview)."
    )
    profile: Optional[str] = Field(
        None,
        description="A text file about the character (e.g. Character-LLM's wiki profile) shown to the judge, relative to the recipe "
        "or to a RECIPE_DATA_PATH folder; the persona's system prompt is always shown.",
    )
    profile_max_chars: int = Field(6000, ge=0, description="The profile is cut to this many characters.")
    temperature: float = Field(0.0, ge=0, description="The judge's sampling temperature.")
    max_tokens: int = Field(400, ge=16, description="Longest judge reply, in tokens (its reasoning and the score).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one reply.")
    max_retries: int = Field(2, ge=0, description="Retries of a failed request (with backoff) before the stage fails.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> "JudgeConfig":
        missing = [key for key in ("base_url", "model") if self.enabled and not getattr(self, key)]
        if missing:
            raise ValueError(
                f"the judge is enabled but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; fix: set "
                "base_url to an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) and model to the name it serves, "
                "or set enabled: false"
            )
        return self


# ---------------------------------------------------------------- the rubric (our wording of Character-LLM's criteria)

RUBRIC: dict[str, dict[str, Any]] = {
    "memorization": {
        "title": "Memorization",
        "question": "Do the answers recall true, specific facts about the character's life (people, places, events, "
        "works, habits) rather than vague statements that could fit anyone?",
        "steps": [
            "Note which facts about the character each question calls for.",
            "Check every fact the answers state against the brief, the profile (if any) and what is known of the character.",
            "Reward details that are correct and specific; penalise wrong facts, invented biography and generic filler.",
        ],
        "scale": "1 = wrong or no facts; 4 = some correct facts, mostly generic; 7 = accurate and rich in specific detail",
    },
    "values": {
        "title": "Values",
        "question": "Do the answers express the character's own values, beliefs and priorities: what they care about, "
        "approve of and condemn, as the character holds them (not as a polite modern assistant would)?",
        "steps": [
            "Write down, from the brief, the profile and your knowledge, what the character values and believes.",
            "Find the values and judgements the answers express.",
            "Compare: consistent and clearly the character's own scores high; neutral, generic or contrary values score low.",
        ],
        "scale": "1 = values absent or contrary to the character's; 4 = partly the character's, partly generic; 7 = unmistakably the character's convictions",
    },
    "personality": {
        "title": "Personality",
        "question": "Do the answers sound like the character: temperament, manner of speech, humour, vocabulary and "
        "attitude toward the person asking?",
        "steps": [
            "Write down the character's personality and way of speaking.",
            "Read the answers for tone, wording, humour and attitude.",
            "Compare: would someone who knows the character recognise them from these answers alone?",
        ],
        "scale": "1 = not the character at all (a generic voice); 4 = recognisable in places; 7 = the character's voice throughout",
    },
    "hallucination": {
        "title": "Avoiding hallucination",
        "question": "Does the character stay within what they could know? Questions about things outside their time, "
        "world or experience (later events, modern technology, the future) should be met with ignorance, confusion or "
        "deflection in character, not with confident, knowledgeable answers.",
        "steps": [
            "Work out the character's knowledge scope: their era, world and experience.",
            "Find every piece of knowledge the answers use, and any question that lies outside that scope.",
            "Lower the score for each claim the character could not know, and for made-up facts presented as their own memories.",
        ],
        "scale": "1 = freely answers what the character cannot know; 4 = some slips; 7 = never steps outside the character's knowledge",
    },
    "stability": {
        "title": "Stability",
        "question": "Does the character stay in role through the whole interview, including provocations, requests to "
        "drop the act and follow-up questions, without turning into a generic assistant, mentioning being an AI or "
        "a language model, or changing personality from one answer to the next?",
        "steps": [
            "Read the answers one by one and note, for each, whether it is still the character speaking.",
            "Note any break: assistant phrasing, talk of being an AI, obeying an out-of-character request, a sudden change of manner.",
            "Judge the interview as a whole: consistent acting to the last answer scores high.",
        ],
        "scale": "1 = breaks character early or often; 4 = holds the role with some lapses; 7 = in character in every answer",
    },
}

SYSTEM = (
    "You are a strict, fair judge of role-play. You read an interview with an AI that plays a character and rate one "
    "quality of its answers on a scale from 1 to 7, using the whole scale."
)


def transcript(interview: dict, name: str) -> str:
    """The interview as plain text: `Interviewer: ...` / `<name>: ...`, a blank line between turns."""
    return "\n\n".join(
        f"Interviewer: {turn['question']}\n{name}: {turn['answer'] or '(no answer)'}" for turn in interview["turns"]
    )


def judge_messages(interview: dict, dimension: str, name: str, brief: str, profile: str = "") -> list[dict]:
    """The chat messages of one request: the rubric of one dimension and the interview to rate."""
    rubric = RUBRIC[dimension]
    steps = "\n".join(f"{number}. {step}" for number, step in enumerate(rubric["steps"], start=1))
    parts = [f"The AI plays {name}.", f"[Character brief]\n{brief.strip()}"]
    if profile.strip():
        parts.append(f"[Profile]\n{profile.strip()}")
    parts += [
        f"[Interview]\n{transcript(interview, name)}",
        f"[Criterion] {rubric['title']} (1-7)\n{rubric['question']}",
        f"[How to judge]\n{steps}",
        f"[Scale]\n{rubric['scale']}",
        "Reason in a few sentences, then end your reply with a line that holds only a JSON object: "
        '{"score": N}, where N is an integer from 1 to 7.',
    ]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


# ---------------------------------------------------------------- reading the score

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_NUMBER_LINE = re.compile(
    r"[\W_]*(?:(?:final\s+)?score\s*(?:is|of|=|:)?[\W_]*)?(\d+(?:\.\d+)?)\s*(?:/\s*7|out of 7)?[\W_]*", re.IGNORECASE
)
_SCORE_PHRASE = re.compile(r"score\s*(?:is|of|=|:)\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_MISSING = object()


def parse_score(reply: Optional[str]) -> tuple[Optional[float], Optional[str]]:
    """(score, None) for a score in 1-7, else (None, why): JSON first, then a bare number line, then 'score: N'."""
    if not reply or not reply.strip():
        return None, "empty reply"
    for candidate in reversed(_JSON_OBJECT.findall(reply)):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        value = next((v for k, v in obj.items() if str(k).lower() == "score"), _MISSING) if isinstance(obj, dict) else _MISSING
        if value is not _MISSING:
            return _in_range(value)
    for line in reversed(reply.strip().splitlines()):
        match = _NUMBER_LINE.fullmatch(line.strip())
        if match:
            return _in_range(match.group(1))
    phrases = _SCORE_PHRASE.findall(reply)
    if phrases:
        return _in_range(phrases[-1])
    return None, "no score found in the reply"


def _in_range(value: Any) -> tuple[Optional[float], Optional[str]]:
    if isinstance(value, bool):
        return None, f"score {value!r} is not a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"score {value!r} is not a number"
    if not 1 <= number <= 7:
        return None, f"score {value!r} is outside 1-7"
    return (int(number) if number.is_integer() else number), None


# ---------------------------------------------------------------- talking to the endpoint


def _client(cfg: JudgeConfig) -> Any:
    from openai import OpenAI

    key = os.environ.get(cfg.api_key_env) or "EMPTY"  # local servers (vLLM, llama.cpp, FastChat) accept any key
    return OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.max_retries)


def _describe(exc: Exception, cfg: JudgeConfig) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"no reply within {cfg.timeout_s:g} s"
    if isinstance(exc, openai.APIStatusError):
        hint = f" (is {cfg.api_key_env} set to the right key?)" if exc.status_code in (401, 403) else ""
        return f"HTTP {exc.status_code}: {str(exc.message)[:300]}{hint}"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot connect ({exc.__cause__ or exc})"
    return f"{type(exc).__name__}: {exc}"


def ask(client: Any, cfg: JudgeConfig, messages: list[dict], where: str) -> tuple[Optional[str], Optional[str]]:
    """(reply text, None), or (None, why) when the response has no message; a failed request is a StageError."""
    import openai

    try:
        response = client.chat.completions.create(
            model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens
        )
    except openai.OpenAIError as exc:
        raise StageError(
            "eval",
            f"the judge at {cfg.base_url} (model {cfg.model}) failed on {where}: {_describe(exc, cfg)}, after "
            f"{cfg.max_retries} retries; fix: start the server or correct eval.judge.base_url / eval.judge.model, "
            "raise eval.judge.timeout_s or max_retries, or set eval.judge.enabled: false",
        ) from None
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        return (response if isinstance(response, str) else None), "malformed response: no choices[0].message.content"
    if content is None:
        return None, "the response has no message content"
    return str(content), None


def _profile_text(cfg: JudgeConfig, recipe_dir: Path | None) -> str:
    if not cfg.profile:
        return ""
    from engine.datafiles import DataRef, resolve

    try:
        path = resolve(DataRef(path=cfg.profile), recipe_dir or Path.cwd(), download=False).path
        return path.read_text(encoding="utf-8")[: cfg.profile_max_chars]
    except (MissingInputError, OSError, UnicodeDecodeError) as exc:
        raise DataError(
            cfg.profile, f"judge profile cannot be read ({exc})", fix="set eval.judge.profile to a UTF-8 text file, or remove it"
        ) from None


# ---------------------------------------------------------------- the run


def judge_interviews(
    interviews: list[dict], character: Any, cfg: JudgeConfig, out: Path, console: Any, *, recipe_dir: Path | None = None
) -> dict:
    """Score every interview on cfg.dimensions; write out/judge.jsonl; return {"means": {dim: mean|None}, "n", "unscored"}.

    `character` is engine.persona.CharacterConfig (its shown_name and system prompt go into the request). The caller
    checks cfg.enabled.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if not cfg.base_url or not cfg.model:
        raise StageError("eval", "the judge needs eval.judge.base_url and eval.judge.model")
    name = character.shown_name
    brief = character.system
    profile = _profile_text(cfg, recipe_dir)
    client = _client(cfg)
    jobs = [(interview, dimension) for interview in interviews for dimension in cfg.dimensions]
    if console is not None:
        console.print(f"judge: {len(interviews)} interviews x {len(cfg.dimensions)} dimensions via {cfg.base_url} ({cfg.model})")

    failed = threading.Event()  # once a request has failed for good, the queued ones are not sent

    def one(job: tuple[dict, str]) -> dict | None:
        if failed.is_set():
            return None
        interview, dimension = job
        try:
            messages = judge_messages(interview, dimension, name, brief, profile)
            raw, problem = ask(client, cfg, messages, f"interview {interview['id']}, {dimension}")
        except StageError:
            failed.set()
            raise
        score, why = parse_score(raw) if problem is None else (None, problem)
        return {"score": score, "raw": raw, "error": why}

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        try:
            results = [future.result() for future in futures]  # in job order; the first failed request raises here
        except BaseException:
            failed.set()
            for future in futures:  # do not retry a dead endpoint for every remaining request
                future.cancel()
            raise

    records = []
    for index, interview in enumerate(interviews):
        chunk = results[index * len(cfg.dimensions) : (index + 1) * len(cfg.dimensions)]
        records.append({"id": interview["id"], "kind": interview.get("kind"), "dimensions": dict(zip(cfg.dimensions, chunk))})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "judge.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    means: dict[str, Optional[float]] = {}
    unscored: dict[str, int] = {}
    for dimension in cfg.dimensions:
        scores = [r["dimensions"][dimension]["score"] for r in records if r["dimensions"][dimension]["score"] is not None]
        means[dimension] = round(sum(scores) / len(scores), 3) if scores else None
        unscored[dimension] = len(records) - len(scores)
    if console is not None:
        shown = ", ".join(f"{d} {m:.2f}" if m is not None else f"{d} -" for d, m in means.items())
        console.print(f"judge: means (1-7) {shown}")
    return {"means": means, "n": len(records), "unscored": unscored, "model": cfg.model}
