"""roleplay_csv: role-play instruction CSVs `,instruction,user,assisstant` (Project Yothalia), one scene per row.

Each row is a tiny scene `row-<n>` (n counts the data rows from 0): an optional turn of the instruction
(speaker "Narrator", when `instruction_as: narration`), the user's line (speaker `user_speaker`), and the
reply (speaker `character`). With `instruction_as: meta` the instruction stays out of the dialogue and is
kept in every turn's meta["instruction"]; as narration it enters the prompt context like any other turn.

The file is read as UTF-8 with the csv module. Columns are found by name, case-insensitively: `user`,
`assistant` (also the source's misspelling `assisstant`) and, when present, `instruction`; any other
column (the unnamed pandas index first) is ignored, and the index's value is kept in meta["csv_index"]
because it restarts at 0 where two exports were concatenated (row 2,831 of eng_roleplay.csv). Quirks of
the real files handled here: leading spaces in every field, and a leftover `Assistant:` marker at the
end of user fields (3,095 of 3,146 in eng_roleplay.csv; 291 of them hold nothing else). Empty fields
give no turn; multi-line replies keep their newlines (the clean stage decides about whitespace).
Anything else that is wrong raises DataError with the file, the line number and the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.sources.csv_records import strict_records
from engine.registry import InputFile, register_source

NARRATOR = "Narrator"
_COLUMN_NAMES = {"instruction": ("instruction",), "user": ("user",), "assistant": ("assistant", "assisstant")}
_MARKER = re.compile(r"\s*Assistant:\s*$", re.IGNORECASE)  # left at the end of user fields by the export


class RoleplayCSVConfig(BaseModel):
    """Read a role-play CSV with the columns instruction, user and assistant (or the misspelled assisstant)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["roleplay_csv"] = Field(
        ..., description="Source kind: role-play CSV with columns instruction, user, assistant (Project Yothalia)."
    )
    data: DataRef = Field(..., description="The CSV file, e.g. train_sample/csv/machine.csv.")
    character: str = Field(
        ...,
        min_length=1,
        description="Speaker name given to the replies (the assistant column); use the same as character.name.",
    )
    user_speaker: str = Field("User", min_length=1, description="Speaker name given to the user column's lines.")
    instruction_as: Literal["meta", "narration"] = Field(
        "meta",
        description="Where the instruction column goes: 'meta' keeps it in each turn's meta['instruction'] (out "
        "of the prompt); 'narration' makes it a first turn of speaker Narrator, so it enters the context.",
    )

    @field_validator("character", "user_speaker")
    @classmethod
    def _stripped(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("must not start or end with spaces")
        return value


def read_utf8(path: Path) -> str:
    """A data file's text (a UTF-8 BOM is dropped); bytes that are not UTF-8 raise DataError with their line."""
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        raise DataError(
            str(path),
            f"byte 0x{raw[offset]:02x} at byte offset {offset} is not valid UTF-8 (the file has another encoding, "
            "e.g. GBK for Chinese text or cp1252 for English)",
            row=raw.count(b"\n", 0, offset) + 1,
            fix=f"re-save the file as UTF-8 (for example `iconv -f gbk -t utf-8 {path.name} > utf8-{path.name}`)",
        ) from None


def _column_positions(header: list[str], file: str) -> dict[str, int]:
    found = [name.strip() for name in header]
    lowered = [name.lower() for name in found]
    positions: dict[str, int] = {}
    for role, names in _COLUMN_NAMES.items():
        for name in names:
            if name in lowered:
                positions[role] = lowered.index(name)
                break
    missing = [" or ".join(_COLUMN_NAMES[role]) for role in ("user", "assistant") if role not in positions]
    if missing:
        raise DataError(
            file,
            f"missing column(s) {', '.join(missing)}; found columns: "
            f"{', '.join(repr(name) for name in found) or '(none)'}",
            row=1,
            fix="make the first line of the file a header with the columns instruction,user,assistant",
        )
    return positions


@register_source("roleplay_csv", config=RoleplayCSVConfig, files=lambda c: {"data": c.data})
def read_roleplay_csv(config: RoleplayCSVConfig, inputs: dict[str, InputFile], console: Any) -> Iterator[dict]:
    """One scene per CSV row (row-<n>): [instruction as Narrator], the user's line, the character's reply."""
    path = inputs["data"].path
    file = str(path)
    text = read_utf8(path)
    if not text.strip():
        raise DataError(
            file, "the file is empty", row=1, fix="use a CSV whose first line is `,instruction,user,assistant`"
        )

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = next(strict_records(reader, file))
    positions = _column_positions(header, file)
    index_column = 0 if header and not header[0].strip() and 0 not in positions.values() else None
    needed = max(positions.values()) + 1
    last_line = reader.line_num
    rows = no_reply = 0
    for record in strict_records(reader, file):
        line, last_line = last_line + 1, reader.line_num  # a record may span several lines: report its first
        if not record or all(not field.strip() for field in record):
            continue
        if len(record) < needed:
            raise DataError(
                file,
                f"the row has {len(record)} field(s), the header names {len(header)}",
                row=line,
                fix="check the quoting of this row (a field with commas or newlines must be in double quotes)",
            )
        scene = f"row-{rows}"
        meta: dict[str, Any] = {"row": rows, "line": line}
        if index_column is not None:
            meta["csv_index"] = record[index_column].strip()
        rows += 1
        instruction = record[positions["instruction"]].strip() if "instruction" in positions else ""
        if instruction and config.instruction_as == "meta":
            meta["instruction"] = instruction
        user = _MARKER.sub("", record[positions["user"]]).strip()
        reply = record[positions["assistant"]].strip()
        if not reply:
            no_reply += 1
            continue
        turns = []
        if instruction and config.instruction_as == "narration":
            turns.append((NARRATOR, instruction))
        if user:
            turns.append((config.user_speaker, user))
        turns.append((config.character, reply))
        for index, (speaker, words) in enumerate(turns):
            yield {"scene": scene, "index": index, "speaker": speaker, "text": words, "meta": dict(meta)}
    if rows == 0:
        raise DataError(file, "the file has a header but no rows", row=last_line, fix="add the rows under the header")
    if no_reply and console is not None:
        console.print(f"[yellow]{path.name}: {no_reply} row(s) with an empty reply were skipped[/yellow]")
