"""Data-pipeline benchmark: source -> clean -> dataset of the Cartman recipe on the whole All-seasons.csv.

    RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/data_pipeline.py

Runs recipes/southpark_cartman.yaml with `--set dataset.max_train_samples=null`, so every Cartman line
becomes a sample and is templated and tokenized (about 9,800 samples), through the engine's own runner
(engine.recipe.load_recipe + engine.runner.run(..., until="dataset")) in a fresh temporary run folder.
Each stage's time is the wall_time_s of its record (<run_dir>/<stage>/.stage.json): the stage function
alone, as `recipe run` measures it. The whole call is timed too (it adds the cache keys: hashing the CSV
and the base model). Before timing, the base model is converted into the model cache if it is not there
yet (the first use takes ~50 s, excluded here: it happens once per machine). Prints a table and the total
against the 30 s goal, and writes bench/data_pipeline.json (the command, the machine, the figures).

Options: --recipe FILE, --set KEY=VALUE (more overrides), --repeats N (the best of N runs is reported,
each in a new run folder), --output FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 30.0
STAGES = ("source", "clean", "dataset")


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def one_run(recipe, console) -> dict:
    from engine.runner import run

    with tempfile.TemporaryDirectory(prefix="bench-data-pipeline-") as tmp:
        run_dir = Path(tmp) / "run"
        started = time.perf_counter()
        results = run(recipe, run_dir, console, until="dataset")
        whole = time.perf_counter() - started
        stages = {}
        for result in results:
            record = json.loads((run_dir / result.name / ".stage.json").read_text(encoding="utf-8"))
            stages[result.name] = {"status": result.status, "wall_time_s": record["wall_time_s"], "summary": result.summary}
    return {"stages": stages, "total_s": round(sum(s["wall_time_s"] for s in stages.values()), 2), "whole_call_s": round(whole, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "southpark_cartman.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "bench" / "data_pipeline.json"))
    args = parser.parse_args(argv)
    host = machine()  # before the work: the load average says how quiet the machine was

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("RECIPE_DATA_PATH") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["RECIPE_DATA_PATH"] = str(ROOT.parent / "shared" / "data")
    sys.path.insert(0, str(ROOT))
    from rich.console import Console
    from rich.table import Table

    from engine.errors import RecipeUserError
    from engine.models import resolve_base_model
    from engine.recipe import load_recipe

    console = Console()
    overrides = ["dataset.max_train_samples=null", *args.overrides]
    try:
        recipe = load_recipe(args.recipe, overrides)
        started = time.perf_counter()
        resolve_base_model(recipe.model, console)  # warm the converted-model cache (excluded from the figures)
        warm_s = time.perf_counter() - started
        runs = [one_run(recipe, Console(quiet=True)) for _ in range(max(1, args.repeats))]
    except RecipeUserError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    best = min(runs, key=lambda r: r["total_s"])

    table = Table(title=f"source -> clean -> dataset, {Path(args.recipe).name} (best of {len(runs)})")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("what it made")
    for name in STAGES:
        stage = best["stages"][name]
        summary = stage["summary"]
        made = {
            "source": lambda s: f"{s['turns']:,} turns, {s['scenes']} scenes, {s['character_turns']:,} by the character",
            "clean": lambda s: f"{s['turns_out']:,} of {s['turns_in']:,} turns kept",
            "dataset": lambda s: f"{s['train']:,} train + {s['heldout']:,} held-out samples, tokens p50 {s['tokens_p50']}, p95 {s['tokens_p95']}",
        }[name](summary)
        table.add_row(name, f"{stage['wall_time_s']:.2f}", made)
    table.add_row("total", f"{best['total_s']:.2f}", f"goal {GOAL_S:.0f} s: {'met' if best['total_s'] <= GOAL_S else 'MISSED'}")
    console.print(table)
    console.print(f"whole runner call (with cache keys: hashing the CSV and the model): {best['whole_call_s']:.2f} s; "
                  f"model cache warm-up before timing: {warm_s:.1f} s")

    command = "RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/data_pipeline.py" + "".join(
        f" {shlex.quote(arg)}" for arg in (argv if argv is not None else sys.argv[1:])
    )
    report = {
        "command": command,
        "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)) if Path(args.recipe).resolve().is_relative_to(ROOT) else args.recipe,
        "overrides": overrides,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": host,
        "goal_s": GOAL_S,
        "met": best["total_s"] <= GOAL_S,
        "best": best,
        "runs": [{"total_s": r["total_s"], "whole_call_s": r["whole_call_s"], **{n: r["stages"][n]["wall_time_s"] for n in STAGES}} for r in runs],
        "warm_up_s": round(warm_s, 1),
    }
    Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
