"""instruction_triples: blocks of `指令：… / 输入：… / 输出：…` lines (Project Yothalia's persona files).

A record is an optional instruction (指令), an input (输入) and an output (输出), each a line starting with
its label and a colon (full-width `：` or ASCII `:`; the English labels Instruction / Input / Output work
too), in that order. Lines may be indented. A line without a label continues the field above it (joined
with a newline). Records are told apart by their labels, not by blank lines: a 指令, or a 输入 after an
输入 or an 输出, starts the next record. So records that follow each other with no blank line (a few in
yothalia_machine.txt) and a blank line inside a record (conv_novel.txt, line 467) do no harm.
`输入：/输出：` pairs without an instruction (conv_novel.txt) are records too.

Each record is one scene `block-<n>` (n counts records from 0): an optional turn of the instruction (speaker
"Narrator", with `instruction_as: narration`), the input as a turn of `user_speaker`, and the output as a
turn of `character`. With `instruction_as: meta` the instruction is kept in every turn's
meta["instruction"] and stays out of the prompt. An empty input gives no user turn. An output without an
input, a record without an output, or text before the first label raise DataError with the line and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import InputFile, register_source

_LABEL = re.compile(r"^\s*(指令|输入|输出|instruction|input|output)\s*[：:]\s?(.*)$", re.IGNORECASE)
_FIELD = {"指令": "instruction", "输入": "input", "输出": "output"}
_SHOWN = {"instruction": "指令 (instruction)", "input": "输入 (input)", "output": "输出 (output)"}
NARRATOR = "Narrator"
_EXAMPLE = "指令：你是…\n输入：早上好\n输出：早上好鸭！"


class InstructionTriplesConfig(BaseModel):
    """Read 指令/输入/输出 (instruction/input/output) text blocks."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["instruction_triples"] = Field(
        ..., description="Source kind: text blocks of 指令：/输入：/输出： lines (instruction, input, output)."
    )
    data: DataRef = Field(..., description="The text file, e.g. train_sample/yothalia_machine.txt.")
    character: str = Field(
        ...,
        min_length=1,
        description="Speaker name given to the outputs (输出); use the same as character.name.",
    )
    user_speaker: str = Field("User", min_length=1, description="Speaker name given to the inputs (输入).")
    instruction_as: Literal["meta", "narration"] = Field(
        "meta",
        description="Where the instruction (指令) goes: 'meta' keeps it in each turn's meta['instruction'] (out of "
        "the prompt); 'narration' makes it a first turn of speaker Narrator, so it enters the context.",
    )

    @field_validator("character", "user_speaker")
    @classmethod
    def _stripped(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("must not start or end with spaces")
        return value


@dataclass
class _Record:
    line: int  # where the record starts
    fields: dict[str, list[str]] = field(default_factory=dict)
    last: Optional[str] = None  # the field that continuation lines go to

    def value(self, name: str) -> str:
        return "\n".join(self.fields.get(name, [])).strip()


def _label(match: re.Match) -> str:
    word = match.group(1)
    return _FIELD.get(word, word.lower())


def _records(text: str, file: str) -> Iterator[_Record]:
    record: Optional[_Record] = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue  # records are told apart by their labels: conv_novel.txt has a blank line inside one
        match = _LABEL.match(raw)
        if match is None:
            if record is None or record.last is None:  # text before the first label
                raise DataError(
                    file,
                    f"the line {line[:40]!r} comes before any field: a file starts with 指令： or 输入：",
                    row=number,
                    fix=f"start the line with a label (指令：, 输入： or 输出：), or delete it; "
                    f"a block looks like\n{_EXAMPLE}",
                )
            record.fields[record.last].append(line)
            continue
        name = _label(match)
        if record is not None and (
            name == "instruction" or name in record.fields or (name == "input" and "output" in record.fields)
        ):
            yield _finished(record, file)
            record = None
        if record is None:
            record = _Record(line=number)
        if name == "output" and "input" not in record.fields:
            raise DataError(
                file,
                f"{_SHOWN['output']} without an {_SHOWN['input']} line before it in its block",
                row=number,
                fix="add an 输入：line (the user's words; it may be empty) above this 输出：line",
            )
        record.fields[name] = [match.group(2).strip()]
        record.last = name
    if record is not None:
        yield _finished(record, file)


def _finished(record: _Record, file: str) -> _Record:
    if "output" not in record.fields:
        present = " and ".join(_SHOWN[name] for name in record.fields)
        raise DataError(
            file,
            f"the block has {present} but no {_SHOWN['output']}",
            row=record.line,
            fix="add the 输出：line (the character's reply) to this block, or delete the block",
        )
    return record


@register_source("instruction_triples", config=InstructionTriplesConfig, files=lambda c: {"data": c.data})
def read_instruction_triples(
    config: InstructionTriplesConfig, inputs: dict[str, InputFile], console: Any
) -> Iterator[dict]:
    """One scene per 指令/输入/输出 block (block-<n>): [instruction as Narrator], the input, the character's output."""
    from engine.sources.roleplay_csv import read_utf8  # here, so that importing this module registers only it

    path = inputs["data"].path
    file = str(path)
    text = read_utf8(path)
    if not text.strip():
        raise DataError(file, "the file is empty", row=1, fix=f"write blocks like\n{_EXAMPLE}")
    no_reply = 0
    for count, record in enumerate(_records(text, file)):
        reply = record.value("output")
        if not reply:
            no_reply += 1
            continue
        instruction = record.value("instruction")
        meta: dict[str, Any] = {"block": count, "line": record.line}
        if instruction and config.instruction_as == "meta":
            meta["instruction"] = instruction
        turns = []
        if instruction and config.instruction_as == "narration":
            turns.append((NARRATOR, instruction))
        if user := record.value("input"):
            turns.append((config.user_speaker, user))
        turns.append((config.character, reply))
        for index, (speaker, words) in enumerate(turns):
            scene = f"block-{count}"
            yield {"scene": scene, "index": index, "speaker": speaker, "text": words, "meta": dict(meta)}
    if no_reply and console is not None:
        console.print(f"[yellow]{path.name}: {no_reply} block(s) with an empty 输出 were skipped[/yellow]")
