"""name_line_script: plain-text scripts of `Name: line` dialogue (text-generation-webui `dataset.txt`, tiny-shakespeare).

Two layouts:

- `inline` (dataset.txt): every line that starts with `Name:` is a turn of that speaker; the name is what
  comes before the first colon (ASCII `:` or full-width `：`), so `Bob:obviously` is Bob saying "obviously"
  (the persona-dialogue helper's `lstrip` turned it into "viously"). A bare `Name:` line takes the lines that
  follow it in the same paragraph as its text.
- `block` (tiny-shakespeare): a speech is a paragraph whose first line is the speaker, `NAME:` alone or
  `NAME: text`; the paragraph's other lines are the speech, joined with spaces. A `Name:` line inside a
  paragraph is verse ("Very well:"), never a speaker.

What counts as a name: with `speakers` given, exactly those names; otherwise at most `max_name_words`
words of letters, digits, spaces and . ' - & , that start with a capital letter (or a letter without case,
such as Chinese), so that "Note that this is: ..." or "10:30" are not speakers. Runs of spaces inside a
name become one.

Lines that no speaker line claims (narration, or tiny-shakespeare's speeches that go on after a blank
line) follow `unattributed`: `narrator` makes them turns of the speaker `narrator` (one turn per paragraph),
`previous` appends them to the turn before (within the scene; with no turn before they become narration),
`drop` leaves them out. A speaker line with no text at all gives no turn (tiny-shakespeare has 125 of them).

Actions in parentheses or *asterisks* are kept in the text (`keep`), removed (`strip`) or moved to
meta["actions"] (`meta`).

Scenes: a line matching `scene_break_pattern` (removed), or a run of at least `scene_break_blank_lines`
blank lines, ends a scene, so that the dataset's context never runs across a break. Files without scene
markers (tiny-shakespeare concatenates excerpts of plays with none) can be cut into pseudo-scenes of at most
`scene_size` turns; a speech never spans two scenes. Scene ids are `scene-<k>`, or `scene-<k>.<part>`
with scene_size; meta["line"] is the line where a turn starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import InputFile, register_source

DEFAULT_SCENE_BREAK = r"^\s*(\*{3,}|-{3,}|={3,}|\[scene[^\]]*\])\s*$"
_SPEAKER_LINE = re.compile(r"^\s*([^:：]+?)\s*[:：]\s*(.*)$")
_NAME_CHARS = re.compile(r"^[\w .'&,-]+$")
_ACTIONS = re.compile(r"\(([^()]*)\)|\*([^*\n]+)\*")


class NameLineScriptConfig(BaseModel):
    """Read a plain-text script of `Name: line` turns."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["name_line_script"] = Field(
        ..., description="Source kind: a plain-text script of `Name: line` turns (dataset.txt, tiny-shakespeare)."
    )
    data: DataRef = Field(..., description="The text file, e.g. dataset.txt or tinyshakespeare/input.txt.")
    layout: Literal["inline", "block"] = Field(
        "inline",
        description="'inline': any line starting with `Name:` is a turn (dataset.txt); 'block': a paragraph whose "
        "first line is `NAME:` is one speech, its other lines the text (tiny-shakespeare).",
    )
    speakers: Optional[list[str]] = Field(
        None,
        description="Only these names count as speakers (safest for prose with colons); any name that passes "
        "max_name_words when omitted.",
    )
    max_name_words: int = Field(
        4,
        ge=1,
        description="Longest speaker name in words; longer text before a colon (a sentence) is not a speaker.",
    )
    unattributed: Literal["narrator", "previous", "drop"] = Field(
        "narrator",
        description="Lines no speaker line claims: 'narrator' = turns of the narrator speaker (one per paragraph), "
        "'previous' = appended to the turn before, 'drop' = left out.",
    )
    narrator: str = Field("Narrator", min_length=1, description="Speaker name of narration turns.")
    actions: Literal["keep", "strip", "meta"] = Field(
        "meta",
        description="Actions in (parentheses) or *asterisks*: keep them in the text, strip them, or move them "
        "to meta['actions'].",
    )
    scene_break_pattern: Optional[str] = Field(
        DEFAULT_SCENE_BREAK,
        description="Regular expression (case-insensitive) for lines that end a scene, e.g. *** or --- or "
        "[scene]; the line itself is dropped. null: no such lines.",
    )
    scene_break_blank_lines: Optional[int] = Field(
        None, ge=1, description="A run of at least this many blank lines ends a scene; null: blank lines never do."
    )
    scene_size: Optional[int] = Field(
        None,
        ge=1,
        description="Cut scenes into pseudo-scenes of at most this many turns (files without scene markers); "
        "null: no cut.",
    )

    @field_validator("scene_break_pattern")
    @classmethod
    def _compiles(cls, pattern: Optional[str]) -> Optional[str]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    @field_validator("speakers")
    @classmethod
    def _names(cls, names: Optional[list[str]]) -> Optional[list[str]]:
        if names is not None:
            names = [" ".join(name.split()) for name in names]
            if not all(names):
                raise ValueError("speaker names must not be empty")
        return names


@dataclass
class _Turn:
    speaker: str
    line: int
    narration: bool
    parts: list[str] = field(default_factory=list)
    absorbs: bool = False  # the next lines of the same paragraph belong to it


class _ScriptParser:
    """Walks the lines of a script and yields turns, scene by scene."""

    def __init__(self, config: NameLineScriptConfig):
        self.config = config
        self.speakers = set(config.speakers) if config.speakers is not None else None
        self.scene_break = re.compile(config.scene_break_pattern, re.IGNORECASE) if config.scene_break_pattern else None
        self.turn: Optional[_Turn] = None
        self.section = 0  # scenes delimited by markers or blank lines
        self.part = 0  # pseudo-scenes of scene_size turns within a section
        self.index = 0  # turns emitted in the current (pseudo-)scene
        self.emitted_in_section = 0
        self.empty = 0  # speaker lines with no text
        self.dropped = 0  # unattributed lines left out
        self.speeches = 0  # turns of real speakers (not narration)

    def name(self, candidate: str) -> Optional[str]:
        name = " ".join(candidate.split())
        if self.speakers is not None:
            return name if name in self.speakers else None
        first = name[:1]
        if not first.isalpha() or first.islower() or not _NAME_CHARS.match(name):
            return None
        return name if len(name.split()) <= self.config.max_name_words else None

    def scene_id(self) -> str:
        return f"scene-{self.section}.{self.part}" if self.config.scene_size else f"scene-{self.section}"

    def turns(self, text: str) -> Iterator[dict]:
        block = self.config.layout == "block"
        paragraph_start, blank_run = True, 0
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line:
                blank_run += 1
                paragraph_start = True
                if self.turn is not None:
                    self.turn.absorbs = False
                if self.config.scene_break_blank_lines and blank_run == self.config.scene_break_blank_lines:
                    yield from self.end_scene()
                continue
            blank_run = 0
            if self.scene_break and self.scene_break.search(raw):
                yield from self.end_scene()
                paragraph_start = True
                continue
            match = _SPEAKER_LINE.match(raw) if (paragraph_start or not block) else None
            speaker = self.name(match.group(1)) if match else None
            if speaker is not None:
                yield from self.close()
                self.turn = _Turn(speaker=speaker, line=number, narration=False)
                words = match.group(2).strip()
                if words:
                    self.turn.parts.append(words)
                self.turn.absorbs = block or not words
            elif self.turn is not None and self.turn.absorbs:
                self.turn.parts.append(line)
            elif self.config.unattributed == "drop":
                self.dropped += 1
            elif self.config.unattributed == "previous" and self.turn is not None:
                self.turn.parts.append(line)
            elif self.turn is not None and self.turn.narration and not paragraph_start:
                self.turn.parts.append(line)
            else:
                yield from self.close()
                self.turn = _Turn(speaker=self.config.narrator, line=number, narration=True)
                self.turn.parts.append(line)
            paragraph_start = False
        yield from self.end_scene()

    def end_scene(self) -> Iterator[dict]:
        yield from self.close()
        self.turn = None  # `previous` never reaches back across a scene break
        if self.emitted_in_section:
            self.section += 1
        self.part = self.index = self.emitted_in_section = 0

    def close(self) -> Iterator[dict]:
        """Emit the open turn, if it has any text left after the actions rule."""
        turn, self.turn = self.turn, None
        if turn is None:
            return
        text = " ".join(turn.parts)
        meta: dict[str, Any] = {"line": turn.line}
        if self.config.actions != "keep":
            actions = [" ".join((a or b).split()) for a, b in _ACTIONS.findall(text)]
            text = " ".join(_ACTIONS.sub(" ", text).split())
            if self.config.actions == "meta" and any(actions):
                meta["actions"] = [action for action in actions if action]
        if not text:
            self.empty += not turn.narration
            return
        if self.config.scene_size and self.index >= self.config.scene_size:
            self.part += 1
            self.index = 0
        yield {"scene": self.scene_id(), "index": self.index, "speaker": turn.speaker, "text": text, "meta": meta}
        self.index += 1
        self.speeches += not turn.narration
        self.emitted_in_section += 1


@register_source("name_line_script", config=NameLineScriptConfig, files=lambda c: {"data": c.data})
def read_name_line_script(config: NameLineScriptConfig, inputs: dict[str, InputFile], console: Any) -> Iterator[dict]:
    """One turn per `Name: line` speech (or paragraph, in block layout); narration per `unattributed`."""
    from engine.sources.roleplay_csv import read_utf8  # here, so that importing this module registers only it

    path = inputs["data"].path
    file = str(path)
    text = read_utf8(path)
    if not text.strip():
        raise DataError(file, "the file is empty", row=1, fix="write one `Name: line` turn a line")
    parser = _ScriptParser(config)
    yield from parser.turns(text)
    if parser.speeches == 0:
        how = (
            f"list the names in source.speakers (none of {sorted(config.speakers)} starts a line)"
            if config.speakers is not None
            else f"start turns with `Name: line` (a capitalised name of at most {config.max_name_words} words)"
        )
        layout = " at the start of a paragraph" if config.layout == "block" else ""
        raise DataError(file, f"no line{layout} starts with a speaker name and a colon", row=1, fix=how)
    if console is not None and (parser.empty or parser.dropped):
        console.print(
            f"[yellow]{path.name}: {parser.empty} speaker line(s) without text gave no turn; "
            f"{parser.dropped} unattributed line(s) dropped[/yellow]"
        )
