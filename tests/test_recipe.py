"""Recipe loading: every shipped recipe validates; errors are golden strings with file:line:col, key and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.errors import RecipeError
from engine.recipe import load_recipe
from engine.registry import SOURCES

ROOT = Path(__file__).resolve().parents[1]
FALSTAFF = ROOT / "recipes" / "shakespeare_falstaff.yaml"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.character.name


def test_include_merges_base_and_local_keys_win():
    recipe = load_recipe(FALSTAFF)
    assert recipe.model.base == "embedded"  # from _base/smollm2_cpu.yaml
    assert recipe.train.lora.rank == 16  # from the base
    assert recipe.train.max_steps == 24  # the recipe's own value
    assert recipe.dataset.context_turns == 2  # local beats the base's 4


def test_unknown_key_names_file_line_column_and_suggests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", f"""
        include: {FALSTAFF}
        train:
          lora:
            rnak: 8
        """)
    assert problems(path) == ["x.yaml:4:5: train.lora.rnak: unknown key — did you mean 'rank'?"]


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", f"""
        include: {FALSTAFF}
        train:
          learning_rate: fast
          method: lorra
        dataset:
          context_turn: 2
        """)
    assert problems(path) == [
        "x.yaml:3:18: train.learning_rate: Input should be a valid number, unable to parse string as a number (got 'fast')",
        "x.yaml:4:11: train.method: 'lorra' is not one of lora, qlora, full — did you mean 'lora'?",
        "x.yaml:6:3: dataset.context_turn: unknown key — did you mean 'context_turns'?",
    ]


def test_missing_required_keys_and_unknown_source_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", """
        source:
          kind: southpark_cvs
        """)
    found = problems(path)
    available = ", ".join(SOURCES)  # grows with every source kind; the message lists them all
    assert f"x.yaml:2:9: source.kind: unknown kind 'southpark_cvs' — did you mean 'southpark_csv'? Available: {available}" in found
    assert any(p.startswith("x.yaml: character: missing required key 'character'") for p in found)


def test_yaml_syntax_error_has_position(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", """
        name: x
        train: [unclosed
        """)
    (message,) = problems(path)
    assert message.startswith("x.yaml:3:1: YAML syntax error:")
    write(tmp_path, "quote.yaml", """
        name: x
        character:
          name: 'Cartman
          display_name: Eric
        """)
    (message,) = problems(tmp_path / "quote.yaml")
    assert message == "quote.yaml:5:1: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar that starts at line 3, column 9)"


def test_duplicate_key_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", f"""
        include: {FALSTAFF}
        name: a
        name: b
        """)
    assert "x.yaml:3:1: name: duplicate key — remove one of them" in problems(path)


def test_yaml_merge_keys_and_anchors_work_and_the_own_keys_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", f"""
        include: {FALSTAFF}
        train:
          <<: &short {{max_steps: 3, save_steps: 3}}
          save_steps: 1
        eval:
          <<: [{{max_items: 5}}, {{seed: 7}}]
        """)
    recipe = load_recipe(path)
    assert (recipe.train.max_steps, recipe.train.save_steps, recipe.eval.max_items, recipe.eval.seed) == (3, 1, 5, 7)
    write(tmp_path, "bad.yaml", f"""
        include: {FALSTAFF}
        train:
          <<: 3
        """)
    assert problems(tmp_path / "bad.yaml") == ["bad.yaml:3:7: train.<<: a merge key (<<) takes a mapping or a list of mappings, e.g. <<: *defaults"]
    write(tmp_path, "loop.yaml", f"""
        include: {FALSTAFF}
        train: &self
          <<: *self
        """)
    assert problems(tmp_path / "loop.yaml") == ["loop.yaml:2:8: train: a YAML alias refers to a mapping that contains it; write the keys out instead"]


def test_a_folder_or_an_empty_character_name_is_a_problem_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    assert problems(tmp_path / "recipes") == ["recipes: a folder, not a recipe file; name a YAML file, e.g. recipes/*.yaml"]
    found = problems(FALSTAFF, ["character.name="])
    assert found == ["--set character.name: character.name: String should have at least 1 character (got '')"]


def test_include_cycle_and_missing_include(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", "include: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    found = problems(tmp_path / "a.yaml")
    assert any("include: include cycle: a.yaml -> b.yaml -> a.yaml" in p for p in found), found
    write(tmp_path, "c.yaml", "include: nothere.yaml\n")
    found = problems(tmp_path / "c.yaml")
    assert "c.yaml:1:10: include: included file 'nothere.yaml' not found next to c.yaml or in its _base/ folder" in found


def test_set_overrides_are_typed_and_located(tmp_path):
    recipe = load_recipe(FALSTAFF, ["train.max_steps=7", "train.lora.target_modules=[q_proj, v_proj]"])
    assert recipe.train.max_steps == 7
    assert recipe.train.lora.target_modules == ["q_proj", "v_proj"]
    assert problems(FALSTAFF, ["train.max_steps=many"]) == [
        "--set train.max_steps: train.max_steps: Input should be a valid integer, unable to parse string as an integer (got 'many')"
    ]
    assert problems(FALSTAFF, ["train.lora.rnak=4"]) == ["--set train.lora.rnak: train.lora.rnak: unknown key — did you mean 'rank'?"]
    # an empty section (`lora:` with nothing under it) or a scalar for a section, without pydantic's class names
    assert problems(FALSTAFF, ["train.lora="]) == ["--set train.lora: train.lora: must be a mapping of keys (got '')"]
    assert problems(FALSTAFF, ["train.lora=null"]) == [
        "--set train.lora: train.lora: is empty: give its keys under it, or delete the line to keep the defaults"
    ]
    # a value that fits no member of a union is one problem, located, not one per member
    assert problems(FALSTAFF, ["model.config_overrides={num_hidden_layers: [1]}"]) == [
        "--set model.config_overrides: model.config_overrides.num_hidden_layers: "
        "Input should be a valid integer, a valid number, a valid string or a valid boolean"
    ]
    # a --set that turns a value of the files into a mapping is blamed on the --set, not on the file
    (message,) = problems(FALSTAFF, ["train.lora.rank.x=3"])
    assert message.startswith("--set train.lora.rank.x: train.lora.rank: Input should be a valid integer")


def test_true_false_or_nan_where_a_number_is_wanted_is_a_problem_not_a_one_or_a_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", f"""
        include: {FALSTAFF}
        train:
          max_steps: true
          lora:
            dropout: no
        """)
    assert problems(path) == [
        "x.yaml:3:14: train.max_steps: must be an integer, not true; write the number (e.g. max_steps: 60)",
        "x.yaml:5:14: train.lora.dropout: must be a number, not false; write the number (e.g. dropout: 0.05)",
    ]
    assert problems(FALSTAFF, ["train.preference.beta=on"]) == [
        "--set train.preference.beta: train.preference.beta: must be a number, not true; write the number (e.g. beta: 0.1)"
    ]
    # .nan / .inf: one problem that says what is wrong, not pydantic's 'greater than 0 (got nan)' as well
    assert problems(FALSTAFF, ["train.learning_rate=.nan", "train.max_steps=.inf"]) == [
        "--set train.learning_rate: train.learning_rate: must be a finite number, not nan; write a number",
        "--set train.max_steps: train.max_steps: must be a finite number, not inf; write a number",
    ]
    # a text key given digits (a sha256 that happens to be all digits, a numeric id): quote it
    assert problems(FALSTAFF, ["character.display_name=1234"]) == [
        "--set character.display_name: character.display_name: must be text, and YAML read 1234 as a number; put the value in quotes"
    ]
    # where a key takes a bool, a bool is still what it takes
    assert load_recipe(FALSTAFF, ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True


def test_a_default_reply_length_the_server_would_refuse_is_a_problem():
    assert problems(FALSTAFF, ["serve.max_tokens=2000"]) == [
        "--set serve.max_tokens: serve: max_tokens (2000) is above max_tokens_limit (1024): lower max_tokens or raise max_tokens_limit"
    ]
    assert problems(FALSTAFF, ["serve.max_context=128"]) == [
        "--set serve.max_context: serve: max_tokens (200) leaves no room for the prompt in max_context (128): lower max_tokens or raise max_context"
    ]
    assert load_recipe(FALSTAFF, ["serve.max_tokens=1024"]).serve.max_tokens == 1024


def test_url_data_needs_sha256(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "x.yaml", f"""
        include: {ROOT / 'recipes' / 'southpark_cartman.yaml'}
        source:
          data:
            sha256: null
        """)
    (message,) = problems(path)
    assert message.endswith("source.data: 'url' needs 'sha256' so that the download can be checked and cached")
