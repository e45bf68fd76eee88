"""The southpark_csv source on the real Kaggle files and on small broken files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.datafiles import DataRef
from engine.errors import DataError
from engine.registry import SOURCES, InputFile
from engine.sources.southpark_csv import SouthParkCSVConfig, read_southpark_csv

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOUTHPARK = "southpark/BobAdamsEE__SouthParkData"


def shared_file(relative: str) -> Path:
    """A file of the shared data folder; missing data fails the test on CI and skips it elsewhere."""
    path = SHARED / relative
    if not path.is_file():
        message = f"shared data file {path} is missing"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def read(path: Path, seasons: list[int] | None = None) -> list[dict]:
    config = SouthParkCSVConfig(kind="southpark_csv", data={"path": path.name}, seasons=seasons)
    return list(read_southpark_csv(config, {"data": InputFile(path=path, sha256="0" * 64)}, None))


@pytest.fixture(scope="module")
def all_seasons() -> list[dict]:
    return read(shared_file(f"{SOUTHPARK}/All-seasons.csv"))


def test_all_seasons_counts(all_seasons: list[dict]) -> None:
    assert len(all_seasons) == 70_879  # 70,896 records less the 17 repeated headers
    speakers = Counter(turn["speaker"] for turn in all_seasons)
    assert speakers["Cartman"] == 9_774
    assert speakers["Stan"] == 7_680
    assert len({turn["scene"] for turn in all_seasons}) == 257
    assert not any(turn["speaker"] == "Character" for turn in all_seasons)


def test_all_seasons_text_has_no_newlines(all_seasons: list[dict]) -> None:
    assert not any(turn["text"].endswith("\n") for turn in all_seasons)
    assert not any("\n" in turn["text"] or "\r" in turn["text"] for turn in all_seasons)
    assert not any(turn["text"] != turn["text"].rstrip(" \t\r\n") for turn in all_seasons)  # NBSP: clean's job


def test_all_seasons_first_turn_and_scene_order(all_seasons: list[dict]) -> None:
    assert all_seasons[0] == {
        "scene": "s10e01",
        "index": 0,
        "speaker": "Stan",
        "text": "You guys, you guys! Chef is going away.",
        "meta": {"season": 10, "episode": 1},
    }
    # scenes are contiguous and their indices count 0, 1, 2, ... in file order
    next_index: dict[str, int] = {}
    previous = None
    for turn in all_seasons:
        if turn["scene"] != previous:
            assert turn["scene"] not in next_index, f"scene {turn['scene']} is split"
        assert turn["index"] == next_index.get(turn["scene"], 0)
        next_index[turn["scene"]] = turn["index"] + 1
        previous = turn["scene"]
    # the file runs from season 10 to 18, then 1 to 9
    seasons = list(dict.fromkeys(turn["meta"]["season"] for turn in all_seasons))
    assert seasons == list(range(10, 19)) + list(range(1, 10))


def test_season_1() -> None:
    turns = read(shared_file(f"{SOUTHPARK}/by-season/Season-1.csv"))
    assert len(turns) == 4_170
    assert sum(turn["speaker"] == "Cartman" for turn in turns) == 624
    assert len({turn["scene"] for turn in turns}) == 13
    assert turns[0]["scene"] == "s01e01" and turns[0]["speaker"] == "Boys"
    assert turns[1]["text"] == "Ah, damn it! My little brother's trying to follow me to school again."


def test_seasons_filter_matches_the_season_file(all_seasons: list[dict]) -> None:
    only_1 = read(shared_file(f"{SOUTHPARK}/All-seasons.csv"), seasons=[1])
    season_file = read(shared_file(f"{SOUTHPARK}/by-season/Season-1.csv"))
    assert only_1 == season_file
    assert len(read(shared_file(f"{SOUTHPARK}/by-season/Season-1.csv"), seasons=[2])) == 0


def test_newlines_inside_a_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.csv"
    path.write_text('Season,Episode,Character,Line\n3,7,Kyle,"One line\nand another. \n"\n', encoding="utf-8")
    assert read(path) == [
        {
            "scene": "s03e07",
            "index": 0,
            "speaker": "Kyle",
            "text": "One line and another.",
            "meta": {"season": 3, "episode": 7},
        }
    ]


def test_registered_with_its_data_file() -> None:
    kind = SOURCES["southpark_csv"]
    config = SouthParkCSVConfig(kind="southpark_csv", data={"path": "All-seasons.csv"})
    assert kind.config is SouthParkCSVConfig and kind.read is read_southpark_csv
    assert kind.files(config) == {"data": DataRef(path="All-seasons.csv")}
    assert kind.doc
    with pytest.raises(ValidationError):
        SouthParkCSVConfig(kind="southpark_csv", data={"path": "x.csv"}, season=[1])


# --- broken files: each DataError names the file, the line and the fix -------------------------------


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "speaker.csv"
    path.write_text("Season,Episode,Speaker,Line\n1,1,Cartman,hi\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    message = str(error.value)
    assert message.startswith(
        f"{path}:1: missing column(s) Character; found columns: Season, Episode, Speaker, Line; "
        "expected: Season, Episode, Character, Line"
    )
    assert "fix: make the first line of the file the header `Season,Episode,Character,Line`" in message
    assert error.value.row == 1 and error.value.file == str(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty") as error:
        read(path)
    assert str(error.value).startswith(f"{path}:1: the file is empty")
    assert "Season,Episode,Character,Line" in error.value.fix


def test_header_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("Season,Episode,Character,Line\n", encoding="utf-8")
    with pytest.raises(DataError, match="has a header but no rows"):
        read(path)


def test_latin_1_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    content = 'Season,Episode,Character,Line\n1,1,Cartman,"Hello"\n1,1,Chef,"Se\xf1or"\n'
    path.write_bytes(content.encode("latin-1"))
    offset = content.index("\xf1")
    with pytest.raises(DataError) as error:
        read(path)
    message = str(error.value)
    assert message.startswith(f"{path}:3: byte 0xf1 at byte offset {offset} is not valid UTF-8")
    assert "re-save the file as UTF-8" in message


def test_bad_season(tmp_path: Path) -> None:
    path = tmp_path / "season.csv"
    # the first record spans lines 2-3, so the bad one starts on line 4
    path.write_text('Season,Episode,Character,Line\n1,1,Cartman,"hi\n"\nx,1,Kyle,"yo"\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:4: Season is 'x', not a whole number")
    assert "fix: put the season number" in str(error.value)


def test_bad_episode(tmp_path: Path) -> None:
    path = tmp_path / "episode.csv"
    path.write_text('Season,Episode,Character,Line\n1,one,Cartman,"hi"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":2: Episode is 'one', not a whole number"):
        read(path)


def test_short_row(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text('Season,Episode,Character,Line\n1,1,Cartman\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":2: the row has 3 field\(s\), expected 4"):
        read(path)


def test_unclosed_quote_is_named_not_swallowed(tmp_path: Path) -> None:
    path = tmp_path / "unclosed.csv"
    # without csv's strict mode, Stan's row would become the rest of Cartman's line and the file would read as 2 turns
    path.write_text('Season,Episode,Character,Line\n1,1,Kyle,"hi"\n1,1,Cartman,"unclosed\n1,1,Stan,hi\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:3: malformed CSV (unexpected end of data)")
    assert "fix: close the double quote that this row opens" in str(error.value)


def test_extra_data_adds_season_19_and_refuses_an_episode_read_twice(all_seasons: list[dict]) -> None:
    season_19 = shared_file(f"{SOUTHPARK}/by-season/Season-19.csv")
    season_1 = shared_file(f"{SOUTHPARK}/by-season/Season-1.csv")
    every = shared_file(f"{SOUTHPARK}/All-seasons.csv")

    def read_with(extra: Path) -> list[dict]:
        config = SouthParkCSVConfig(kind="southpark_csv", data={"path": every.name}, extra_data=[{"path": extra.name}])
        inputs = {"data": InputFile(path=every, sha256="0" * 64), "extra_data_0": InputFile(path=extra, sha256="0" * 64)}
        return list(read_southpark_csv(config, inputs, None))

    turns = read_with(season_19)
    assert turns[: len(all_seasons)] == all_seasons
    added = turns[len(all_seasons) :]
    assert len({t["scene"] for t in added}) == 10 and all(t["scene"].startswith("s19e") for t in added)
    assert Counter(t["speaker"] for t in added)["Cartman"] == 247
    with pytest.raises(DataError) as error:
        read_with(season_1)  # season 1 is in All-seasons.csv already
    assert str(error.value).startswith(f"{season_1}: episode s01e01 was already read from {every}")
    assert "fix: list each season in one file only" in str(error.value)
