"""The dataset stage on hand-made turns: windows, scene splits, trimming, caps and its errors."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.errors import StageError
from engine.models import ModelConfig, resolve_base_model
from engine.persona import CharacterConfig
from engine.registry import STAGES, StageContext
from engine.stages.dataset import DatasetConfig, heldout_scene_ids, run_dataset


@pytest.fixture(scope="session")
def base_model() -> Path:
    return resolve_base_model(ModelConfig())  # converts the embedded gguf once, then cached


def scene_turns(scene: str, speakers: list[str]) -> list[dict]:
    # every text names its scene and position, so a context turn shows where it came from
    return [
        {"scene": scene, "index": i, "speaker": speaker, "text": f"{scene} line {i} by {speaker}.", "meta": {}}
        for i, speaker in enumerate(speakers)
    ]


def corpus(scenes: int = 10) -> list[dict]:
    turns = []
    for n in range(scenes):
        turns += scene_turns(f"ep{n // 5}/scene{n}", ["Cartman", "Stan", "Kyle", "Cartman", "Kenny", "Stan", "Cartman"])
    return turns


def make_ctx(tmp_path: Path, base_model: Path, turns: list[dict], character: str = "Cartman", **config) -> StageContext:
    clean = tmp_path / "clean"
    clean.mkdir(parents=True)
    with open(clean / "turns.jsonl", "w", encoding="utf-8") as handle:
        for turn in turns:
            handle.write(json.dumps(turn) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    cfg = DatasetConfig(**config)
    recipe = types.SimpleNamespace(
        character=CharacterConfig(name=character), model=ModelConfig(base=str(base_model)), dataset=cfg
    )
    return StageContext(
        recipe=recipe, config=cfg, out=out, run_dir=tmp_path, upstream={"clean": clean}, inputs={}, console=Console(quiet=True)
    )


def load(ctx: StageContext):
    from datasets import load_from_disk

    return load_from_disk(str(ctx.out / "data"))


def test_registered_with_its_cache_inputs():
    kind = STAGES["dataset"]
    assert kind.needs == ("clean",) and kind.reads == ("dataset", "character", "model")
    assert {"transformers", "datasets", "jinja2"} <= set(kind.libraries)
    assert kind.doc.startswith("Window the character's lines")


def test_template_name_is_checked_at_validation():
    with pytest.raises(ValidationError, match="did you mean 'southpark_alpaca'"):
        DatasetConfig(template="southpark-alpaca")
    with pytest.raises(ValidationError, match="min_context_turns"):
        DatasetConfig(context_turns=1, min_context_turns=2)


def test_windows_split_by_scene(tmp_path, base_model):
    turns = corpus()
    ctx = make_ctx(tmp_path, base_model, turns, heldout_fraction=0.3, context_turns=2)
    summary = run_dataset(ctx)
    data = load(ctx)
    train, heldout = data["train"], data["heldout"]
    assert set(train.column_names) == {"scene", "speaker", "prompt", "completion", "context", "turn_index", "other_lines"}
    assert set(train["speaker"]) == set(heldout["speaker"]) == {"Cartman"} and summary["other_speaker_samples"] == 0

    # 3 lines of Cartman a scene; the first has no context and is skipped
    assert summary["skipped_no_context"] == 10
    assert summary["train"] + summary["heldout"] == 20 == len(train) + len(heldout)
    assert summary["train_scenes"] == len(set(train["scene"])) and summary["heldout_scenes"] == len(set(heldout["scene"]))
    assert not set(train["scene"]) & set(heldout["scene"])
    assert set(heldout["scene"]) == heldout_scene_ids(sorted({t["scene"] for t in turns}), ctx.config)
    assert summary["template"] == "tokenizer" and summary["tokens_max"] <= 256
    assert summary["tokens_p50"] <= summary["tokens_p95"] <= summary["tokens_max"]

    by_key = {(t["scene"], t["index"]): t for t in turns}
    for row in list(train) + list(heldout):
        line = by_key[(row["scene"], row["turn_index"])]
        assert line["speaker"] == "Cartman" and row["completion"] == line["text"]  # the line exactly, no EOS
        expected = [t for t in turns if t["scene"] == row["scene"] and row["turn_index"] - 2 <= t["index"] < row["turn_index"]]
        assert row["context"] == [{"speaker": t["speaker"], "text": t["text"]} for t in expected]
        assert all(row["scene"] in c["text"] for c in row["context"])  # never across scenes
        assert row["prompt"].endswith("<|im_start|>assistant\n") and "SmolLM" not in row["prompt"]
        assert expected[-1]["text"] in row["prompt"]
    for row in train:  # the preference phase's rejected lines: other speakers, same (training) scene
        scene_others = {t["text"] for t in turns if t["scene"] == row["scene"] and t["speaker"] != "Cartman"}
        assert len(row["other_lines"]) == 4 and set(row["other_lines"]) == scene_others
    assert all(row["other_lines"] == [] for row in heldout)  # nothing of a held-out scene can reach training

    preview = (ctx.out / "preview.md").read_text()
    assert preview.count("### prompt") == 3 and train[0]["completion"] in preview


def test_speaker_conditioned_samples_name_their_speaker_and_stay_in_training_scenes(tmp_path, base_model):
    turns = corpus()
    ctx = make_ctx(tmp_path, base_model, turns, heldout_fraction=0.3, context_turns=2, template="southpark_alpaca",
                   speakers="all", min_speaker_lines=10)  # fmt: skip
    summary = run_dataset(ctx)
    data = load(ctx)
    train, heldout = data["train"], data["heldout"]
    heldout_scenes = set(heldout["scene"])

    # Kenny speaks 10 lines (enough), Stan and Kyle 20 and 10: every speaker of a training scene gives samples
    assert set(train["speaker"]) == {"Cartman", "Stan", "Kyle", "Kenny"} and summary["train_speakers"] == 4
    assert set(heldout["speaker"]) == {"Cartman"}, "held-out samples are the character's lines only"
    assert not set(train["scene"]) & heldout_scenes
    others = [row for row in train if row["speaker"] != "Cartman"]
    assert summary["other_speaker_samples"] == len(others) == 4 * len(set(train["scene"]))  # Stan 2, Kyle 1, Kenny 1 a scene
    by_key = {(t["scene"], t["index"]): t for t in turns}
    for row in train:
        assert by_key[(row["scene"], row["turn_index"])]["speaker"] == row["speaker"]
        assert row["prompt"].endswith(f" ### {row['speaker']}:"), row["prompt"][-40:]  # the tag names the speaker
        assert (row["other_lines"] == []) == (row["speaker"] != "Cartman")  # preference pairs stay the character's
    # in Stan's sample the character is just another "Name: line" of the script
    stan = next(row for row in train if row["speaker"] == "Stan" and row["turn_index"] == 5)
    scene = stan["scene"]
    assert stan["prompt"].endswith(f"Cartman: {scene} line 3 by Cartman.\nKenny: {scene} line 4 by Kenny.\n\n ### Stan:")
    assert "Cartman" not in stan["prompt"].split("### Script:")[0]  # the preamble names Stan, not the character

    with pytest.raises(StageError, match=r"dataset.speakers names Butters, who say nothing"):
        run_dataset(make_ctx(tmp_path / "named", base_model, turns, heldout_fraction=0.3, speakers=["Stan", "Butters"]))
    named = make_ctx(tmp_path / "stan", base_model, turns, heldout_fraction=0.3, speakers=["Stan"])
    run_dataset(named)
    assert set(load(named)["train"]["speaker"]) == {"Cartman", "Stan"}
    with pytest.raises(ValidationError, match="speakers"):
        DatasetConfig(speakers="everyone")


def test_heldout_scene_is_stable_when_data_grows():
    cfg = DatasetConfig(heldout_fraction=0.5, split_seed=3)
    few = [f"s{i}" for i in range(20)]
    many = few + [f"t{i}" for i in range(200)]
    assert heldout_scene_ids(few, cfg) == heldout_scene_ids(many, cfg) & set(few)
    assert 50 < len(heldout_scene_ids(many, cfg)) < 170
    assert heldout_scene_ids(few, cfg) != heldout_scene_ids(few, DatasetConfig(heldout_fraction=0.5, split_seed=4))


def test_heldout_scenes_patterns(tmp_path, base_model):
    ctx = make_ctx(
        tmp_path, base_model, corpus(), template="southpark_alpaca", heldout_scenes=["ep1/*", "ep0/scene2"], max_heldout_samples=5
    )
    summary = run_dataset(ctx)
    data = load(ctx)
    assert set(data["heldout"]["scene"]) <= {"ep1/scene5", "ep1/scene6", "ep1/scene7", "ep1/scene8", "ep1/scene9", "ep0/scene2"}
    assert len(data["heldout"]) == summary["heldout"] == 5  # capped from 12, at random but seeded
    assert set(data["train"]["scene"]) == {"ep0/scene0", "ep0/scene1", "ep0/scene3", "ep0/scene4"}
    prompt = data["train"][0]["prompt"]
    assert prompt.startswith("Below is a script from the American animated sitcom South Park.") and prompt.endswith("\n\n ### Cartman:")

    with pytest.raises(StageError, match=r"heldout_scenes \['nope/\*'\] match no scene; scene ids look like: ep0/scene0"):
        run_dataset(make_ctx(tmp_path / "b", base_model, corpus(), heldout_scenes=["nope/*"]))


def test_max_length_trims_oldest_context_and_drops_what_cannot_fit(tmp_path, base_model):
    long = " ".join(["blah"] * 60)
    turns = scene_turns("a", ["Stan", "Kyle", "Stan", "Cartman"]) + scene_turns("b", ["Kyle", "Cartman", "Kyle", "Cartman"])
    turns[0]["text"] = turns[1]["text"] = long  # scene a: two long old turns push the sample over the budget
    turns[5]["text"] = " ".join(["huge"] * 300)  # scene b: a line that cannot fit even alone
    ctx = make_ctx(tmp_path, base_model, turns, heldout_scenes=["b"], max_length=90)
    summary = run_dataset(ctx)
    data = load(ctx)
    assert summary["dropped_too_long"] == 1 and summary["trimmed"] == 2 and summary["tokens_max"] <= 90
    train = data["train"][0]
    assert train["context"] == [{"speaker": "Stan", "text": turns[2]["text"]}]  # the newest turn is what remains
    assert long not in train["prompt"]
    heldout = data["heldout"][0]  # b's second line: the huge line in its context was trimmed away
    assert heldout["turn_index"] == 3 and heldout["context"] == [{"speaker": "Kyle", "text": turns[6]["text"]}]


def test_character_without_lines_names_the_frequent_speakers(tmp_path, base_model):
    turns = scene_turns("s1", ["Stan", "Kyle", "Stan", "Kenny", "Butters", "Stan", "Kyle", "Wendy", "Randy"])
    ctx = make_ctx(tmp_path, base_model, turns, character="Cartmen")
    with pytest.raises(StageError) as caught:
        run_dataset(ctx)
    assert str(caught.value) == (
        "stage dataset: the character 'Cartmen' has no lines in the cleaned turns; the most frequent speakers are: "
        "Stan (3), Kyle (2), Kenny (1), Butters (1), Wendy (1). fix: set character.name to the speaker as spelled "
        "in the data, or map aliases to it in the clean stage"
    )


def test_empty_split_says_how_to_fix_it(tmp_path, base_model):
    ctx = make_ctx(tmp_path, base_model, corpus(2), heldout_fraction=0.0)
    with pytest.raises(StageError, match=r"the heldout split is empty .*fix: raise dataset.heldout_fraction"):
        run_dataset(ctx)


def test_other_lines_skip_near_duplicates_of_the_characters_line():
    import random

    from engine.stages.dataset import OTHER_LINES, other_speaker_lines

    turns = [
        {"speaker": "Stan", "text": "Screw you guys, I'm going home!"},  # the line itself, said by someone else
        {"speaker": "Kyle", "text": "Screw you guys, I'm going home."},  # a near-duplicate
        {"speaker": "Cartman", "text": "Respect my authoritah!"},  # the character's own other line
        *({"speaker": "Kenny", "text": f"Mmph {i}"} for i in range(12)),
    ]
    picked = other_speaker_lines(turns, "Cartman", "Screw you guys, I'm going home!", random.Random(0))
    assert len(picked) == OTHER_LINES and all(line.startswith("Mmph") for line in picked)
    assert picked == other_speaker_lines(turns, "Cartman", "Screw you guys, I'm going home!", random.Random(0))
