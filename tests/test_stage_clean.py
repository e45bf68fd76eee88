"""The clean stage: per-rule counts on a handmade turns.jsonl and on the real South Park files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.registry import STAGES, InputFile, StageContext
from engine.sources.southpark_csv import SouthParkCSVConfig, read_southpark_csv
from engine.stages.clean import CleanConfig, run_clean

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOUTHPARK = "southpark/BobAdamsEE__SouthParkData"
NBSP = "\u00a0"


def shared_file(relative: str) -> Path:
    """A file of the shared data folder; missing data fails the test on CI and skips it elsewhere."""
    path = SHARED / relative
    if not path.is_file():
        message = f"shared data file {path} is missing"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def turn(scene: str, index: int, speaker: str, text: str) -> dict:
    return {"scene": scene, "index": index, "speaker": speaker, "text": text, "meta": {"n": index}}


def run(tmp_path: Path, turns: list[dict], config: CleanConfig) -> tuple[dict, list[dict]]:
    """Run the stage on these turns as the source's output; returns its result and the turns it wrote."""
    source, out = tmp_path / "source", tmp_path / "clean"
    source.mkdir()
    out.mkdir()
    with open(source / "turns.jsonl", "w", encoding="utf-8") as handle:
        for item in turns:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    ctx = StageContext(
        recipe=SimpleNamespace(character=SimpleNamespace(name="Cartman")),
        config=config,
        out=out,
        run_dir=tmp_path,
        upstream={"source": source},
        inputs={},
        console=Console(quiet=True),
    )
    result = run_clean(ctx)
    assert json.loads((out / "rules.json").read_text(encoding="utf-8")) == result["rules"]
    written = [json.loads(line) for line in (out / "turns.jsonl").read_text(encoding="utf-8").splitlines()]
    return result, written


HANDMADE = [
    turn("s01e01", 0, "Cartman", "CafÃ© time"),  # mojibake
    turn("s01e01", 1, "Kyle", f"Hello{NBSP}there  friend "),  # NBSP, double and trailing space
    turn("s01e01", 2, "Boys", "We are boys"),  # a group speaker
    turn("s01e01", 3, " Ludwig ", "Music!"),  # an alias, with spaces around it
    turn("s01e01", 4, "Cartman", " \t "),  # only whitespace
    turn("s01e01", 5, "Stan", "ok"),  # too short for min_chars=3
    turn("s01e01", 6, "Cartman", "Screw you guys"),
    turn("s01e02", 0, "Kyle", "Dude"),
]


def test_each_rule_counts_its_changes(tmp_path: Path) -> None:
    config = CleanConfig(speaker_aliases={"Ludwig": "Beethoven"}, drop_speakers=["Boys"], min_chars=3)
    result, written = run(tmp_path, HANDMADE, config)
    rules = {row["rule"]: row for row in result["rules"]}
    assert list(rules) == [
        "fix_unicode",
        "normalize_whitespace",
        "speaker_aliases",
        "drop_speakers",
        "drop_empty",
        "min_chars",
    ]
    counts = {name: (row["changed"], row["removed"]) for name, row in rules.items()}
    assert counts == {
        "fix_unicode": (1, 0),
        "normalize_whitespace": (3, 0),  # Kyle's text, the speaker " Ludwig " and the blank text
        "speaker_aliases": (1, 0),
        "drop_speakers": (0, 1),
        "drop_empty": (0, 1),
        "min_chars": (0, 1),
    }
    assert rules["fix_unicode"]["example"] == "'CafÃ© time' -> 'Café time'"
    assert rules["normalize_whitespace"]["example"] == "'Hello\\xa0there  friend ' -> 'Hello there friend'"
    assert rules["speaker_aliases"]["example"] == "speaker 'Ludwig' -> 'Beethoven'"
    assert rules["drop_speakers"]["example"] == "Boys: 'We are boys' -> (removed)"
    assert rules["min_chars"]["example"] == "Stan: 'ok' -> (removed)"
    assert {key: result[key] for key in ("turns_in", "turns_out", "character_turns")} == {
        "turns_in": 8,
        "turns_out": 5,
        "character_turns": 2,
    }
    # what is left keeps its order and meta, with indices numbered again within each scene
    assert [(t["scene"], t["index"], t["speaker"], t["text"], t["meta"]["n"]) for t in written] == [
        ("s01e01", 0, "Cartman", "Café time", 0),
        ("s01e01", 1, "Kyle", "Hello there friend", 1),
        ("s01e01", 2, "Beethoven", "Music!", 3),
        ("s01e01", 3, "Cartman", "Screw you guys", 6),
        ("s01e02", 0, "Kyle", "Dude", 0),
    ]


def test_examples_are_short(tmp_path: Path) -> None:
    long_text = "word " * 60 + f"end{NBSP}here"
    result, _ = run(tmp_path, [turn("a", 0, "Cartman", long_text)], CleanConfig())
    example = {row["rule"]: row["example"] for row in result["rules"]}["normalize_whitespace"]
    assert len(example) < 120 and "\\xa0" in example and example.count("…") >= 2


def test_rules_can_be_switched_off(tmp_path: Path) -> None:
    config = CleanConfig(fix_unicode=False, normalize_whitespace=False, drop_empty=False, min_chars=0)
    result, written = run(tmp_path, HANDMADE, config)
    assert result["rules"] == []
    assert [t["text"] for t in written] == [t["text"] for t in HANDMADE]
    assert result["turns_out"] == 8 and result["character_turns"] == 3


def test_defaults_and_registration() -> None:
    assert [name for name in CleanConfig.model_fields] == [
        "fix_unicode",
        "normalize_whitespace",
        "drop_empty",
        "speaker_aliases",
        "drop_speakers",
        "min_chars",
    ]
    assert all(field.description for field in CleanConfig.model_fields.values())
    with pytest.raises(ValidationError):
        CleanConfig(drop_speaker=["Boys"])
    with pytest.raises(ValidationError):
        CleanConfig(min_chars=-1)
    stage = STAGES["clean"]
    assert stage.run is run_clean and stage.needs == ("source",) and stage.libraries == ("ftfy",)
    assert stage.version == "1" and stage.doc.startswith("Fix encoding and whitespace")


def read_source(path: Path) -> list[dict]:
    config = SouthParkCSVConfig(kind="southpark_csv", data={"path": path.name})
    return list(read_southpark_csv(config, {"data": InputFile(path=path, sha256="0" * 64)}, None))


def test_season_1(tmp_path: Path) -> None:
    turns = read_source(shared_file(f"{SOUTHPARK}/by-season/Season-1.csv"))
    assert sum(NBSP in t["text"] for t in turns) == 0  # Season 1 has no NBSP; the whole file has them
    messy = sum(t["text"] != " ".join(t["text"].split()) for t in turns)
    result, written = run(tmp_path, turns, CleanConfig())
    rules = {row["rule"]: (row["changed"], row["removed"]) for row in result["rules"]}
    assert messy == 495
    assert rules == {"fix_unicode": (0, 0), "normalize_whitespace": (495, 0), "drop_empty": (0, 0), "min_chars": (0, 0)}
    assert (result["turns_in"], result["turns_out"], result["character_turns"]) == (4_170, 4_170, 624)
    assert not any("  " in t["text"] for t in written)


def test_all_seasons_nbsp(tmp_path: Path) -> None:
    turns = read_source(shared_file(f"{SOUTHPARK}/All-seasons.csv"))
    assert sum(NBSP in t["text"] for t in turns) == 872
    assert sum(t["text"].count(NBSP) for t in turns) == 1_865
    config = CleanConfig(drop_speakers=["Boys"])
    result, written = run(tmp_path, turns, config)
    rules = {row["rule"]: (row["changed"], row["removed"]) for row in result["rules"]}
    assert rules == {
        "fix_unicode": (0, 0),  # no mojibake in the file
        "normalize_whitespace": (8_711, 0),
        "drop_speakers": (0, 75),
        "drop_empty": (0, 0),
        "min_chars": (0, 0),
    }
    assert (result["turns_in"], result["turns_out"], result["character_turns"]) == (70_879, 70_804, 9_774)
    assert not any(NBSP in t["text"] for t in written)
