"""Launchers: the recipe's `launch:` section, the commands it becomes, and real multi-process training on
this CPU: two data-parallel processes (accelerate, gloo) follow the one-process loss, and DeepSpeed ZeRO-2
runs on DeepSpeed's CPU accelerator.

    python -m pytest -q tests/test_launch.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.cli import _launch_overrides
from engine.launch import LAUNCHERS_DIR, LaunchConfig, deepspeed_config, is_in_process, worker_command

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shakespeare_falstaff.yaml"
# the one-process reference and the launched runs see the same 4-sample batches in the same order
SAME_BATCHES = ("--set", "train.max_steps=4", "--set", "train.group_by_length=false", "--set", "train.logging_steps=1")
# stated tolerance: per-step training loss of N processes vs one, absolute, on losses near ln(vocab) ~ 10.8
LOSS_TOLERANCE = 0.01


def test_launch_config_validation():
    assert is_in_process(LaunchConfig())
    assert LaunchConfig(launcher="accelerate", num_processes=2).num_processes == 2
    with pytest.raises(ValidationError, match=r"unknown launcher 'acelerate' — did you mean 'accelerate'\?"):
        LaunchConfig(launcher="acelerate")
    with pytest.raises(ValidationError, match=r"unknown launcher 'zzz'\. Available: none, torchrun"):
        LaunchConfig(launcher="zzz")
    with pytest.raises(ValidationError, match=r"launcher file '/nonexistent/ds\.json' not found; name an accelerate YAML or DeepSpeed JSON file"):
        LaunchConfig(launcher="/nonexistent/ds.json")
    with pytest.raises(ValidationError, match="launcher is 'none'.*set launcher to accelerate"):
        LaunchConfig(num_processes=2)
    with pytest.raises(ValidationError, match="num_processes"):
        LaunchConfig(launcher="torchrun", num_processes=0)
    assert LaunchConfig(launcher=str(LAUNCHERS_DIR / "deepspeed_zero2.json")).launcher.endswith("deepspeed_zero2.json")


def test_worker_commands_name_their_launcher_files(tmp_path):
    spec = tmp_path / "spec.json"
    tail = ["-m", "engine.train_worker", str(spec)]
    accelerate = worker_command(LaunchConfig(launcher="accelerate", num_processes=2, main_process_port=29500), spec, python="py")
    assert accelerate == [
        "py", "-m", "accelerate.commands.launch", "--config_file", str(LAUNCHERS_DIR / "accelerate_multi_cpu.yaml"),
        "--num_processes", "2", "--main_process_port", "29500", *tail,
    ]  # fmt: skip
    torchrun = worker_command(LaunchConfig(launcher="torchrun", num_processes=3), spec, python="py")
    assert torchrun[:4] == ["py", "-m", "torch.distributed.run", "--nproc-per-node=3"] and torchrun[-3:] == tail
    assert torchrun[5].startswith("--master-port=") and int(torchrun[5].split("=")[1]) > 0  # a free port by default
    zero3 = LaunchConfig(launcher="deepspeed_zero3_offload", num_processes=4)
    assert deepspeed_config(zero3) == LAUNCHERS_DIR / "deepspeed_zero3_offload.json"
    assert worker_command(zero3, spec, python="py")[2] == "torch.distributed.run"  # DeepSpeed JSON -> torchrun + Trainer(deepspeed=)
    slurm = LaunchConfig(command="srun torchrun --nnodes=2 --rdzv-endpoint='node1:29500'")
    assert worker_command(slurm, spec) == ["srun", "torchrun", "--nnodes=2", "--rdzv-endpoint=node1:29500", *tail]
    assert not is_in_process(slurm)
    for name in ("accelerate_multi_cpu.yaml", "accelerate_multi_gpu.yaml", "accelerate_single.yaml", "deepspeed_zero2.json", "deepspeed_zero3_offload.json"):
        assert (LAUNCHERS_DIR / name).is_file(), name


def test_run_flags_become_validated_overrides():
    assert _launch_overrides("accelerate", 2, None) == ('launch.launcher="accelerate"', "launch.num_processes=2")
    assert _launch_overrides(None, None, 'srun torchrun --x="a b"') == ('launch.command="srun torchrun --x=\\"a b\\""',)
    from engine.recipe import load_recipe

    recipe = load_recipe(RECIPE, _launch_overrides(None, None, 'srun torchrun --x="a b": c'))
    assert recipe.launch.command == 'srun torchrun --x="a b": c'


def run_smoke(run_dir: Path, *args: str) -> dict:
    env = {**os.environ, "RECIPE_DATA_PATH": os.environ.get("RECIPE_DATA_PATH", str(ROOT.parent / "shared" / "data"))}
    command = [sys.executable, "-m", "engine.cli", "run", str(RECIPE), "--smoke", "--until", "train", "--run-dir", str(run_dir), *SAME_BATCHES, *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    return {"losses": [entry["loss"] for entry in history if "loss" in entry], "metrics": metrics, "output": done.stdout}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return run_smoke(tmp_path_factory.mktemp("one") / "run")


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss(tmp_path, one_process):
    two = run_smoke(tmp_path / "run", "--launcher", "accelerate", "--num-processes", "2")
    assert two["metrics"]["processes"] == 2 and one_process["metrics"]["processes"] == 1
    assert "launching: " in two["output"] and "accelerate_multi_cpu.yaml" in two["output"]
    assert len(two["losses"]) == len(one_process["losses"]) == 4
    assert two["losses"] == pytest.approx(one_process["losses"], abs=LOSS_TOLERANCE)
    assert two["metrics"]["samples_seen"] == one_process["metrics"]["samples_seen"] == 16  # the same global batch


@pytest.mark.slow
def test_deepspeed_zero2_runs_on_the_cpu_accelerator(tmp_path, one_process):
    zero2 = run_smoke(tmp_path / "run", "--launcher", "deepspeed_zero2", "--num-processes", "2")
    assert zero2["metrics"]["deepspeed"] == "deepspeed_zero2.json" and zero2["metrics"]["processes"] == 2
    assert zero2["losses"] == pytest.approx(one_process["losses"], abs=LOSS_TOLERANCE)


def test_odd_batch_over_processes_is_refused(tmp_path):
    env = {**os.environ, "RECIPE_DATA_PATH": os.environ.get("RECIPE_DATA_PATH", str(ROOT.parent / "shared" / "data"))}
    command = [
        sys.executable, "-m", "engine.cli", "run", str(RECIPE), "--smoke", "--until", "train", "--run-dir", str(tmp_path / "run"),
        "--set", "train.batch_size=3", "--launcher", "torchrun", "--num-processes", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 5, done.stdout[-2000:] + done.stderr[-2000:]
    assert "train.batch_size=3 does not divide among 2 processes; use a multiple of 2" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout.split("launching:")[0]


def test_deepspeed_that_cannot_start_names_the_launcher_that_works(monkeypatch):
    import builtins

    from engine.errors import StageError
    from engine.stages.train import check_launcher_possible

    check_launcher_possible(LaunchConfig(launcher="accelerate", num_processes=2))  # not DeepSpeed: nothing to check
    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name.startswith("deepspeed"):
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(StageError, match=r"DeepSpeed cannot run on this machine \(ImportError.*use launch.launcher: accelerate"):
        check_launcher_possible(LaunchConfig(launcher="deepspeed_zero2", num_processes=2))
