"""The name_line_script source on tiny-shakespeare and on small `Name: line` scripts (dataset.txt style)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import SOURCES, InputFile
from engine.sources.name_line_script import NameLineScriptConfig, _ScriptParser, read_name_line_script
from tests.conftest import need_shared_data

TINY = "shakespeare/karpathy__char-rnn/data/tinyshakespeare/input.txt"
# what recipes/webui_dialogue.yaml uses
TINY_KEYS = dict(layout="block", unattributed="previous", max_name_words=5, scene_break_blank_lines=2, scene_size=40)


def config(**keys) -> NameLineScriptConfig:
    return NameLineScriptConfig(kind="name_line_script", data={"path": "dataset.txt"}, **keys)


def read(path: Path, **keys) -> list[dict]:
    return list(read_name_line_script(config(**keys), {"data": InputFile(path=path, sha256="0" * 64)}, Console(quiet=True)))


def script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.txt"
    path.write_text(text, encoding="utf-8")
    return path


def rows(turns: list[dict]) -> list[tuple]:
    return [(t["scene"], t["index"], t["speaker"], t["text"]) for t in turns]


@pytest.fixture(scope="module")
def tiny() -> list[dict]:
    return read(need_shared_data() / TINY, **TINY_KEYS)


def test_tiny_shakespeare_counts(tiny: list[dict]) -> None:
    speakers = Counter(turn["speaker"] for turn in tiny)
    assert len(tiny) == 7_097  # 7,222 paragraphs, less 125 speaker lines with no speech
    assert len(speakers) == 298
    assert speakers.most_common(3) == [("GLOUCESTER", 211), ("DUKE VINCENTIO", 189), ("MENENIUS", 161)]
    assert speakers["KING RICHARD III"] == 137 and speakers["Senators, &C"] == 2
    assert "Narrator" not in speakers  # every paragraph starts with a speaker: nothing unattributed
    assert not any("\n" in turn["text"] or not turn["text"] for turn in tiny)


def test_tiny_shakespeare_speeches(tiny: list[dict]) -> None:
    assert rows(tiny[:2]) == [
        ("scene-0.0", 0, "First Citizen", "Before we proceed any further, hear me speak."),
        ("scene-0.0", 1, "All", "Speak, speak."),
    ]
    assert tiny[0]["meta"] == {"line": 1}
    # verse lines that end with a colon inside a speech stay verse ("Nay, let them follow:")
    marcius = next(turn for turn in tiny if turn["text"].startswith("Nay, let them follow:"))
    assert marcius["speaker"] == "MARCIUS" and "The Volsces have much corn" in marcius["text"]


def test_tiny_shakespeare_scenes(tiny: list[dict]) -> None:
    # two runs of two blank lines split the file into 3 parts, cut into pseudo-scenes of at most 40 speeches
    scenes = Counter(turn["scene"] for turn in tiny)
    assert len(scenes) == 180 and max(scenes.values()) == 40
    assert sorted({scene.split(".")[0] for scene in scenes}) == ["scene-0", "scene-1", "scene-2"]
    first_of_part_1 = next(turn for turn in tiny if turn["scene"] == "scene-1.0")
    assert first_of_part_1["speaker"] == "SAMPSON" and first_of_part_1["index"] == 0
    order = [turn["scene"] for turn in tiny]
    runs = [scene for i, scene in enumerate(order) if i == 0 or order[i - 1] != scene]
    assert len(runs) == len(set(runs))
    for scene in scenes:
        assert [t["index"] for t in tiny if t["scene"] == scene] == list(range(scenes[scene]))


def test_tiny_shakespeare_empty_speeches_and_long_names() -> None:
    text = (need_shared_data() / TINY).read_text(encoding="utf-8")
    parser = _ScriptParser(config(**TINY_KEYS))
    assert sum(1 for _ in parser.turns(text)) == 7_097 and parser.empty == 125
    # with at most 4 words, `Ghost of King Henry VI:` is no name and goes on the speech before it
    four = _ScriptParser(config(**(TINY_KEYS | {"max_name_words": 4})))
    ghost = [turn for turn in four.turns(text) if "Ghost of King Henry VI" in turn["text"]]
    assert len(ghost) == 1 and ghost[0]["speaker"] != "Ghost of King Henry VI"


DATASET_TXT = """Here is a sample dialogue. Lines without a name are narration.
Alice:In the first line of your sonnet, would not 'a spring day' do as well?
Bob:It wouldn't scan.
Bob:obviously
Note that this whole sentence is not a name: it is narration.
Alice:(smiles) Yet Christmas is a winter's day.
Bob: *shrugs* I don't think you're serious.
10:30 is a time, not a speaker.
***
Alice:
A bare name takes the next lines
of its paragraph.

Bob ： full-width colons work too
"""


def test_dataset_txt_defaults(tmp_path: Path) -> None:
    turns = read(script(tmp_path, DATASET_TXT))
    assert rows(turns) == [
        ("scene-0", 0, "Narrator", "Here is a sample dialogue. Lines without a name are narration."),
        ("scene-0", 1, "Alice", "In the first line of your sonnet, would not 'a spring day' do as well?"),
        ("scene-0", 2, "Bob", "It wouldn't scan."),
        ("scene-0", 3, "Bob", "obviously"),  # split on the first colon, not lstrip("Bob:")
        ("scene-0", 4, "Narrator", "Note that this whole sentence is not a name: it is narration."),
        ("scene-0", 5, "Alice", "Yet Christmas is a winter's day."),
        ("scene-0", 6, "Bob", "I don't think you're serious."),
        ("scene-0", 7, "Narrator", "10:30 is a time, not a speaker."),
        ("scene-1", 0, "Alice", "A bare name takes the next lines of its paragraph."),
        ("scene-1", 1, "Bob", "full-width colons work too"),
    ]
    assert turns[5]["meta"] == {"line": 6, "actions": ["smiles"]}
    assert turns[6]["meta"] == {"line": 7, "actions": ["shrugs"]}
    assert turns[8]["meta"] == {"line": 10}


def test_actions_keep_and_strip(tmp_path: Path) -> None:
    path = script(tmp_path, "Alice: (smiles) Hello *waves* there.\nBob: (nods)\n")
    assert [t["text"] for t in read(path, actions="keep")] == ["(smiles) Hello *waves* there.", "(nods)"]
    stripped = read(path, actions="strip")
    assert rows(stripped) == [("scene-0", 0, "Alice", "Hello there.")]  # Bob says nothing but an action
    assert stripped[0]["meta"] == {"line": 1}


def test_unattributed_lines(tmp_path: Path) -> None:
    path = script(tmp_path, "A door opens.\nAlice: Hello,\nhow are you?\n\nThe rain goes on.\nBob: Fine.\n")
    assert rows(read(path, unattributed="previous")) == [
        ("scene-0", 0, "Narrator", "A door opens."),  # nothing before it to go on
        ("scene-0", 1, "Alice", "Hello, how are you? The rain goes on."),
        ("scene-0", 2, "Bob", "Fine."),
    ]
    assert rows(read(path, unattributed="drop")) == [("scene-0", 0, "Alice", "Hello,"), ("scene-0", 1, "Bob", "Fine.")]
    assert [t["speaker"] for t in read(path, narrator="Scene")] == ["Scene", "Alice", "Scene", "Scene", "Bob"]


def test_speakers_list_and_name_rules(tmp_path: Path) -> None:
    path = script(tmp_path, "Note: this is a note.\nAlice: Hi.\nthe end: lowercase\nDr. Jekyll-Hyde: Hello.\n")
    assert [t["speaker"] for t in read(path)] == ["Note", "Alice", "Narrator", "Dr. Jekyll-Hyde"]
    assert [t["speaker"] for t in read(path, speakers=["Alice", "Dr.  Jekyll-Hyde"])] == [
        "Narrator",
        "Alice",
        "Narrator",
        "Dr. Jekyll-Hyde",
    ]
    one_word = read(path, max_name_words=1)  # narration lines of one paragraph make one turn
    assert [(t["speaker"], t["text"]) for t in one_word][2:] == [("Narrator", "the end: lowercase Dr. Jekyll-Hyde: Hello.")]


def test_block_layout_and_scene_breaks(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        "ROMEO:\nBut soft:\nwhat light?\n\nJULIET:\nAy me!\n\n\nNURSE: Madam!\n[Scene 2]\nROMEO:\nHere.\n",
    )
    assert rows(read(path, layout="block")) == [
        ("scene-0", 0, "ROMEO", "But soft: what light?"),  # `But soft:` inside a speech is verse
        ("scene-0", 1, "JULIET", "Ay me!"),
        ("scene-0", 2, "NURSE", "Madam!"),
        ("scene-1", 0, "ROMEO", "Here."),
    ]
    assert [t["scene"] for t in read(path, layout="block", scene_break_blank_lines=2)] == [
        "scene-0",
        "scene-0",
        "scene-1",
        "scene-2",
    ]
    # without the pattern, `[Scene 2]` and the ROMEO line are more lines of the NURSE's paragraph
    assert rows(read(path, layout="block", scene_size=1, scene_break_pattern=None)) == [
        ("scene-0.0", 0, "ROMEO", "But soft: what light?"),
        ("scene-0.1", 0, "JULIET", "Ay me!"),
        ("scene-0.2", 0, "NURSE", "Madam! [Scene 2] ROMEO: Here."),
    ]


def test_registered_with_its_data_file() -> None:
    kind = SOURCES["name_line_script"]
    assert kind.config is NameLineScriptConfig and kind.read is read_name_line_script and kind.doc
    assert kind.files(config()) == {"data": DataRef(path="dataset.txt")}
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        config(scene_break_pattern="(unclosed")
    with pytest.raises(ValidationError, match="unattributed"):
        config(unattributed="keep")


def test_no_speaker_at_all(tmp_path: Path) -> None:
    path = script(tmp_path, "just prose\nmore prose\n")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value) == (
        f"{path}:1: no line starts with a speaker name and a colon\n"
        "  fix: start turns with `Name: line` (a capitalised name of at most 4 words)"
    )
    with pytest.raises(DataError, match=r"fix: list the names in source.speakers \(none of \['Carol'\] starts a line\)"):
        read(script(tmp_path, "Alice: hi\n"), speakers=["Carol"])


def test_empty_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset.txt:1: the file is empty"):
        read(script(tmp_path, "\n \n"))
    path = tmp_path / "dataset.txt"
    path.write_bytes("Alice: hi\nBob: Se\xf1or\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"dataset.txt:2: byte 0xf1 at byte offset 17 is not valid UTF-8"):
        read(path)
