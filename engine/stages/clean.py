"""clean: fix the source's turns with a few named, ordered rules and count what each rule did.

Each rule looks at one turn and returns it (changed or not) or None to remove it. The rules run in
this order: fix_unicode, normalize_whitespace, speaker_aliases, drop_speakers, drop_empty, min_chars;
a rule that its config switches off is not run and not listed. rules.json keeps, per rule, how many
turns it changed and removed and one example, so a surprising count can be traced to its cause.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import StageError
from engine.registry import StageContext, register_stage

Rule = Callable[[dict], Optional[dict]]
EXAMPLE_WIDTH = 40  # characters of each side of an example


class CleanConfig(BaseModel):
    """The `clean` section: which rules run on the source's turns."""

    model_config = ConfigDict(extra="forbid")

    fix_unicode: bool = Field(True, description="Repair mojibake (text decoded with the wrong encoding) with ftfy.")
    normalize_whitespace: bool = Field(
        True,
        description="Turn non-breaking and other Unicode spaces, tabs and newlines into plain spaces, collapse runs of "
        "spaces and strip both ends (text and speaker).",
    )
    drop_empty: bool = Field(True, description="Remove turns whose text is empty or only whitespace.")
    speaker_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Rename speakers, alias -> canonical name (e.g. Ludwig: Beethoven); "
        "applied to the stripped speaker.",
    )
    drop_speakers: list[str] = Field(
        default_factory=list,
        description="Remove the turns of these speakers (after aliasing), e.g. group speakers such as Boys.",
    )
    min_chars: int = Field(
        1, ge=0, description="Remove turns whose stripped text is shorter than this many characters (0 keeps all)."
    )


def _fix_unicode() -> Rule:
    try:
        import ftfy
    except ImportError:
        raise StageError(
            "clean", "fix_unicode needs ftfy: `pip install ftfy`, or set clean.fix_unicode: false"
        ) from None

    def fix(text: str) -> str:
        if text.isascii():
            return text  # nothing to repair, and much faster than asking ftfy
        # only the encoding repairs: quotes, ligatures, widths and normalization stay as the source wrote them
        return ftfy.fix_text(
            text,
            unescape_html=False,
            remove_terminal_escapes=False,
            fix_latin_ligatures=False,
            fix_character_width=False,
            uncurl_quotes=False,
            fix_line_breaks=False,
            remove_control_chars=False,
            normalization=None,
        )

    return lambda turn: {**turn, "speaker": fix(turn["speaker"]), "text": fix(turn["text"])}


def _normalize_whitespace(turn: dict) -> dict:
    # str.split() splits on every Unicode space (U+00A0, U+2009, U+3000, ...), tabs and newlines
    return {**turn, "speaker": " ".join(turn["speaker"].split()), "text": " ".join(turn["text"].split())}


def _speaker_aliases(aliases: dict[str, str]) -> Rule:
    def rename(turn: dict) -> dict:
        speaker = turn["speaker"].strip()
        return {**turn, "speaker": aliases.get(speaker, speaker)}

    return rename


def _drop_speakers(names: list[str]) -> Rule:
    dropped = set(names)
    return lambda turn: None if turn["speaker"].strip() in dropped else turn


def _drop_empty(turn: dict) -> Optional[dict]:
    return turn if turn["text"].strip() else None


def _min_chars(minimum: int) -> Rule:
    return lambda turn: turn if len(turn["text"].strip()) >= minimum else None


def build_rules(config: CleanConfig) -> list[tuple[str, Rule]]:
    """The enabled rules, in the order they run."""
    rules: list[tuple[str, Rule]] = []
    if config.fix_unicode:
        rules.append(("fix_unicode", _fix_unicode()))
    if config.normalize_whitespace:
        rules.append(("normalize_whitespace", _normalize_whitespace))
    if config.speaker_aliases:
        rules.append(("speaker_aliases", _speaker_aliases(config.speaker_aliases)))
    if config.drop_speakers:
        rules.append(("drop_speakers", _drop_speakers(config.drop_speakers)))
    if config.drop_empty:
        rules.append(("drop_empty", _drop_empty))
    if config.min_chars > 0:
        rules.append(("min_chars", _min_chars(config.min_chars)))
    return rules


def _around(before: str, after: str) -> str:
    """`'…old text' -> '…new text'`, cut to the neighbourhood of the first difference."""
    start = max(0, len(os.path.commonprefix([before, after])) - EXAMPLE_WIDTH // 2)

    def cut(text: str) -> str:
        part = text[start : start + EXAMPLE_WIDTH]
        return ("…" if start else "") + part + ("…" if start + EXAMPLE_WIDTH < len(text) else "")

    return f"{cut(before)!r} -> {cut(after)!r}"


def describe_change(before: dict, after: Optional[dict]) -> str:
    """One line showing what a rule did to a turn (repr makes invisible characters such as U+00A0 visible)."""
    if after is None:
        text = before["text"]
        shown = text[:EXAMPLE_WIDTH] + ("…" if len(text) > EXAMPLE_WIDTH else "")
        return f"{before['speaker']}: {shown!r} -> (removed)"
    if before["speaker"] != after["speaker"]:
        return "speaker " + _around(before["speaker"], after["speaker"])
    return _around(before["text"], after["text"])


def apply_rules(rules: list[tuple[str, Rule]], turn: dict, table: dict[str, dict]) -> Optional[dict]:
    """Run the rules on one turn, counting each change or removal (and its first example) in table."""
    for name, rule in rules:
        result = rule(turn)
        if result is not None and result["text"] == turn["text"] and result["speaker"] == turn["speaker"]:
            continue
        row = table[name]
        row["removed" if result is None else "changed"] += 1
        row["example"] = row["example"] or describe_change(turn, result)
        if result is None:
            return None
        turn = result
    return turn


@register_stage("clean", config=CleanConfig, version="1", needs=("source",), libraries=("ftfy",))
def run_clean(ctx: StageContext) -> dict:
    """Fix encoding and whitespace, rename and drop speakers, drop empty turns; counts per rule in rules.json."""
    rules = build_rules(ctx.config)
    table = {name: {"rule": name, "changed": 0, "removed": 0, "example": ""} for name, _ in rules}
    character = ctx.recipe.character.name
    next_index: dict[str, int] = {}
    turns_in = turns_out = character_turns = 0

    with open(ctx.upstream["source"] / "turns.jsonl", encoding="utf-8") as source, open(
        ctx.out / "turns.jsonl", "w", encoding="utf-8"
    ) as out:
        for line in source:
            if not line.strip():
                continue
            turns_in += 1
            turn = apply_rules(rules, json.loads(line), table)
            if turn is None:
                continue
            # removals leave gaps: number the turns of each scene again, 0, 1, 2, ...
            turn["index"] = next_index.get(turn["scene"], 0)
            next_index[turn["scene"]] = turn["index"] + 1
            out.write(json.dumps(turn, ensure_ascii=False) + "\n")
            turns_out += 1
            character_turns += turn["speaker"] == character

    rows = list(table.values())
    (ctx.out / "rules.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"turns_in": turns_in, "turns_out": turns_out, "character_turns": character_turns, "rules": rows}
