"""characterllm_experience: Character-LLM's experience data (prompted SFT JSONL, optional protective scenes).

Character-LLM (EMNLP 2023, SEEDS.md section 3) turns a profile into scenes, has an LLM write each scene as a
dialogue, and stores every scene as one SFT record of the "prompted" JSONL:

    {"prompt": "I want you to act like Ludwig van Beethoven. ... Location: Concert hall\\nStatus: ...",
     "output": "Beethoven (thinking): ...<|eot|>\\nBeethoven (speaking): ...<|eot|>\\nJohann (speaking): ...<|eot|>",
     "source": "seed_dialogue_5"}

Mapping onto turns:
- Each JSONL row is one scene, `<source>/<line>` (e.g. `seed_dialogue_5/1`): a `source` id is not unique
  (in the Beethoven file the 17 protective scenes, converted into rows 541-557, reuse the ids
  seed_dialogue_0..16 of experience scenes), so the file's line number keeps them apart.
- `output` is cut at every `<|eot|>`, and also at any line that starts with a new `Name (action):` header, so
  a missing `<|eot|>` (at the end or between turns) loses nothing. Each piece is `Name (action): text`: the
  name is up to 60 characters without `( ) : " ; ! ?` (spaces, dots and commas are fine: `Dr. Wawruch`,
  `Karl Alois, Prince Lichnowsky`); whitespace around the parts and a newline after the colon are ignored.
- Action `thinking` is the speaker's inner monologue; every other action (`speaking`, and the generator's
  `whispering`, `in unison, speaking`, `excited murmurs`, ...) is a spoken turn, the action kept in
  meta["action"].
- Thinking is not trained on by default (`include_thinking: false`): the thoughts are dropped from the turns
  and kept as meta["thinking"] = [{speaker, text}, ...] of the next spoken turn of the scene (thoughts after
  the scene's last spoken turn go to its meta["thinking_after"]). With `include_thinking: true` they stay as
  turns of their speaker whose text starts with "(thinking) ": the dataset stage then trains on the
  character's thoughts like on its lines, and templates/characterllm_meta.jinja shows such turns in the
  context as `Name (thinking): ...`.
- Every turn's meta holds `location` and `status` (the prompt's "Location: ..." and "Status: ..." lines,
  "" when absent), the `source` id, the file `line` and the `action`. The meta prompt itself is not a turn:
  a recipe writes it as character.system_prompt (see recipes/characterllm_beethoven.yaml).
- Quirks of the generated file are handled here: a literal backslash-n (two characters, 172 times in the
  Beethoven file) becomes a line break; an unmatched quote that ends (or starts) a text is removed (19 in the
  Beethoven file, `...perfection."`); a piece without a `Name (action):` header (13 in the Beethoven file,
  where the generator wrote `Beethoven <thought> (speaking): <speech>` or `Grillparzer <speech> \\n: ...`)
  is skipped and counted, with a warning that names the first one's line. Speaker spellings are kept as they
  are (Beethoven, Ludwig, Ludwig van Beethoven): mapping them is clean.speaker_aliases' job.

`protective` adds Character-LLM's "protective" scenes (a JSON list of `{setting, dialogue: [{role, action,
content}], location, background, source}` in which a provocateur asks about things the character cannot know):
each record is one scene `protective/<source>/<n>` (n counts records from 1) in `dialogue` order, after all
experience scenes. Character-LLM's conversion also writes these scenes into the prompted file (the Beethoven
file's rows 541-557, with a generic "Location: A room" status and a few turns lost): a row with the same
`source` id and the same first turn (its first 80 letters and digits) as a protective record is left out, so
giving both files never trains on a scene twice, and the fuller protective version is the one kept. The
generator's quirks there: an empty or `\\n` action means speaking, and an "action" of more than four words is
the start of the utterance that slipped into the wrong field (it is put back in front of `content`). The
record's setting, location and background (a lone "." means none) go to meta.

Why there is no profile source: Character-LLM uses the profile (`wiki_<Name>.txt`) only to generate the
scenes; it never enters a training prompt. As turns it would be Narrator paragraphs that give no sample of
the character, and a recipe reads one source, so it could not be combined with the experience data anyway.
A recipe carries what the model needs to know about the character in character.system_prompt.

A row that is not JSON, not an object, or has no `output` string raises DataError with the file, the line
and the fix; so do a protective file that is not a JSON list of scenes with a `dialogue` list.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import InputFile, register_source

EOT = "<|eot|>"
THINKING_MARK = "(thinking) "
_HEADER = re.compile(r'^[ \t]*(?P<speaker>[^\n():";!?]{1,60}?)[ \t]*\((?P<action>[^()\n]{1,60})\)[ \t]*:[ \t]*\n?', re.M)
_LITERAL_NEWLINE = re.compile(r"[ \t]*\\n[ \t]*")
_LOCATION = re.compile(r"^Location:[ \t]*(.*?)[ \t]*$", re.M)
_STATUS = re.compile(r"^Status:[ \t]*(.*?)\s*(?:\n[ \t]*\n|\Z)", re.M | re.S)
_ROW_FIX = (
    'make each line one JSON object {"prompt": "...", "output": "Name (speaking): text<|eot|>...", "source": "..."} '
    "(Character-LLM's prompted format)"
)


class CharacterLLMExperienceConfig(BaseModel):
    """Read Character-LLM's prompted experience JSONL, and optionally its protective scenes."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["characterllm_experience"] = Field(
        ..., description="Source kind: Character-LLM experience data, the prompted SFT JSONL {prompt, output, source}."
    )
    data: DataRef = Field(
        ..., description="The prompted experience JSONL, e.g. prompted_agent_dialogue_Beethoven.jsonl; each row is one scene."
    )
    protective: Optional[DataRef] = Field(
        None,
        description="Character-LLM's protective scenes, a JSON list {setting, dialogue, location, background, source} "
        "(e.g. generated_agent_hallucination_Beethoven.json); each record is one more scene.",
    )
    include_thinking: bool = Field(
        False,
        description="Keep (thinking) turns, the inner monologue, as turns whose text starts with '(thinking) ' (trained on "
        "like spoken lines); when false they are dropped and kept in meta['thinking'] of the next spoken turn.",
    )


def _files(config: CharacterLLMExperienceConfig) -> dict[str, DataRef]:
    files = {"data": config.data}
    if config.protective is not None:
        files["protective"] = config.protective
    return files


def _text(raw: str) -> str:
    """A turn's text: literal backslash-n sequences become line breaks, outer whitespace and a stray quote go."""
    text = _LITERAL_NEWLINE.sub("\n", raw).strip()
    if text.count('"') % 2:  # an unmatched quote at one end only: the generator's leftover, not a quotation
        if text.endswith('"') and not text.startswith('"'):
            text = text[:-1].rstrip()
        elif text.startswith('"') and not text.endswith('"'):
            text = text[1:].lstrip()
    return text


def _decode(raw: bytes, file: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            file,
            f"byte 0x{raw[exc.start]:02x} at byte offset {exc.start} is not valid UTF-8",
            row=raw.count(b"\n", 0, exc.start) + 1,
            fix="re-save the file as UTF-8",
        ) from None


def parse_output(output: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """`Name (action): text<|eot|>...` -> ([(speaker, action, text)], [pieces without a header])."""
    turns: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for segment in output.split(EOT):
        if not segment.strip():
            continue
        headers = list(_HEADER.finditer(segment))
        start = headers[0].start() if headers else len(segment)
        if segment[:start].strip():
            skipped.append(segment[:start].strip())  # text before the first header (or no header at all)
        for number, header in enumerate(headers):
            end = headers[number + 1].start() if number + 1 < len(headers) else len(segment)
            action = " ".join(header.group("action").split())
            turns.append((header.group("speaker").strip(), action, _text(segment[header.end() : end])))
    return turns, skipped


def prompt_status(prompt: str) -> dict[str, str]:
    """The meta prompt's "Location: ..." and "Status: ..." lines ("" when a line is missing)."""
    location = _LOCATION.search(prompt)
    status = _STATUS.search(prompt)
    return {
        "location": location.group(1) if location else "",
        "status": " ".join(status.group(1).split()) if status else "",
    }


def _scene_turns(scene: str, raw_turns: list[tuple[str, str, str]], meta: dict, include_thinking: bool) -> list[dict]:
    """Turns of one scene; thinking dropped into the next spoken turn's meta unless include_thinking."""
    turns: list[dict] = []
    thoughts: list[dict] = []
    for speaker, action, text in raw_turns:
        thinking = action.lower() == "thinking"
        if thinking and not include_thinking:
            if text:
                thoughts.append({"speaker": speaker, "text": text})
            continue
        turn_meta = dict(meta, action=action)
        if thoughts:
            turn_meta["thinking"], thoughts = thoughts, []
        turns.append(
            {
                "scene": scene,
                "index": len(turns),
                "speaker": speaker,
                "text": THINKING_MARK + text if thinking else text,
                "meta": turn_meta,
            }
        )
    if thoughts and turns:
        turns[-1]["meta"]["thinking_after"] = thoughts
    return turns


def _field(row: dict, key: str, file: str, line: int) -> str:
    value = row.get(key, "")
    if not isinstance(value, str):
        raise DataError(
            file, f"'{key}' is {type(value).__name__}, not a string", row=line, fix=f"make '{key}' a JSON string; " + _ROW_FIX
        )
    return value


def read_experience(path: Any, include_thinking: bool, stats: dict, replaced: set = frozenset()) -> Iterator[dict]:
    """The scenes of a prompted experience JSONL file, one per row, in file order (rows in `replaced` skipped)."""
    file = str(path)
    text = _decode(path.read_bytes(), file)
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                file, f"the line is not valid JSON ({exc.msg} at column {exc.colno})", row=line, fix=_ROW_FIX
            ) from None
        if not isinstance(row, dict):
            raise DataError(file, f"the line is a JSON {type(row).__name__}, not an object", row=line, fix=_ROW_FIX)
        if "output" not in row:
            keys = ", ".join(row) or "none"
            raise DataError(
                file,
                f"the row has no 'output' (its keys: {keys})",
                row=line,
                fix="give every row an 'output' string with the scene's turns as `Name (speaking): text<|eot|>`",
            )
        output = _field(row, "output", file, line)
        source = _field(row, "source", file, line).strip() or "row"
        raw_turns, skipped = parse_output(output)
        stats["rows"] += 1
        if raw_turns and fingerprint(source, raw_turns[0][2]) in replaced:
            stats["replaced"] += 1  # the same protective scene, converted: the protective file's version wins
            continue
        stats["skipped"] += len(skipped)
        if skipped and stats["first_skipped"] is None:
            stats["first_skipped"] = (line, skipped[0])
        if not raw_turns and output.strip():
            stats["rows_without_turns"] += 1
        meta = {"source": source, "line": line, **prompt_status(_field(row, "prompt", file, line))}
        turns = _scene_turns(f"{source}/{line}", raw_turns, meta, include_thinking)
        stats["thinking"] += sum(1 for _, action, _ in raw_turns if action.lower() == "thinking")
        yield from turns


def _protective_action(action: Any, content: str) -> tuple[str, str]:
    """(action, content) with the generator's slips repaired: '' or '\\n' -> speaking; text in `action` goes back."""
    cleaned = _text(str(action or "")).strip("() \n")
    if not cleaned:
        return "speaking", content
    if len(cleaned.split()) > 4:  # the utterance's beginning, written into the action field
        return "speaking", f"{cleaned}\n{content}".strip()
    return " ".join(cleaned.split()), content


def read_protective(path: Any) -> tuple[list[tuple[str, list[tuple[str, str, str]], dict]], set[tuple[str, str]]]:
    """Character-LLM's protective scenes (JSON list): [(scene id, [(speaker, action, text)], meta)], one per
    record, and the fingerprints of their converted copies (source id, first `content` as written)."""
    file = str(path)
    fix = 'make the file a JSON list of scenes {"dialogue": [{"role": "...", "action": "(speaking)", "content": "..."}], ...}'
    try:
        records = json.loads(_decode(path.read_bytes(), file))
    except json.JSONDecodeError as exc:
        raise DataError(file, f"the file is not valid JSON ({exc.msg} at column {exc.colno})", row=exc.lineno, fix=fix) from None
    if not isinstance(records, list):
        raise DataError(file, f"the file holds a JSON {type(records).__name__}, not a list of scenes", fix=fix)
    scenes, copies = [], set()
    for number, record in enumerate(records, 1):
        dialogue = record.get("dialogue") if isinstance(record, dict) else None
        if not isinstance(dialogue, list):
            raise DataError(file, f"scene {number} (of {len(records)}) has no 'dialogue' list", fix=fix)
        raw_turns = []
        for position, turn in enumerate(dialogue, 1):
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise DataError(
                    file,
                    f"turn {position} of scene {number} needs a 'role' and a 'content' string, got {json.dumps(turn)[:80]}",
                    fix=fix,
                )
            action, content = _protective_action(turn.get("action"), _text(turn["content"]))
            raw_turns.append((turn["role"].strip(), action, content))
        source = str(record.get("source") or "scene").strip()
        setting = record.get("setting", "")
        meta = {
            "source": source,
            "record": number,
            "protective": True,
            "setting": " ".join(setting) if isinstance(setting, list) else str(setting),
            "location": "" if str(record.get("location", "")).strip() in ("", ".") else str(record["location"]).strip(),
            "background": "" if str(record.get("background", "")).strip() in ("", ".") else str(record["background"]).strip(),
        }
        scenes.append((f"protective/{source}/{number}", raw_turns, meta))
        if dialogue:  # the conversion kept `content` and dropped a slipped action: compare with that
            copies.add(fingerprint(source, _text(dialogue[0]["content"])))
    return scenes, copies


def fingerprint(source: str, first_text: str) -> tuple[str, str]:
    """(source id, the first 80 letters and digits of the first turn): how a converted protective scene is recognised."""
    return source, re.sub(r"\W+", "", first_text.lower())[:80]


@register_source("characterllm_experience", config=CharacterLLMExperienceConfig, files=_files)
def read_characterllm_experience(
    config: CharacterLLMExperienceConfig, inputs: dict[str, InputFile], console: Any
) -> Iterator[dict]:
    """Character-LLM experience scenes (prompted JSONL, one scene per row) and optional protective scenes."""
    stats: dict[str, Any] = {
        "rows": 0, "skipped": 0, "first_skipped": None, "rows_without_turns": 0, "thinking": 0, "replaced": 0
    }
    protective, replaced = read_protective(inputs["protective"].path) if config.protective is not None else ([], set())
    yield from read_experience(inputs["data"].path, config.include_thinking, stats, replaced)
    for scene, raw_turns, meta in protective:
        stats["thinking"] += sum(1 for _, action, _ in raw_turns if action.lower() == "thinking")
        yield from _scene_turns(scene, raw_turns, meta, config.include_thinking)
    if console is None:
        return
    kept = "kept as '(thinking) ' turns" if config.include_thinking else "kept in meta['thinking'], not trained on"
    both = (
        f" + {len(protective)} protective scenes ({stats['replaced']} rows were converted copies of these: left out)"
        if config.protective is not None
        else ""
    )
    console.print(
        f"characterllm_experience: {stats['rows']} rows of {inputs['data'].path.name}{both}; "
        f"{stats['thinking']} thinking turns {kept}"
    )
    if stats["skipped"]:
        from rich.markup import escape

        line, piece = stats["first_skipped"]
        console.print(
            f"[yellow]{inputs['data'].path.name}: skipped {stats['skipped']} piece(s) of output without a "
            f"`Name (action):` header ({stats['rows_without_turns']} row(s) left with no turn), "
            f"e.g. line {line}: {escape(repr(piece[:60]))}[/yellow]"
        )
