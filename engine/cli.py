"""The `recipe` command. The only place that turns typed errors into messages and exit codes.

Heavy libraries (torch, transformers, datasets, lm-eval) are imported by stage functions only, so `recipe
--help`, `recipe validate`, `recipe list` and `recipe schema` stay instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from engine.errors import RecipeError, RecipeUserError

STAGE_NAMES = ("source", "clean", "dataset", "train", "export", "eval")
SMOKE_OVERRIDES = (
    "model.random_init=true",
    "model.config_overrides={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2}",
    "dataset.max_train_samples=24",
    "dataset.max_heldout_samples=12",
    "train.max_steps=2",
    "train.batch_size=4",
    "train.save_steps=1",
    "train.logging_steps=1",
    "train.preference.max_steps=2",
    "train.preference.batch_size=4",
    "eval.max_items=8",
    "eval.sample_replies=1",
    "eval.max_new_tokens=8",
    "eval.interviews.max_questions=2",
    "eval.interviews.max_new_tokens=8",
)


def _offline_environment() -> None:
    # Everything resolves from local files: never let a library spend a minute retrying the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not _has_cuda_hint():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_cuda_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or Path("/dev/nvidia0").exists()


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _load(recipe_path: str, overrides: tuple[str, ...], smoke: bool = False):
    from engine.recipe import load_recipe

    all_overrides = (SMOKE_OVERRIDES if smoke else ()) + tuple(overrides)
    recipe = load_recipe(recipe_path, all_overrides)
    if smoke:
        from engine.models import base_is_local

        if not base_is_local(recipe.model):
            # a smoke run checks the recipe's pipeline, not its model: a 7B base that only a GPU machine has
            # downloaded is replaced by the embedded model's architecture (tiny and random either way)
            click.echo(f"smoke: base '{recipe.model.base}' is not on this machine; the tiny random model is built from the embedded model's config instead", err=True)
            recipe = load_recipe(recipe_path, all_overrides + ("model.base=embedded",))
    return recipe


def _launch_overrides(launcher: str | None, num_processes: int | None, command: str | None) -> tuple[str, ...]:
    """The run command's launch flags as --set overrides, so they are validated like recipe keys."""
    found = []
    if launcher:
        found.append(f"launch.launcher={json.dumps(launcher)}")  # a JSON string is a YAML double-quoted scalar
    if num_processes is not None:
        found.append(f"launch.num_processes={num_processes}")
    if command:
        found.append(f"launch.command={json.dumps(command)}")
    return tuple(found)


def _run_dir(recipe, run_dir: str | None, smoke: bool = False) -> Path:
    if run_dir:
        return Path(run_dir)
    return Path("runs") / (recipe.name + ("-smoke" if smoke else ""))


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe key (YAML value), e.g. --set train.max_steps=10. Repeatable.")
run_dir_option = click.option("--run-dir", type=click.Path(file_okay=False), help="Run folder (default: runs/<recipe name>).")
smoke_option = click.option("--smoke", is_flag=True, help="Tiny random model (from the base's config, or the embedded model's when the base is not on this machine), a few samples and steps: checks that a recipe runs end to end in about a minute.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recipe-engine")
def cli() -> None:
    """Recipe: turn a character's dialogue into a fine-tuned, evaluated persona model.

    One YAML file describes one character; `recipe run FILE` reads the scripts, cleans them, builds samples,
    fine-tunes, exports and evaluates, caching every stage by a content hash.
    """


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path())
@set_option
def validate(recipes: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check recipes and report every problem at once (no model is loaded)."""
    failed: list[RecipeError] = []
    for path in recipes:
        try:
            recipe = _load(path, overrides)
            click.echo(f"ok: {path} ({recipe.name}: {recipe.source.kind} → {recipe.character.name})")
        except RecipeError as exc:
            failed.append(exc)
    if failed:
        raise RecipeError([problem for exc in failed for problem in exc.problems])


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@set_option
@run_dir_option
@smoke_option
@click.option("--force", multiple=True, type=click.Choice(STAGE_NAMES), help="Treat this stage as stale. Repeatable.")
@click.option("--until", type=click.Choice(STAGE_NAMES), help="Stop after this stage.")
def plan(recipe_path: str, overrides, run_dir, smoke, force, until) -> None:
    """Show, per stage, whether it is cached or will run, and why."""
    from engine.runner import plan as make_plan

    recipe = _load(recipe_path, overrides, smoke)
    folder = _run_dir(recipe, run_dir, smoke)
    console = _console()
    console.print(f"[bold]{recipe.name}[/bold] — {folder}", soft_wrap=True)
    for item in make_plan(recipe, folder, force=tuple(force), until=until):
        colour = {"cached": "green", "run": "yellow", "waits": "cyan"}[item.status]
        # one line per stage, never wrapped: scripts (and the tests) read it
        console.print(f"  [{colour}]{item.status:<6}[/{colour}] {item.name:<8} {'; '.join(item.reasons)}", soft_wrap=True)


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@set_option
@run_dir_option
@smoke_option
@click.option("--force", multiple=True, type=click.Choice(STAGE_NAMES), help="Rerun this stage even if cached. Repeatable.")
@click.option("--until", type=click.Choice(STAGE_NAMES), help="Stop after this stage.")
@click.option("--launcher", help="How training processes start: accelerate, torchrun, deepspeed_zero2, deepspeed_zero3_offload or a file in launchers/ (= --set launch.launcher=...).")
@click.option("--num-processes", type=int, help="Training processes per node (= --set launch.num_processes=...).")
@click.option("--launch-command", help="A whole process starter, e.g. 'srun torchrun --nnodes 2 ...' (the SLURM script passes it).")
def run(recipe_path: str, overrides, run_dir, smoke, force, until, launcher, num_processes, launch_command) -> None:
    """Run the recipe's stages; finished stages are reused from the cache."""
    from engine.runner import run as run_stages
    from engine.summary import print_summary

    started = time.perf_counter()
    recipe = _load(recipe_path, overrides + _launch_overrides(launcher, num_processes, launch_command), smoke)
    folder = _run_dir(recipe, run_dir, smoke)
    console = _console()
    results = run_stages(recipe, folder, console, force=tuple(force), until=until)
    print_summary(console, recipe, folder, results, time.perf_counter() - started)


@cli.command(name="list")
@click.option("--recipes-dir", default="recipes", show_default=True, type=click.Path(file_okay=False))
def list_things(recipes_dir: str) -> None:
    """List recipes, stage kinds, source kinds and templates."""
    from engine.registry import SOURCES, stage_kinds
    from engine.templates import available_templates

    if Path(recipes_dir).is_dir():
        click.echo("recipes:")
        for path in sorted(Path(recipes_dir).glob("*.yaml")):
            click.echo(f"  {path}")
    else:
        click.echo(f"recipes: none (no folder '{recipes_dir}' here: run from the project folder or pass --recipes-dir)")
    click.echo("stages (in order):")
    for stage in stage_kinds():
        click.echo(f"  {stage.name:<9} {stage.doc}")
    click.echo("source kinds:")
    for name, kind in SOURCES.items():
        click.echo(f"  {name:<15} {kind.doc}")
    click.echo("templates:")
    for name in available_templates():
        click.echo(f"  {name}")


@cli.command()
@click.argument("name")
@click.option("--source", "source_kind", required=True, help="Source kind of the character's data (see `recipe list`).")
@click.option("--recipes-dir", default="recipes", show_default=True, type=click.Path(file_okay=False))
def new(name: str, source_kind: str, recipes_dir: str) -> None:
    """Write recipes/NAME.yaml: a commented recipe for a new character that validates as written."""
    from engine.scaffold import write_new_recipe

    path = write_new_recipe(name, source_kind, Path(recipes_dir))
    click.echo(f"wrote {path}: fill in the data and the character, then `recipe validate {path}` and `recipe run {path} --smoke`")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of a recipe (for editors: yaml-language-server)."""
    from engine.recipe import build_recipe_model

    click.echo(json.dumps(build_recipe_model().model_json_schema(), indent=2))


@cli.command()
def reference() -> None:
    """Print the recipe reference (every key: type, default, meaning) as Markdown."""
    from engine.reference import render_reference

    click.echo(render_reference(), nl=False)


from engine.slurm import launch as _launch_command  # noqa: E402  (light: click and engine.errors only)

cli.add_command(_launch_command)
from engine.serve.cli import chat as _chat_command, serve as _serve_command  # noqa: E402  (light: click only)

cli.add_command(_serve_command)
cli.add_command(_chat_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the click group and map typed errors to exit codes, without tracebacks."""
    _offline_environment()
    try:
        cli.main(args=argv, prog_name="recipe", standalone_mode=False)
    except RecipeError as exc:
        for problem in exc.problems:
            click.secho(str(problem), fg="red", err=True)
        count = len(exc.problems)
        click.secho(f"{count} problem{'s' if count != 1 else ''} found.", fg="red", err=True)
        return exc.exit_code
    except RecipeUserError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.secho("interrupted", fg="yellow", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.secho("interrupted: finished stages are kept; `recipe run` again continues.", fg="yellow", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
