"""southpark_csv: the Kaggle "South Park Scripts" CSV (`Season,Episode,Character,Line`), one turn per row.

The file is read as UTF-8 with the csv module. The quirks of the real file are handled here: the header
row is repeated inside the file (those rows are dropped), every Line ends with a newline inside its quotes
(stripped) and a few hundred Lines hold newlines in the middle (turned into spaces). Each episode is one
scene, `s01e05`, and turns keep the file's order (which is not chronological across seasons).
Anything else that is wrong raises DataError with the file, the line number and the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.sources.csv_records import strict_records
from engine.registry import InputFile, register_source

COLUMNS = ("Season", "Episode", "Character", "Line")
_NEWLINES_INSIDE = re.compile(r"[ \t]*(?:\r\n|\r|\n)[ \t]*")


class SouthParkCSVConfig(BaseModel):
    """Read a South Park scripts CSV with the columns Season, Episode, Character, Line."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["southpark_csv"] = Field(..., description="Source kind: the South Park scripts CSV (Kaggle schema).")
    data: DataRef = Field(..., description="The CSV file, e.g. All-seasons.csv or by-season/Season-1.csv.")
    extra_data: list[DataRef] = Field(
        default_factory=list,
        description="More CSV files of the same schema, read after `data` (e.g. by-season/Season-19.csv, whose episodes "
        "All-seasons.csv lacks); an episode already read from an earlier file is refused.",
    )
    seasons: Optional[list[int]] = Field(
        None, description="Keep only these seasons (e.g. [1, 2]); all seasons when omitted."
    )


def _decode(raw: bytes, file: str) -> str:
    """The file's text; bytes that are not UTF-8 raise DataError with their offset and line."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            file,
            f"byte 0x{raw[offset]:02x} at byte offset {offset} is not valid UTF-8 (the file has another encoding, "
            "probably latin-1 or cp1252)",
            row=line,
            fix="re-save the file as UTF-8 (for example `iconv -f cp1252 -t utf-8 in.csv > out.csv`)",
        ) from None


def _header_positions(header: list[str], file: str) -> dict[str, int]:
    found = [name.strip() for name in header]
    missing = [name for name in COLUMNS if name not in found]
    if missing:
        raise DataError(
            file,
            f"missing column(s) {', '.join(missing)}; found columns: {', '.join(found) or '(none)'}; "
            f"expected: {', '.join(COLUMNS)}",
            row=1,
            fix=f"make the first line of the file the header `{','.join(COLUMNS)}`",
        )
    return {name: found.index(name) for name in COLUMNS}


def _number(value: str, column: str, file: str, row: int) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(
            file,
            f"{column} is {value!r}, not a whole number",
            row=row,
            fix=f"put the {column.lower()} number (e.g. 1) in the {column} column of this row",
        ) from None


def _clean_line(text: str) -> str:
    """Strip the newline(s) that end every Line and turn newlines inside it into single spaces."""
    return _NEWLINES_INSIDE.sub(" ", text.rstrip(" \t\r\n"))


def _files(config: SouthParkCSVConfig) -> dict[str, DataRef]:
    return {"data": config.data, **{f"extra_data_{i}": ref for i, ref in enumerate(config.extra_data)}}


@register_source("southpark_csv", config=SouthParkCSVConfig, files=_files)
def read_southpark_csv(config: SouthParkCSVConfig, inputs: dict[str, InputFile], console: Any) -> Iterator[dict]:
    """One turn per CSV row of each South Park scripts file, in order; each episode is a scene (s01e05)."""
    seen: dict[str, str] = {}  # scene -> the file it came from
    for name in _files(config):
        earlier = dict(seen)
        for turn in _read_file(inputs[name].path, config):
            first_file = earlier.get(turn["scene"])
            if first_file is not None:
                raise DataError(
                    str(inputs[name].path),
                    f"episode {turn['scene']} was already read from {first_file}",
                    row=None,
                    fix="list each season in one file only (All-seasons.csv holds seasons 1-18; add only by-season files it lacks)",
                )
            seen[turn["scene"]] = str(inputs[name].path)
            yield turn


def _read_file(path: Any, config: SouthParkCSVConfig) -> Iterator[dict]:
    file = str(path)
    text = _decode(path.read_bytes(), file)
    if not text.strip():
        raise DataError(
            file, "the file is empty", row=1, fix=f"use a CSV whose first line is `{','.join(COLUMNS)}`"
        )

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    positions = _header_positions(next(strict_records(reader, file)), file)
    wanted = set(config.seasons) if config.seasons else None
    last_line = reader.line_num
    rows = 0
    next_index: dict[str, int] = {}
    for record in strict_records(reader, file):
        row, last_line = last_line + 1, reader.line_num  # a record may span several lines: report its first
        if not record or all(not field.strip() for field in record):
            continue
        if len(record) <= max(positions.values()):
            raise DataError(
                file,
                f"the row has {len(record)} field(s), expected {len(positions)} ({', '.join(COLUMNS)})",
                row=row,
                fix="check the quoting of this row (a Line with commas must be in double quotes)",
            )
        if record[positions["Season"]].strip() == "Season":
            continue  # the header, repeated where season files were concatenated
        rows += 1
        season = _number(record[positions["Season"]], "Season", file, row)
        episode = _number(record[positions["Episode"]], "Episode", file, row)
        if wanted is not None and season not in wanted:
            continue
        scene = f"s{season:02d}e{episode:02d}"
        index = next_index.get(scene, 0)
        next_index[scene] = index + 1
        yield {
            "scene": scene,
            "index": index,
            "speaker": record[positions["Character"]],
            "text": _clean_line(record[positions["Line"]]),
            "meta": {"season": season, "episode": episode},
        }
    if rows == 0:
        raise DataError(
            file, "the file has a header but no rows", row=last_line, fix="add the dialogue rows under the header"
        )
