"""The roleplay_csv source on Project Yothalia's real CSVs and on small broken files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import SOURCES, InputFile
from engine.sources.roleplay_csv import RoleplayCSVConfig, read_roleplay_csv
from tests.conftest import need_shared_data

CSV_DIR = "yothalia/GirigiriYomi__project_yothalia/train_sample/csv"


def read(path: Path, **keys) -> list[dict]:
    config = RoleplayCSVConfig(kind="roleplay_csv", data={"path": path.name}, character=keys.pop("character", "Yothalia"), **keys)
    return list(read_roleplay_csv(config, {"data": InputFile(path=path, sha256="0" * 64)}, Console(quiet=True)))


@pytest.fixture(scope="module")
def english() -> list[dict]:
    return read(need_shared_data() / CSV_DIR / "eng_roleplay.csv")


def test_english_counts(english: list[dict]) -> None:
    speakers = Counter(turn["speaker"] for turn in english)
    assert speakers == {"Yothalia": 3_146, "User": 2_855}  # 291 user fields hold only `Assistant:` or nothing
    assert len({turn["scene"] for turn in english}) == 3_146
    assert sum("\n" in turn["text"] for turn in english if turn["speaker"] == "Yothalia") == 175
    assert len({turn["meta"]["instruction"] for turn in english if turn["index"] == 0}) == 2_952


def test_english_quirks_are_gone(english: list[dict]) -> None:
    assert not any(turn["text"] != turn["text"].strip() for turn in english)
    assert not any(turn["text"].endswith("Assistant:") for turn in english)
    assert all(turn["text"] for turn in english)
    # the unnamed index column restarts at 0 where two exports were concatenated: scene ids count rows
    restart = [turn for turn in english if turn["scene"] == "row-2831"]
    assert restart[0]["meta"]["csv_index"] == "0" and restart[0]["meta"]["row"] == 2_831


def test_english_first_row(english: list[dict]) -> None:
    user, reply = english[0], english[1]
    meta = {"row": 0, "line": 2, "csv_index": "0", "instruction": "Imagine you are a time-traveling historian"}
    assert user == {
        "scene": "row-0",
        "index": 0,
        "speaker": "User",
        "text": "Describe the key differences in daily life between the 1920s and 2020s.",
        "meta": meta,
    }
    assert reply["scene"] == "row-0" and reply["index"] == 1 and reply["speaker"] == "Yothalia"
    assert reply["text"].startswith("1. Technology: In the 1920s, technologies such as radio")
    assert reply["meta"] == meta


def test_chinese_machine_csv_as_narration() -> None:
    turns = read(need_shared_data() / CSV_DIR / "machine.csv", character="尤赛莉亚", instruction_as="narration")
    assert len(turns) == 540 and len({turn["scene"] for turn in turns}) == 180
    assert Counter(turn["speaker"] for turn in turns) == {"Narrator": 180, "User": 180, "尤赛莉亚": 180}
    assert [(t["index"], t["speaker"], t["text"]) for t in turns[:3]] == [
        (0, "Narrator", "你是一个喜欢开玩笑的职业喜剧演员"),
        (1, "User", "我的猫今天弄丢了我的钥匙"),
        (2, "尤赛莉亚", "猫弄丢钥匙？看来它也想开锁进入喜剧的世界了。下次给它留张门票吧！"),
    ]
    assert "instruction" not in turns[0]["meta"]


def test_small_file(tmp_path: Path) -> None:
    path = tmp_path / "small.csv"
    path.write_text(
        'Instruction,User,Assistant\n'
        ' Be a pirate, Ahoy? Assistant: ,"Arr!\nAye."\n'
        '\n'
        ' Be a pirate, Assistant:,Nothing to say.\n'
        ' Be a pirate,Hello,\n',
        encoding="utf-8",
    )
    turns = read(path, character="Pirate", user_speaker="Sailor", instruction_as="narration")
    assert [(t["scene"], t["index"], t["speaker"], t["text"]) for t in turns] == [
        ("row-0", 0, "Narrator", "Be a pirate"),
        ("row-0", 1, "Sailor", "Ahoy?"),
        ("row-0", 2, "Pirate", "Arr!\nAye."),
        ("row-1", 0, "Narrator", "Be a pirate"),  # an empty user field gives no turn
        ("row-1", 1, "Pirate", "Nothing to say."),
    ]  # a row with an empty reply gives none
    assert turns[3]["meta"] == {"row": 1, "line": 5}  # no unnamed first column: no csv_index


def test_unclosed_quote_is_named_not_swallowed(tmp_path: Path) -> None:
    path = tmp_path / "unclosed.csv"
    path.write_text('Instruction,User,Assistant\nBe a pirate,Ahoy?,"Arr!\nBe a pirate,Hello,Aye.\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:2: malformed CSV (unexpected end of data)")
    assert "fix: close the double quote" in str(error.value)


def test_without_instruction_column(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("user,assisstant\nhi,hello\n", encoding="utf-8")
    assert [(t["speaker"], t["text"]) for t in read(path)] == [("User", "hi"), ("Yothalia", "hello")]


def test_registered_with_its_data_file() -> None:
    kind = SOURCES["roleplay_csv"]
    config = RoleplayCSVConfig(kind="roleplay_csv", data={"path": "machine.csv"}, character="Yothalia")
    assert kind.config is RoleplayCSVConfig and kind.read is read_roleplay_csv and kind.doc
    assert kind.files(config) == {"data": DataRef(path="machine.csv")}
    with pytest.raises(ValidationError, match="instruction_as"):
        RoleplayCSVConfig(kind="roleplay_csv", data={"path": "x.csv"}, character="Y", instruction_as="system")
    with pytest.raises(ValidationError, match="must not start or end with spaces"):
        RoleplayCSVConfig(kind="roleplay_csv", data={"path": "x.csv"}, character="Yothalia ")
    with pytest.raises(ValidationError, match="Extra inputs"):
        RoleplayCSVConfig(kind="roleplay_csv", data={"path": "x.csv"}, character="Y", speaker="User")


# --- broken files: each DataError names the file, the line and the fix -------------------------------


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "columns.csv"
    path.write_text(",instruction,question,assisstant\n0,a,b,c\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value) == (
        f"{path}:1: missing column(s) user; found columns: '', 'instruction', 'question', 'assisstant'\n"
        "  fix: make the first line of the file a header with the columns instruction,user,assistant"
    )
    assert error.value.row == 1 and error.value.file == str(path)


def test_missing_reply_column(tmp_path: Path) -> None:
    path = tmp_path / "reply.csv"
    path.write_text("instruction,user,answer\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: missing column\(s\) assistant or assisstant; found columns: "):
        read(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"\n")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value) == (
        f"{path}:1: the file is empty\n  fix: use a CSV whose first line is `,instruction,user,assistant`"
    )


def test_header_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text(",instruction,user,assisstant\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"header.csv:2: the file has a header but no rows"):
        read(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    content = "instruction,user,assistant\n你是演员,早上好,早\n"
    path.write_bytes(content.encode("gbk"))
    offset = len("instruction,user,assistant\n".encode("gbk"))
    with pytest.raises(DataError) as error:
        read(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: byte 0x{content.encode('gbk')[offset]:02x} at byte offset {offset} is not valid UTF-8")
    assert "fix: re-save the file as UTF-8 (for example `iconv -f gbk -t utf-8 gbk.csv > utf8-gbk.csv`)" in message


def test_short_row(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    # the first record spans lines 2-3, so the short one starts on line 4
    path.write_text(',instruction,user,assisstant\n0,a,b,"c\nd"\n1,a,b\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:4: the row has 3 field(s), the header names 4")
    assert "fix: check the quoting of this row" in str(error.value)
