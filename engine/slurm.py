"""`recipe launch --slurm`: write an sbatch script that trains a recipe on several nodes; run nothing.

    recipe launch --slurm --nodes 2 --gpus-per-node 4 recipes/southpark_cartman.yaml
    sbatch runs/southpark_cartman/launch.sbatch

The script is `launchers/slurm.sbatch.in` with its `@NAME@` placeholders filled in: read the template to see
what runs. It starts `recipe run RECIPE --launch-command "srun ... torchrun ..."` on the first node, so the
train stage's workers run under torchrun on every node (one srun task per node) while the other stages run
once. Values in the `#SBATCH` header are checked (they cannot be quoted there); everything the script body
passes to the shell is quoted with shlex.quote. A line whose placeholder has no value (`--partition` when
none is given) is left out.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from engine.errors import RecipeUserError

TEMPLATE = Path(__file__).resolve().parents[1] / "launchers" / "slurm.sbatch.in"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
# [days-]hours:minutes:seconds, [days-]hours[:minutes], minutes[:seconds]: the forms sbatch --time takes
_TIME = re.compile(r"^(\d+-\d+(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+$")


class LaunchError(RecipeUserError):
    """A launch option that cannot make a valid sbatch script (a usage error: exit code 2)."""

    exit_code = 2


@dataclass
class SlurmJob:
    """Everything the sbatch script needs; `render_sbatch` turns it into the script's text."""

    recipe_path: str  # as the user wrote it: relative paths are relative to project_dir
    recipe_name: str
    run_dir: Path  # absolute
    nodes: int
    gpus_per_node: int
    cpus_per_task: int | None = None  # default: 8 per GPU
    time: str = "24:00:00"
    partition: str | None = None
    overrides: tuple[str, ...] = ()
    smoke: bool = False
    project_dir: Path = field(default_factory=Path.cwd)
    script_name: str = "launch.sbatch"  # only shown in the script's comment (how to submit it)

    def check(self) -> None:
        """Raise LaunchError for a value sbatch would refuse or the header could not carry."""
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be 1 or more (got {self.nodes})")
        if self.gpus_per_node < 1:
            raise LaunchError(f"--gpus-per-node must be 1 or more (got {self.gpus_per_node})")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task must be 1 or more (got {self.cpus_per_task})")
        if not _TIME.match(self.time):
            raise LaunchError(f"--time {self.time!r} is not a SLURM time limit: write HH:MM:SS, e.g. 12:00:00, or D-HH:MM:SS")
        if self.partition is not None and not _PARTITION.match(self.partition):
            raise LaunchError(f"--partition {self.partition!r} is not a partition name (letters, digits, '_', '-', '.', ',' for several)")
        if any(ch.isspace() for ch in str(self.run_dir)):
            # the job's log goes to `#SBATCH --output=<run folder>/...`, where sbatch takes no quotes
            raise LaunchError(f"the run folder {str(self.run_dir)!r} contains whitespace, which an #SBATCH line cannot carry: choose another with --run-dir")


def _engine_command() -> tuple[Path, str]:
    """The bin folder of this Python environment and how the script should call the engine there."""
    bin_dir = Path(sys.executable).absolute().parent
    if (bin_dir / "recipe").exists():
        return bin_dir, "recipe"  # on PATH once the script activates the environment
    return bin_dir, f"{shlex.quote(str(Path(sys.executable).absolute()))} -m engine.cli"


def render_sbatch(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The sbatch script for `job`, from the template; header values checked, body values shell-quoted."""
    job.check()
    bin_dir, recipe_command = _engine_command()
    cpus = job.cpus_per_task if job.cpus_per_task is not None else 8 * job.gpus_per_node
    # one option a line: the run folder, --smoke, then each --set
    run_args = [shlex.join(["--run-dir", str(job.run_dir)])] + (["--smoke"] if job.smoke else [])
    run_args += [shlex.join(["--set", assignment]) for assignment in job.overrides]
    values: dict[str, str | None] = {
        # header: checked above, written as they are
        "JOB_NAME": "recipe-" + re.sub(r"[^A-Za-z0-9_.-]", "_", job.recipe_name),
        "NODES": str(job.nodes),
        "GPUS_PER_NODE": str(job.gpus_per_node),
        "CPUS_PER_TASK": str(cpus),
        "TIME": job.time,
        "PARTITION": job.partition,
        "LOG_FILE": str(job.run_dir / "slurm-%j.out"),
        "SCRIPT_NAME": shlex.quote(job.script_name),  # in a comment, ready to copy
        # body: shell words, quoted
        "PROJECT_DIR": shlex.quote(str(job.project_dir)),
        "BIN_DIR": shlex.quote(str(bin_dir)),
        "OMP_NUM_THREADS": str(max(1, cpus // job.gpus_per_node)),
        "RECIPE": recipe_command,
        "RECIPE_PATH": shlex.quote(job.recipe_path),
        "RUN_ARGS": " \\\n    ".join(run_args),
    }
    text = template.read_text(encoding="utf-8")
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise RuntimeError(f"{template}: unknown placeholders {unknown}")
    lines = []
    for line in text.splitlines(keepends=True):
        names = _PLACEHOLDER.findall(line)
        if any(values[name] is None for name in names):
            continue  # an optional line without a value (e.g. #SBATCH --partition)
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "".join(lines)


@click.command("launch")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--slurm", is_flag=True, help="Write an sbatch script for SLURM (the only launcher so far).")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes to train on (one torchrun per node).")
@click.option("--gpus-per-node", type=int, default=1, show_default=True, help="GPUs per node, one worker process each.")
@click.option("--partition", help="SLURM partition (default: the cluster's).")
@click.option("--time", "time_limit", default="24:00:00", show_default=True, help="Time limit, HH:MM:SS or D-HH:MM:SS.")
@click.option("--cpus-per-task", type=int, help="CPUs per node's task  [default: 8 per GPU]")
@click.option("--output", "output", type=click.Path(dir_okay=False), help="Where to write the script  [default: <run folder>/launch.sbatch]")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe key (YAML value), passed on to `recipe run`. Repeatable.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run folder (default: runs/<recipe name>); must be on a file system every node sees.")
@click.option("--smoke", is_flag=True, help="Pass --smoke on to `recipe run`: tiny random model, a few steps.")
def launch(recipe_path, slurm, nodes, gpus_per_node, partition, time_limit, cpus_per_task, output, overrides, run_dir, smoke) -> None:
    """Write a launch script for training RECIPE on a cluster; runs nothing.

    \b
    recipe launch --slurm --nodes 2 --gpus-per-node 4 recipes/southpark_cartman.yaml
    sbatch runs/southpark_cartman/launch.sbatch
    """
    from engine.cli import _load, _run_dir  # the same loading, overrides and run folder as `recipe run`

    if not slurm:
        raise LaunchError("choose a launcher: --slurm (writes an sbatch script) is the only one so far")
    recipe = _load(recipe_path, tuple(overrides), smoke)  # a recipe error is reported now, not on the cluster
    given = _run_dir(recipe, run_dir, smoke)
    folder = given.absolute()  # the script may run from anywhere: it names the run folder absolutely
    script = Path(output) if output else given / "launch.sbatch"
    job = SlurmJob(
        recipe_path=recipe_path,
        recipe_name=recipe.name,
        run_dir=folder,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        time=time_limit,
        partition=partition,
        overrides=tuple(overrides),
        smoke=smoke,
        script_name=str(script),
    )
    text = render_sbatch(job)
    folder.mkdir(parents=True, exist_ok=True)  # sbatch writes the job's log there from the first second
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text, encoding="utf-8")
    script.chmod(0o755)
    click.echo(f"wrote {script}: {recipe.name} on {nodes} node(s) x {gpus_per_node} GPU(s); the job's log goes to {folder}/slurm-<job id>.out")
    click.echo("submit it with:")
    click.echo(f"  sbatch {shlex.quote(str(script))}")
