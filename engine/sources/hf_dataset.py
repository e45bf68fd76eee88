"""hf_dataset: a local json / jsonl / csv / parquet / arrow file read with the Hugging Face `datasets` library.

The file is loaded with `datasets.load_dataset(<format>, data_files=<file>, split="train")`, the format taken
from the file's extension (.json .jsonl .ndjson -> json, .csv .tsv -> csv, .parquet, .arrow) unless `format`
names it. `datasets` is imported only when the source runs, so `recipe validate` stays instant; its cache
goes to a temporary folder that is removed afterwards (the stage's own cache key covers the file).

Two ways to map rows onto turns:

- `columns` (one turn per row): `speaker` and `text` columns, optionally `scene` (rows with the same value
  form a scene, in the order scenes first appear; without it the whole file is one scene named after the
  file) and `index` (the turn order within a scene; file order without it). Turns are renumbered 0, 1, ...
  per scene; the original index is kept in meta["index"].
- `pairs` (one scene `row-<n>` per row, n counted from 0): a `prompt` column spoken by `user_speaker`, a
  `response` column spoken by `character`, and optionally an `instruction` column that goes to meta or,
  with `instruction_as: narration`, to a first turn of speaker "Narrator". An empty prompt gives no turn.

Columns listed in `meta_columns` are copied into each turn's meta. A mapped column the file lacks raises
DataError listing the columns it has (with the closest name); so does a value that is not text, and a row
with text but no speaker. Rows are named as a person counts them: line n of a .jsonl, row n from 1 otherwise.
"""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.datafiles import DataRef
from engine.errors import DataError, MissingInputError
from engine.registry import InputFile, register_source

NARRATOR = "Narrator"
INSTALL_HINT = "pip install datasets==5.2.0"
FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


class ColumnMap(BaseModel):
    """Which columns hold the turn's parts when each row is one turn."""

    model_config = ConfigDict(extra="forbid")

    speaker: str = Field(..., description="Column of the speaker's name.")
    text: str = Field(..., description="Column of what the speaker says.")
    scene: Optional[str] = Field(
        None, description="Column whose value groups rows into scenes; null: the whole file is one scene."
    )
    index: Optional[str] = Field(
        None, description="Column with the turn's order within its scene (numbers); null: the file's order."
    )


class PairMap(BaseModel):
    """Which columns hold a prompt and its reply when each row is one exchange."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="Column of the user's words (a turn of user_speaker).")
    response: str = Field(..., description="Column of the character's reply (a turn of character).")
    instruction: Optional[str] = Field(
        None, description="Column of an instruction or system text for the exchange (see instruction_as)."
    )


class HFDatasetConfig(BaseModel):
    """Read a local json/jsonl/csv/parquet/arrow file with the datasets library."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf_dataset"] = Field(
        ..., description="Source kind: a local json, jsonl, csv, parquet or arrow file read with `datasets`."
    )
    data: DataRef = Field(..., description="The data file, e.g. dialogue.jsonl or train-00000.parquet.")
    format: Optional[Literal["json", "csv", "parquet", "arrow"]] = Field(
        None, description="The datasets builder to read the file with; null: from the file's extension."
    )
    columns: Optional[ColumnMap] = Field(
        None, description="One turn per row: which columns hold speaker, text, scene and index."
    )
    pairs: Optional[PairMap] = Field(
        None, description="One exchange per row: which columns hold the prompt, the response and the instruction."
    )
    character: Optional[str] = Field(
        None, description="With pairs: the speaker name of the responses; use the same as character.name."
    )
    user_speaker: str = Field("User", min_length=1, description="With pairs: the speaker name of the prompts.")
    instruction_as: Literal["meta", "narration"] = Field(
        "meta",
        description="With pairs.instruction: 'meta' keeps it in each turn's meta['instruction']; 'narration' "
        "makes it a first turn of speaker Narrator, so it enters the context.",
    )
    meta_columns: list[str] = Field(
        default_factory=list, description="Columns copied into each turn's meta (e.g. a source or a label)."
    )

    @model_validator(mode="after")
    def _one_mapping(self) -> "HFDatasetConfig":
        if (self.columns is None) == (self.pairs is None):
            raise ValueError("give exactly one of 'columns' (one turn per row) or 'pairs' (one exchange per row)")
        if self.pairs is not None and not (self.character or "").strip():
            raise ValueError("'pairs' needs 'character': the speaker name of the responses")
        if self.columns is not None and self.character is not None:
            raise ValueError("'character' is only used with 'pairs'; with 'columns' the speaker column names speakers")
        if self.format is None and Path(self.data.name).suffix.lower() not in FORMATS:
            raise ValueError(
                f"cannot tell the format of '{self.data.name}' from its extension; set format to one of "
                "json, csv, parquet, arrow"
            )
        return self

    def builder(self) -> str:
        return self.format or FORMATS[Path(self.data.name).suffix.lower()]


def _load_rows(config: HFDatasetConfig, path: Path) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts) of the file; DataError when datasets cannot read it."""
    try:
        import datasets
    except ImportError:
        raise MissingInputError(
            f"the hf_dataset source reads files with the datasets library; run `{INSTALL_HINT}`"
        ) from None
    builder = config.builder()
    kwargs: dict[str, Any] = {"sep": "\t"} if builder == "csv" and path.suffix.lower() == ".tsv" else {}
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as one DataError
    try:
        with tempfile.TemporaryDirectory(prefix="recipe-hf-") as cache:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **kwargs)
            rows = list(table)  # read into memory before the cache folder goes
            names = list(table.column_names)
    except Exception as exc:  # malformed json, a csv with ragged rows, not a parquet file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause).strip():
            first += f" ({str(cause).strip().splitlines()[0]})"
        raise DataError(
            str(path),
            f"datasets could not read the file as {builder}: {first}",
            fix=f"check that the file is valid {builder}, or set source.format to the format it really is",
        ) from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    return names, rows


def _check_columns(config: HFDatasetConfig, names: list[str], file: str) -> None:
    mapping = config.columns if config.columns is not None else config.pairs
    prefix = "columns" if config.columns is not None else "pairs"
    wanted = [(f"source.{prefix}.{key}", value) for key, value in mapping.model_dump().items() if value is not None]
    wanted += [("source.meta_columns", value) for value in config.meta_columns]
    for key, column in wanted:
        if column in names:
            continue
        close = difflib.get_close_matches(column, names, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else "."
        raise DataError(
            file,
            f"{key} names the column '{column}', which the file does not have{hint} "
            f"Available columns: {', '.join(names) or '(none)'}",
            fix=f"set {key} to one of the available columns",
        )


def _row_name(row: int, file: str) -> str:
    """Where a row is, as a person counts: line n of a json-lines file, the n-th record otherwise (from 1)."""
    suffix = Path(file).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return f"line {row + 1}"
    if suffix in (".csv", ".tsv"):
        return f"row {row + 1} (counted from 1 after the header)"
    return f"row {row + 1} (counted from 1)"


def _text(value: Any, column: str, row: int, file: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value).strip()
    raise DataError(
        file,
        f"{_row_name(row, file)}: column '{column}' holds a {type(value).__name__}, not text",
        fix=f"map a column of plain text, or flatten '{column}' into one turn per row first",
    )


def _meta(config: HFDatasetConfig, record: dict, row: int) -> dict:
    meta: dict[str, Any] = {"row": row}
    for column in config.meta_columns:
        value = record[column]
        meta[column] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return meta


def _turns_per_row(config: HFDatasetConfig, rows: list[dict], file: str, stem: str) -> Iterator[dict]:
    mapping = config.columns
    assert mapping is not None
    scenes: dict[str, list[tuple[Any, int, dict]]] = {}
    for row, record in enumerate(rows):
        if mapping.scene is None:
            scene = stem
        else:
            scene = _text(record[mapping.scene], mapping.scene, row, file)
            if not scene:
                raise DataError(
                    file,
                    f"{_row_name(row, file)}: the scene column '{mapping.scene}' is empty",
                    fix="give every row a scene id",
                )
        order: Any = row
        if mapping.index is not None:
            order = record[mapping.index]
            if not isinstance(order, (int, float)) or isinstance(order, bool):
                try:
                    order = float(str(order).strip())
                except ValueError:
                    raise DataError(
                        file,
                        f"{_row_name(row, file)}: the index column '{mapping.index}' holds "
                        f"{record[mapping.index]!r}, not a number",
                        fix="put the turn's position in its scene (0, 1, 2, ...) in this column",
                    ) from None
        meta = _meta(config, record, row)
        if mapping.index is not None:
            meta["index"] = record[mapping.index]
        turn = {
            "speaker": _text(record[mapping.speaker], mapping.speaker, row, file),
            "text": _text(record[mapping.text], mapping.text, row, file),
            "meta": meta,
        }
        if not turn["speaker"] and turn["text"]:  # whose line is it? Left empty, it would be nobody's turn in the context
            raise DataError(
                file,
                f"{_row_name(row, file)}: the speaker column '{mapping.speaker}' is empty (the line: {turn['text'][:60]!r})",
                fix="give every row with text a speaker (e.g. Narrator for stage directions), or remove the row",
            )
        scenes.setdefault(scene, []).append((order, row, turn))
    for scene, turns in scenes.items():
        turns.sort(key=lambda item: (item[0], item[1]))
        for index, (_, _, turn) in enumerate(turns):
            yield {"scene": scene, "index": index, **turn}


def _turns_per_pair(config: HFDatasetConfig, rows: list[dict], file: str) -> Iterator[dict]:
    pairs = config.pairs
    assert pairs is not None and config.character
    for row, record in enumerate(rows):
        meta = _meta(config, record, row)
        instruction = _text(record[pairs.instruction], pairs.instruction, row, file) if pairs.instruction else ""
        if instruction and config.instruction_as == "meta":
            meta["instruction"] = instruction
        turns = []
        if instruction and config.instruction_as == "narration":
            turns.append((NARRATOR, instruction))
        if prompt := _text(record[pairs.prompt], pairs.prompt, row, file):
            turns.append((config.user_speaker, prompt))
        turns.append((config.character, _text(record[pairs.response], pairs.response, row, file)))
        for index, (speaker, text) in enumerate(turns):
            yield {"scene": f"row-{row}", "index": index, "speaker": speaker, "text": text, "meta": dict(meta)}


@register_source("hf_dataset", config=HFDatasetConfig, files=lambda c: {"data": c.data})
def read_hf_dataset(config: HFDatasetConfig, inputs: dict[str, InputFile], console: Any) -> Iterator[dict]:
    """A local json/jsonl/csv/parquet/arrow file via `datasets`: one turn per row, or one exchange per row."""
    path = inputs["data"].path
    file = str(path)
    names, rows = _load_rows(config, path)
    _check_columns(config, names, file)
    if not rows:
        raise DataError(file, "the file has no rows", fix="add rows to the file")
    if config.columns is not None:
        yield from _turns_per_row(config, rows, file, Path(config.data.name).stem)
    else:
        yield from _turns_per_pair(config, rows, file)
