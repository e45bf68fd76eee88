"""The instruction_triples source on Project Yothalia's 指令/输入/输出 files and on small broken files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import SOURCES, InputFile
from engine.sources.instruction_triples import InstructionTriplesConfig, read_instruction_triples
from tests.conftest import need_shared_data

SAMPLE = "yothalia/GirigiriYomi__project_yothalia/train_sample"


def read(path: Path, **keys) -> list[dict]:
    config = InstructionTriplesConfig(
        kind="instruction_triples", data={"path": path.name}, character=keys.pop("character", "尤赛莉亚"), **keys
    )
    return list(read_instruction_triples(config, {"data": InputFile(path=path, sha256="0" * 64)}, Console(quiet=True)))


def scenes_are_contiguous(turns: list[dict]) -> bool:
    order = [turn["scene"] for turn in turns]
    runs = [scene for i, scene in enumerate(order) if i == 0 or order[i - 1] != scene]
    return len(runs) == len(set(runs))


def test_yothalia_machine() -> None:
    turns = read(need_shared_data() / SAMPLE / "yothalia_machine.txt")
    assert Counter(turn["speaker"] for turn in turns) == {"User": 120, "尤赛莉亚": 120}
    assert len({turn["scene"] for turn in turns}) == 120 and scenes_are_contiguous(turns)
    assert turns[:2] == [
        {
            "scene": "block-0",
            "index": 0,
            "speaker": "User",
            "text": "早上好",
            "meta": {"block": 0, "line": 1, "instruction": "你是一个快乐的邻家大姐姐，有点傲娇，名字叫尤赛莉亚"},
        },
        {
            "scene": "block-0",
            "index": 1,
            "speaker": "尤赛莉亚",
            "text": "早上好鸭！今天真是美好的一天不是吗！早上看见我尤赛莉亚是上天对你的恩赐！珍惜吧！",
            "meta": {"block": 0, "line": 1, "instruction": "你是一个快乐的邻家大姐姐，有点傲娇，名字叫尤赛莉亚"},
        },
    ]
    # four persona instructions; the blocks at lines 17 and 20 follow each other with no blank line
    instructions = Counter(turn["meta"]["instruction"] for turn in turns if turn["index"] == 0)
    assert sorted(instructions.values()) == [10, 25, 40, 45]
    assert [turn["meta"]["line"] for turn in turns if turn["index"] == 0][3:6] == [13, 17, 20]


def test_diverse_machine_as_narration() -> None:
    turns = read(need_shared_data() / SAMPLE / "diverse_machine.txt", character="Yothalia", instruction_as="narration")
    assert Counter(turn["speaker"] for turn in turns) == {"Narrator": 60, "User": 60, "Yothalia": 60}
    assert [(t["index"], t["speaker"], t["text"]) for t in turns[:3]] == [
        (0, "Narrator", "你是一个喜欢开玩笑的职业喜剧演员"),
        (1, "User", "我的猫今天弄丢了我的钥匙"),
        (2, "Yothalia", "猫弄丢钥匙？看来它也想开锁进入喜剧的世界了。下次给它留张门票吧！"),
    ]
    assert "instruction" not in turns[0]["meta"]


def test_conv_novel_pairs() -> None:
    turns = read(need_shared_data() / SAMPLE / "conv_novel.txt", character="尤塞莉亚")
    assert Counter(turn["speaker"] for turn in turns) == {"User": 162, "尤塞莉亚": 162}
    assert turns[0]["text"] == "嘿，尤塞莉亚，今天天气真好，有什么好玩的建议吗？"
    assert turns[0]["meta"] == {"block": 0, "line": 1}
    # line 467 is a blank line between an 输入 and its 输出: still one record
    split = [turn for turn in turns if turn["meta"]["line"] == 466]
    assert [turn["speaker"] for turn in split] == ["User", "尤塞莉亚"]


def test_small_file(tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text(
        "  Instruction: be brief\n"
        "  Input: hi\n"
        "  Output: hello\n"
        "    and welcome\n"
        "输入:\n"
        "输出：只有回答\n"
        "\n"
        "指令：新的指令\n"
        "输入：问题\n"
        "输出：\n",
        encoding="utf-8",
    )
    turns = read(path, character="Bot", user_speaker="Guest")
    assert [(t["scene"], t["index"], t["speaker"], t["text"]) for t in turns] == [
        ("block-0", 0, "Guest", "hi"),
        ("block-0", 1, "Bot", "hello\nand welcome"),
        ("block-1", 0, "Bot", "只有回答"),  # an empty input gives no turn
    ]  # block-2 has an empty output: skipped
    assert turns[0]["meta"]["instruction"] == "be brief" and "instruction" not in turns[2]["meta"]


def test_registered_with_its_data_file() -> None:
    kind = SOURCES["instruction_triples"]
    config = InstructionTriplesConfig(kind="instruction_triples", data={"path": "a.txt"}, character="尤赛莉亚")
    assert kind.config is InstructionTriplesConfig and kind.read is read_instruction_triples and kind.doc
    assert kind.files(config) == {"data": DataRef(path="a.txt")}
    with pytest.raises(ValidationError, match="character"):
        InstructionTriplesConfig(kind="instruction_triples", data={"path": "a.txt"})


# --- broken files: each DataError names the file, the line and the fix -------------------------------


def test_output_without_input(tmp_path: Path) -> None:
    path = tmp_path / "no_input.txt"
    path.write_text("输入：一\n输出：二\n\n指令：三\n输出：四\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value) == (
        f"{path}:5: 输出 (output) without an 输入 (input) line before it in its block\n"
        "  fix: add an 输入：line (the user's words; it may be empty) above this 输出：line"
    )


def test_block_without_output(tmp_path: Path) -> None:
    path = tmp_path / "no_output.txt"
    path.write_text("指令：一\n输入：二\n输出：三\n\n指令：四\n输入：五\n\n输入：六\n输出：七\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value) == (
        f"{path}:5: the block has 指令 (instruction) and 输入 (input) but no 输出 (output)\n"
        "  fix: add the 输出：line (the character's reply) to this block, or delete the block"
    )


def test_missing_output_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "end.txt"
    path.write_text("输入：一\n输出：二\n输入：三\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"end.txt:3: the block has 输入 \(input\) but no 输出"):
        read(path)


def test_text_before_any_label(tmp_path: Path) -> None:
    path = tmp_path / "prose.txt"
    path.write_text("\nsome notes\n输入：一\n输出：二\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:2: the line 'some notes' comes before any field")
    assert "fix: start the line with a label (指令：, 输入： or 输出：)" in str(error.value)


def test_empty_and_not_utf8(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.txt:1: the file is empty"):
        read(empty)
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("输入：一\n输出：二\n".encode("gbk"))
    with pytest.raises(DataError, match=r"gbk.txt:1: byte 0x.. at byte offset 0 is not valid UTF-8"):
        read(gbk)
