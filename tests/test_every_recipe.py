"""Every file in recipes/ validates and runs end to end on a tiny random model (`recipe run --smoke`), so a
contributed recipe is checked by CI with no extra work. Data comes from ../shared/data (RECIPE_DATA_PATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cache
from tests.conftest import need_shared_data

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# shakespeare_falstaff runs through the same --smoke path in test_integration.py (shared fixture)
SMOKED_ELSEWHERE = {"shakespeare_falstaff.yaml"}


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name not in SMOKED_ELSEWHERE], ids=lambda p: p.stem)
def test_recipe_runs_end_to_end_with_smoke(path, tmp_path):
    shared = need_shared_data()
    run_dir = tmp_path / "run"
    env = {**os.environ, "RECIPE_DATA_PATH": str(shared), "RECIPE_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(path), "--smoke", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lock = json.loads((run_dir / cache.LOCK).read_text())
    assert list(lock["stages"]) == ["source", "clean", "dataset", "train", "export", "eval"]
    for name in lock["stages"]:
        assert cache.read_record(run_dir / name)["key"] == lock["stages"][name]["key"]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["items"] > 0 and summary["chance"] > 0
    if path.stem == "southpark_cartman":
        check_no_heldout_episode_reaches_training(run_dir)


def check_no_heldout_episode_reaches_training(run_dir: Path) -> None:
    """Season 19 (held out, from its own file) gives no training sample and no rejected line of the preference
    phase; every rejected line is another speaker's line from the sample's own training episode."""
    from datasets import load_from_disk

    turns = [json.loads(line) for line in (run_dir / "clean" / "turns.jsonl").read_text().splitlines() if line.strip()]
    scenes = {turn["scene"] for turn in turns}
    assert any(scene.startswith("s19e") for scene in scenes) and any(scene.startswith("s18e") for scene in scenes)
    said_in: dict[str, set[str]] = {}
    for turn in turns:
        if turn["speaker"] != "Cartman":
            said_in.setdefault(turn["text"], set()).add(turn["scene"])
    data = load_from_disk(str(run_dir / "dataset" / "data"))
    assert data["train"].num_rows and data["heldout"].num_rows
    assert all(scene.startswith("s19e") for scene in data["heldout"]["scene"])
    assert not any(scene.startswith("s19e") for scene in data["train"]["scene"])
    assert all(not others for others in data["heldout"]["other_lines"])
    rejected = 0
    for scene, others in zip(data["train"]["scene"], data["train"]["other_lines"]):
        for line in others:
            assert scene in said_in.get(line, set()), (scene, line)
            rejected += 1
    assert rejected > 0
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert metrics["preference"]["method"] == "dpo" and metrics["preference"]["steps"] == 2
