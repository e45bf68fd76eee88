"""The hf_dataset source on small json, jsonl, csv, parquet and arrow files written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.datafiles import DataRef
from engine.errors import DataError, MissingInputError
from engine.registry import SOURCES, InputFile
from engine.sources.hf_dataset import HFDatasetConfig, read_hf_dataset

DIALOGUE = [
    {"conversation": "b", "turn": 1, "who": "Alice", "line": "Then we agree.", "lang": "en"},
    {"conversation": "a", "turn": 1, "who": "Bob", "line": "  Hello there. ", "lang": "en"},
    {"conversation": "a", "turn": 0, "who": "Alice", "line": "Hi!", "lang": "en"},
    {"conversation": "b", "turn": 0, "who": "Bob", "line": "Shall we?", "lang": "fr"},
]
PAIRS = {
    "system": ["Be kind.", "Be brief."],
    "question": ["How are you?", ""],
    "answer": ["Very well, thank you.", "Fine."],
}


def config(path: Path, **keys) -> HFDatasetConfig:
    return HFDatasetConfig(kind="hf_dataset", data={"path": path.name}, **keys)


def read(path: Path, **keys) -> list[dict]:
    return list(read_hf_dataset(config(path, **keys), {"data": InputFile(path=path, sha256="0" * 64)}, Console(quiet=True)))


def rows(turns: list[dict]) -> list[tuple]:
    return [(t["scene"], t["index"], t["speaker"], t["text"]) for t in turns]


def test_jsonl_one_turn_per_row(tmp_path: Path) -> None:
    path = tmp_path / "dialogue.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in DIALOGUE) + "\n", encoding="utf-8")
    columns = {"scene": "conversation", "index": "turn", "speaker": "who", "text": "line"}
    turns = read(path, columns=columns, meta_columns=["lang"])
    # scenes in the order they first appear, turns sorted by the index column and renumbered
    assert rows(turns) == [
        ("b", 0, "Bob", "Shall we?"),
        ("b", 1, "Alice", "Then we agree."),
        ("a", 0, "Alice", "Hi!"),
        ("a", 1, "Bob", "Hello there."),
    ]
    assert turns[0]["meta"] == {"row": 3, "lang": "fr", "index": 0}
    # without scene and index: one scene named after the file, in file order
    assert rows(read(path, columns={"speaker": "who", "text": "line"}))[:2] == [
        ("dialogue", 0, "Alice", "Then we agree."),
        ("dialogue", 1, "Bob", "Hello there."),
    ]


def test_json_array(tmp_path: Path) -> None:
    path = tmp_path / "dialogue.json"
    path.write_text(json.dumps(DIALOGUE), encoding="utf-8")
    turns = read(path, columns={"scene": "conversation", "speaker": "who", "text": "line"})
    assert [t["text"] for t in turns] == ["Then we agree.", "Shall we?", "Hello there.", "Hi!"]


def test_csv_pairs_with_instruction_as_narration(tmp_path: Path) -> None:
    from datasets import Dataset

    path = tmp_path / "pairs.csv"
    Dataset.from_dict(PAIRS).to_csv(str(path), index=False)
    turns = read(
        path,
        pairs={"prompt": "question", "response": "answer", "instruction": "system"},
        character="Yothalia",
        user_speaker="Guest",
        instruction_as="narration",
    )
    assert rows(turns) == [
        ("row-0", 0, "Narrator", "Be kind."),
        ("row-0", 1, "Guest", "How are you?"),
        ("row-0", 2, "Yothalia", "Very well, thank you."),
        ("row-1", 0, "Narrator", "Be brief."),
        ("row-1", 1, "Yothalia", "Fine."),  # an empty prompt gives no turn
    ]
    assert turns[0]["meta"] == {"row": 0}


def test_parquet_pairs_with_instruction_in_meta(tmp_path: Path) -> None:
    from datasets import Dataset

    path = tmp_path / "pairs.parquet"
    Dataset.from_dict(PAIRS).to_parquet(str(path))
    turns = read(path, pairs={"prompt": "question", "response": "answer", "instruction": "system"}, character="Y")
    assert rows(turns) == [("row-0", 0, "User", "How are you?"), ("row-0", 1, "Y", "Very well, thank you."), ("row-1", 0, "Y", "Fine.")]
    assert turns[0]["meta"] == {"row": 0, "instruction": "Be kind."}


def test_arrow_file_from_save_to_disk(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list(DIALOGUE).save_to_disk(str(tmp_path / "saved"))
    path = next((tmp_path / "saved").glob("*.arrow"))
    turns = read(path, columns={"scene": "conversation", "speaker": "who", "text": "line"})
    assert len(turns) == 4 and turns[0]["speaker"] == "Alice"


def test_format_names_the_builder(tmp_path: Path) -> None:
    path = tmp_path / "dialogue.txt"
    path.write_text("who,line\nAlice,Hi\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="cannot tell the format of 'dialogue.txt' from its extension"):
        config(path, columns={"speaker": "who", "text": "line"})
    assert rows(read(path, format="csv", columns={"speaker": "who", "text": "line"})) == [("dialogue", 0, "Alice", "Hi")]


def test_config_needs_one_mapping() -> None:
    path = Path("x.jsonl")
    with pytest.raises(ValidationError, match="give exactly one of 'columns'"):
        config(path)
    with pytest.raises(ValidationError, match="give exactly one of 'columns'"):
        config(path, columns={"speaker": "a", "text": "b"}, pairs={"prompt": "a", "response": "b"}, character="Y")
    with pytest.raises(ValidationError, match="'pairs' needs 'character'"):
        config(path, pairs={"prompt": "a", "response": "b"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        config(path, columns={"speaker": "a", "text": "b", "speker": "c"})


def test_registered_with_its_data_file() -> None:
    kind = SOURCES["hf_dataset"]
    cfg = config(Path("x.parquet"), pairs={"prompt": "a", "response": "b"}, character="Y")
    assert kind.config is HFDatasetConfig and kind.read is read_hf_dataset and kind.doc
    assert kind.files(cfg) == {"data": DataRef(path="x.parquet")}
    assert cfg.builder() == "parquet"


# --- broken files: each DataError names the file and the fix ------------------------------------------


def test_missing_column_suggests_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "dialogue.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in DIALOGUE), encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path, columns={"scene": "conversations", "speaker": "who", "text": "line"})
    assert str(error.value) == (
        f"{path}: source.columns.scene names the column 'conversations', which the file does not have — "
        "did you mean 'conversation'? Available columns: conversation, turn, who, line, lang\n"
        "  fix: set source.columns.scene to one of the available columns"
    )
    with pytest.raises(DataError, match=r"names the column 'zzz', which the file does not have\. Available columns"):
        read(path, columns={"speaker": "who", "text": "line"}, meta_columns=["zzz"])


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path, columns={"speaker": "who", "text": "line"})
    assert str(error.value).startswith(f"{path}: datasets could not read the file as json: ")
    assert "fix: check that the file is valid json, or set source.format" in str(error.value)


def test_value_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "nested.jsonl"
    path.write_text('{"who": "Alice", "line": "hi"}\n{"who": "Bob", "line": ["a", "list"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"datasets could not read|column 'line' holds a list, not text"):
        read(path, columns={"speaker": "who", "text": "line"})
    path.write_text('{"who": "Alice", "line": ["hi"]}\n{"who": "Bob", "line": ["a", "list"]}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path, columns={"speaker": "who", "text": "line"})
    assert str(error.value) == (
        f"{path}: line 1: column 'line' holds a list, not text\n"
        "  fix: map a column of plain text, or flatten 'line' into one turn per row first"
    )


def test_a_line_without_a_speaker_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "talk.jsonl"
    path.write_text('{"who": "Alice", "line": "hi"}\n{"who": null, "line": "Who said that?"}\n{"who": "", "line": ""}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path, columns={"speaker": "who", "text": "line"})
    assert str(error.value) == (
        f"{path}: line 2: the speaker column 'who' is empty (the line: 'Who said that?')\n"
        "  fix: give every row with text a speaker (e.g. Narrator for stage directions), or remove the row"
    )
    csv_path = tmp_path / "talk.csv"
    csv_path.write_text("who,scene,line\nAlice,1,hi\nBob,,hello\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(csv_path, columns={"speaker": "who", "text": "line", "scene": "scene"})
    assert str(error.value).startswith(f"{csv_path}: row 2 (counted from 1 after the header): the scene column 'scene' is empty")


def test_without_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(MissingInputError, match=r"pip install datasets==5\.2\.0"):
        read(tmp_path / "x.jsonl", columns={"speaker": "who", "text": "line"})
