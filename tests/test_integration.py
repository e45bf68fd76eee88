"""Whole recipes through the real `recipe` command on a tiny random model (--smoke), and once on the real
embedded model: cache hits, invalidation, a spy proving a hit runs nothing, and SIGKILL in the middle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from engine import cache, runner
from engine.cli import SMOKE_OVERRIDES
from engine.recipe import load_recipe
from engine.registry import STAGES, stage_kinds
from engine.stages.train import KEY_FILE

ROOT = Path(__file__).resolve().parents[1]
FALSTAFF = ROOT / "recipes" / "shakespeare_falstaff.yaml"
CARTMAN = ROOT / "recipes" / "southpark_cartman.yaml"
STAGE_NAMES = ["source", "clean", "dataset", "train", "export", "eval"]


def recipe_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(run_dir: Path) -> dict[str, dict | None]:
    return {name: cache.read_record(run_dir / name) for name in STAGE_NAMES}


@pytest.fixture(scope="module")
def falstaff_smoke(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("falstaff") / "run"
    done = recipe_cli("run", str(FALSTAFF), "--smoke", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 stages ran, 0 cached" in done.stdout
    (run_dir.parent / "first_run.out").write_text(done.stdout)
    return run_dir


def test_falstaff_runs_end_to_end(falstaff_smoke):
    run_dir = falstaff_smoke
    assert all(records(run_dir).values())
    lock = json.loads((run_dir / cache.LOCK).read_text())
    assert list(lock["stages"]) == STAGE_NAMES
    for entry in lock["stages"].values():
        assert {"key", "inputs", "outputs", "wall_time_s", "libraries"} <= set(entry)
    assert (run_dir / "export" / "model" / "config.json").is_file()
    # the recipe's SFT then DPO: the preference phase ran (its smoke size) and was recorded
    preference = json.loads((run_dir / "train" / "metrics.json").read_text())["preference"]
    assert preference["method"] == "dpo" and preference["steps"] == 2 and preference["rejected_length"] == "matched"
    results = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert {"base", "tuned", "items", "chance"} <= set(results)
    # the closing summary shows base, tuned and their paired difference for every metric
    printed = (run_dir.parent / "first_run.out").read_text()
    assert "tuned-base paired per item" in printed
    acc_norm = next(line for line in printed.splitlines() if " acc_norm " in line)
    assert acc_norm.count("±") == 3 and acc_norm.split("│")[-1].strip()[0] in "+-", acc_norm  # base, tuned, change


def test_noop_rerun_runs_nothing_quickly(falstaff_smoke):
    started = time.perf_counter()
    done = recipe_cli("run", str(FALSTAFF), "--smoke", "--run-dir", str(falstaff_smoke))
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "0 stages ran, 6 cached" in done.stdout
    assert seconds < 5.0, f"no-op rerun took {seconds:.2f}s"


def test_changing_a_train_key_reruns_train_export_eval_only(falstaff_smoke, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(falstaff_smoke, run_dir)  # leave the shared run as the other tests expect it
    done = recipe_cli("plan", str(FALSTAFF), "--smoke", "--run-dir", str(run_dir), "--set", "train.learning_rate=0.001")
    lines = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["cached"], ["run"], ["waits"])]
    assert [(words[0], words[1]) for words in lines] == [
        ("cached", "source"), ("cached", "clean"), ("cached", "dataset"), ("run", "train"), ("waits", "export"), ("waits", "eval")
    ], done.stdout
    assert "train.learning_rate: 0.0002 → 0.001" in done.stdout
    done = recipe_cli("run", str(FALSTAFF), "--smoke", "--run-dir", str(run_dir), "--set", "train.learning_rate=0.001")
    assert done.returncode == 0, done.stderr
    assert "3 stages ran, 3 cached" in done.stdout


def test_cache_hit_calls_no_stage_function(falstaff_smoke, monkeypatch):
    # the same recipe and overrides as the CLI run above, in-process, with every stage function replaced
    recipe = load_recipe(FALSTAFF, SMOKE_OVERRIDES)
    calls: list[str] = []
    for stage in stage_kinds():
        monkeypatch.setattr(STAGES[stage.name], "run", lambda ctx, name=stage.name: calls.append(name) or {})
    results = runner.run(recipe, falstaff_smoke, Console(quiet=True))
    assert [r.status for r in results] == ["cached"] * 6
    assert calls == []


def test_sigkill_mid_training_keeps_finished_stages_and_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", str(FALSTAFF), "--smoke", "--run-dir", str(run_dir), "--set", "train.max_steps=30", "--set", "train.save_steps=2"]
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            # the train key is the last file of a checkpoint: trainer_state.json alone can be a checkpoint still being
            # written, which the rerun rightly skips (and then starts from step 0)
            if list((run_dir / ".partial").glob(f"train-*/checkpoints/checkpoint-*/{KEY_FILE}")):
                break
            assert process.poll() is None, "the run ended before a checkpoint was written"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within the time limit")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    lock = json.loads((run_dir / cache.LOCK).read_text())  # still valid JSON
    assert list(lock["stages"]) == ["source", "clean", "dataset"]
    assert [name for name, record in records(run_dir).items() if record] == ["source", "clean", "dataset"]
    assert not (run_dir / "train").exists()
    done = recipe_cli(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from checkpoint-" in done.stdout
    assert "3 stages ran, 3 cached" in done.stdout
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert metrics["steps"] == 30


@pytest.mark.slow
def test_real_embedded_model_smoke(tmp_path):
    run_dir = tmp_path / "run"
    sets = ["dataset.max_train_samples=16", "dataset.max_heldout_samples=8", "train.max_steps=2", "train.batch_size=4", "train.preference.max_steps=2", "train.preference.batch_size=4", "eval.max_items=8", "eval.sample_replies=1", "eval.max_new_tokens=16", "eval.interviews.max_questions=2", "eval.interviews.multi_turn=1", "eval.interviews.max_new_tokens=16"]
    args = ["run", str(FALSTAFF), "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    done = recipe_cli(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["items"] == 8
    assert 0.0 <= summary["base"]["acc"] <= 1.0
    assert (run_dir / "export" / "model" / "model.safetensors").stat().st_size > 400e6
