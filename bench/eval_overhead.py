"""Eval-stage overhead: the engine's eval stage vs plain `lm_eval` on the same model and the same task folders.

    RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/eval_overhead.py

Goal (issue 5): the eval stage costs no more than the same tasks in plain lm_eval, ratio <= 1.05.

One invocation runs, one after the other, each in its own process:

  setup    `recipe run recipes/shakespeare_falstaff.yaml --run-dir <tmp> --until eval --set train.max_steps=1
           --set train.save_steps=1000 --set eval.max_items=N --set eval.sample_replies=0` plus, where the recipe
           schema has them, `--set eval.interviews.enabled=false --set eval.judge.enabled=false --set
           eval.check_adapter=false` (stage work that is not lm-eval scoring of the tasks): a short run that leaves
           an exported model and the eval stage's task folders (<run>/eval/tasks/<task>/<task>.yaml + its .jsonl),
           every one of which is measured.
  then R repeats (default 3), each of (engine and inproc alternate which goes first; the CLI runs in the first):
  engine   the same command with `--force eval`: only the eval stage runs again (the script checks that no
           other stage record changed). By default the base model's scores are cached (the setup run put them
           in the cache), so the stage scores the tuned model only: the like-for-like part. Its figure is
           results.json["timings"]["tuned_scoring_s"]: the stage's clock around HFLM load + TaskManager +
           simple_evaluate of all tasks at once (imports excluded). Where results.json has no "timings" (an
           older stage), the eval stage's wall_time_s (<run>/eval/.stage.json: the whole stage, items, plot and
           card too) stands in, an upper bound, and the report says so. With --base fresh every engine repeat
           gets an empty eval-base cache (a temporary RECIPE_CACHE whose models/ and downloads/ link to the real
           ones), so the base model is scored every time, and plain lm-eval scores the base model too.
  plain    for every task folder, the command its YAML's header documents, as a user runs it:
           `cd <run>/eval/tasks/<task> && lm_eval --include_path . --tasks <task> --model hf --model_args
           pretrained=<run>/export/model --device cpu --batch_size <the stage's batch size>`, timed as a whole
           process (python start-up, imports, lm-eval's indexing of its built-in tasks, model load, scoring),
           summed over the tasks (one process and one model load per task, as documented).
  inproc   plain lm-eval in a Python process of its own (this file with --worker): import lm_eval (not timed),
           then time HFLM(pretrained=<model>, device, batch_size) once + for each task folder: chdir there,
           TaskManager(include_path=<folder>, include_defaults=False) + simple_evaluate(model=lm, tasks=[task],
           log_samples=False). One model load for all tasks, as in the stage; one simple_evaluate per task, as
           the relative data_files of the task folders require.

The headline ratio is engine tuned_scoring_s / inproc seconds, each the best of R: both time the same unit of
work (model load + scoring of every task, imports excluded), so the ratio shows what the stage adds around
lm-eval (its log_samples=True and per-item bookkeeping, its batching of all tasks in one simple_evaluate). The
whole-process ratio (engine `recipe run --force eval` process / plain lm_eval processes) is reported too, but it
compares different work: the engine process also computes every stage's cache key, builds the items and writes
the plot and card; the lm_eval CLI indexes its built-in task YAMLs and loads the model once per task.

CPU seconds (user + sys, from the kernel's accounting of each finished child process; the worker's own
time.process_time around load + scoring) are reported next to the wall times. On the shared 2-core machine they
tracked the wall time (OpenMP threads spin while they wait for a core), so they do not remove the noise of
other work either: take the figures on a quiet machine.

Every repeat checks that the engine's tuned scores (results.json) equal plain lm-eval's, per task and metric
(acc, acc_norm, acc_mutual_info; word/byte perplexity, bits per byte): the in-process worker to a relative
1e-5 (float noise from other batches), the CLI to the 4 decimals its table prints. A mismatch is printed in red
and recorded under "agreement" (exit code 2).

Writes bench/eval_overhead.json (command, machine, library versions, the exact commands, every repeat).

Options: --items N (eval.max_items, per task; default 4), --repeats R (default 3; the best of R is reported),
--cli-repeats C (how many of the repeats also run the lm_eval CLI; default 1), --quick (2 items, 1 repeat: a
smoke), --stage-like (a diagnostic: also time plain lm-eval called the stage's way: one include folder of YAML
copies naming the data files absolutely, one simple_evaluate for all tasks, log_samples=True; tells the cost of
the stage's process from that of its way of calling lm-eval), --base cached|fresh, --batch-size B (default: the
recipe's eval.batch_size, auto = 8 on a CPU as the stage resolves it), --recipe FILE, --set KEY=VALUE (more overrides,
passed to every engine run), --run-dir DIR (use and keep this run folder instead of a temporary one: a rerun
with the same settings skips the setup's training), --output FILE, --keep (keep the temporary folder and logs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.05
CLI_TOLERANCE = 5.1e-5  # the lm_eval table prints 4 decimals
EXACT_TOLERANCE = 1e-9
RELATIVE_TOLERANCE = 1e-5  # the stage scores all tasks in one simple_evaluate (other batches): float noise only
# Keys turned off in every engine run when the recipe schema has them: work of the stage that is not
# lm-eval scoring of the tasks (interviews generate text; the adapter check scores base + adapter once more).
OPTIONAL_OFF = ("eval.interviews.enabled=false", "eval.judge.enabled=false", "eval.check_adapter=false")


# ---------------------------------------------------------------- the machine


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
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "lm_eval", "transformers", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- the plain in-process worker


def plain_worker(cfg: dict) -> int:
    """Runs in its own process: plain lm-eval on one model and every task folder; writes cfg['result']."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import_s = time.perf_counter() - started
    cpu_started = time.process_time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = cfg["batch_size"]
    started = time.perf_counter()
    lm = HFLM(pretrained=cfg["model"], device=device, batch_size=batch_size)
    load_s = time.perf_counter() - started
    tasks = {}

    def metrics_of(output: dict, task: str) -> dict:
        result = output["results"][task]
        metrics = {k.split(",")[0]: float(v) for k, v in result.items() if k.endswith(",none") and isinstance(v, (int, float))}
        return {"metrics": metrics, "n": int(output["n-samples"][task]["effective"])}

    if cfg.get("mode") == "stage_like":
        # diagnostic: lm-eval called the way the stage calls it: copies of the YAMLs naming the data files
        # absolutely in one include folder, one TaskManager, one simple_evaluate for all tasks, log_samples=True
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-eval-stage-like-") as include:
            for entry in cfg["tasks"]:
                folder = Path(entry["folder"])
                text = Path(entry["yaml"]).read_text(encoding="utf-8")
                for data in folder.glob("*.jsonl"):
                    text = text.replace(json.dumps(data.name), json.dumps(str(data.resolve())))
                (Path(include) / Path(entry["yaml"]).name).write_text(text, encoding="utf-8")
            started = time.perf_counter()
            manager = TaskManager(include_path=include, include_defaults=False)
            output = simple_evaluate(model=lm, tasks=[e["task"] for e in cfg["tasks"]], task_manager=manager, log_samples=True)
            seconds = time.perf_counter() - started
        for i, entry in enumerate(cfg["tasks"]):
            tasks[entry["task"]] = {"seconds": round(seconds, 3) if i == 0 else 0.0, **metrics_of(output, entry["task"])}
    else:
        for entry in cfg["tasks"]:
            os.chdir(entry["folder"])  # data_files in the YAML is relative to the working directory
            started = time.perf_counter()
            manager = TaskManager(include_path=entry["folder"], include_defaults=False)
            output = simple_evaluate(model=lm, tasks=[entry["task"]], task_manager=manager, log_samples=False)
            tasks[entry["task"]] = {"seconds": round(time.perf_counter() - started, 3), **metrics_of(output, entry["task"])}
    scoring_s = load_s + sum(t["seconds"] for t in tasks.values())
    scoring_cpu_s = time.process_time() - cpu_started
    result = {
        "scoring_cpu_s": round(scoring_cpu_s, 2),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "import_s": round(import_s, 3),
        "load_s": round(load_s, 3),
        "scoring_s": round(scoring_s, 3),
        "tasks": tasks,
    }
    Path(cfg["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------- running things


CPU = {}  # log path -> CPU seconds (user + sys) of that process and its children


def run_logged(cmd: list[str], log: Path, env: dict, cwd: Path) -> tuple[int, float]:
    """Runs cmd to completion; returns (exit code, wall seconds) and records its CPU seconds in CPU[log]."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[str(log)] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)
    return code, wall


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def task_folders(run_dir: Path) -> list[dict]:
    """Every lm-eval task folder the eval stage wrote: <run>/eval/tasks/<task>/<task>.yaml."""
    found = []
    for folder in sorted(p for p in (run_dir / "eval" / "tasks").iterdir() if p.is_dir()):
        yaml_file = folder / f"{folder.name}.yaml"
        if not yaml_file.is_file():
            yamls = sorted(folder.glob("*.yaml"))
            if len(yamls) != 1:
                raise RuntimeError(f"{folder}: expected {folder.name}.yaml (or exactly one YAML file)")
            yaml_file = yamls[0]
        task = None
        for line in yaml_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                task = line.split(":", 1)[1].strip().strip("'\"")
                break
        found.append({"folder": str(folder.resolve()), "task": task or yaml_file.stem, "yaml": str(yaml_file.resolve())})
    if not found:
        raise RuntimeError(f"no task folder under {run_dir / 'eval' / 'tasks'}")
    return found


def documented_command(yaml_file: Path) -> str | None:
    """The `cd <this folder> && lm_eval ...` command in the YAML's header comment, continuation lines joined."""
    lines = []
    for line in yaml_file.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if lines or re.match(r"^(cd \S.*&& *)?lm_eval --", text):
            lines.append(text)
            if not text.endswith("\\"):
                break
    return " ".join(part.rstrip("\\").strip() for part in lines) or None


def plain_cli_command(documented: str | None, task: str, model: str, batch_size, lm_eval_bin: str) -> list[str]:
    """The documented command with the model folder and the stage's batch size filled in."""
    fallback = ["lm_eval", "--include_path", ".", "--tasks", task, "--model", "hf", "--model_args", "pretrained=<model folder>",
                "--device", "cpu", "--batch_size", "8"]  # fmt: skip
    words = fallback
    if documented:
        text = documented.split("&&", 1)[1] if "&&" in documented else documented
        try:
            words = shlex.split(text.replace("<model folder>", "MODEL_FOLDER"))
        except ValueError:
            words = fallback
        if not words or words[0] != "lm_eval":
            words = fallback
    out = []
    skip = False
    for i, word in enumerate(words):
        if skip:
            skip = False
            continue
        if word == "--batch_size":
            out += ["--batch_size", str(batch_size)]
            skip = True
            continue
        out.append(word.replace("MODEL_FOLDER", model).replace("<model folder>", model))
    if "--batch_size" not in out:
        out += ["--batch_size", str(batch_size)]
    out[0] = lm_eval_bin
    return out


def parse_table(stdout: str) -> dict[str, dict[str, float]]:
    """acc / acc_norm / ... per task from the markdown table lm_eval prints (4 decimals)."""
    scores: dict[str, dict[str, float]] = {}
    task = None
    for line in stdout.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] in ("Tasks", "Groups") or set(cells[0]) <= {"-", ":"} and cells[0]:
            continue
        if cells[0]:
            task = cells[0]
        try:
            value = float(cells[6])
        except ValueError:
            continue
        if task:
            scores.setdefault(task, {})[cells[4]] = value
    return scores


def engine_task_scores(results: dict, task: str, which: str = "tuned") -> dict | None:
    """The engine's `which` (tuned / base) scores of one task in results.json, whatever the layout grows into."""
    def numeric(d: dict) -> dict:
        return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}

    if results.get("task") == task and isinstance(results.get(which), dict):  # the one-task layout
        return numeric(results[which]) or None
    for outer, inner in (("tasks", task), (which, task)):  # tasks.<task>.<which> or <which>.<task>
        block = results.get(outer)
        if isinstance(block, dict) and isinstance(block.get(inner), dict):
            candidate = block[inner].get(which) if outer == "tasks" else block[inner]
            if isinstance(candidate, dict) and numeric(candidate):
                return numeric(candidate)
    # last resort: any dict of numbers whose path names both the task and `which`
    stack = [((), results)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            if task in path and path and path[-1] == which and numeric(node):
                return numeric(node)
            stack += [((*path, k), v) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [((*path, str(i)), v) for i, v in enumerate(node)]
    return None


def close(a: float, b: float, tolerance: float) -> bool:
    if a != a or b != b:  # NaN
        return a != a and b != b
    return abs(a - b) <= max(tolerance, RELATIVE_TOLERANCE * max(abs(a), abs(b)))


def compare(engine: dict | None, plain: dict | None, tolerance: float) -> dict:
    if engine is None or plain is None:
        return {"same": False, "why": "engine scores not found in results.json" if engine is None else "plain scores not found"}
    keys = [k for k in ("acc", "acc_norm") if k in engine or k in plain]
    keys += sorted(k for k in set(engine) & set(plain) if k not in keys and not k.endswith("_stderr"))
    diffs = {}
    for key in keys:
        if key not in engine or key not in plain:
            diffs[key] = {"engine": engine.get(key), "plain": plain.get(key)}
        elif not close(engine[key], plain[key], tolerance):
            diffs[key] = {"engine": engine[key], "plain": plain[key]}
    return {"same": not diffs, "compared": keys, "differences": diffs}


def base_was_cached(results: dict) -> bool | None:
    if "base_cached" in results:
        return results["base_cached"]
    return (results.get("base") or {}).get("cached")


def stage_record(run_dir: Path, stage: str) -> bytes | None:
    path = run_dir / stage / ".stage.json"
    return path.read_bytes() if path.is_file() else None


def fresh_cache(tmp: Path, index: int) -> Path:
    """A RECIPE_CACHE with no eval-base/ (the base model is scored again) and the real models/ and downloads/."""
    real = Path(os.environ.get("RECIPE_CACHE", Path.home() / ".cache" / "recipe"))
    cache = tmp / f"cache-{index}"
    cache.mkdir()
    for name in ("models", "downloads"):
        if (real / name).exists():
            (cache / name).symlink_to(real / name)
    return cache


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/shakespeare_falstaff.yaml")
    parser.add_argument("--items", type=int, default=None, help="eval.max_items, per task (default 4; 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats; the best is reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="2 items per task, 1 repeat: a smoke")
    parser.add_argument("--stage-like", action="store_true",
                        help="diagnostic: also time lm-eval called the stage's way (one simple_evaluate for all tasks, absolute data files, log_samples=True)")  # fmt: skip
    parser.add_argument("--cli-repeats", type=int, default=1, help="repeats that also run the plain lm_eval CLI (default 1: the first)")
    parser.add_argument("--base", choices=("cached", "fresh"), default="cached",
                        help="cached: the measured eval runs reuse the base scores (tuned scoring only); fresh: score the base every time")  # fmt: skip
    parser.add_argument("--batch-size", default=None, help="eval.batch_size (default: the recipe's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", default=None, help="run folder to use and keep (default: a temporary one)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "eval_overhead.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and the logs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return plain_worker(json.loads(args.worker))

    items = args.items or (2 if args.quick else 4)
    repeats = max(1, args.repeats or (1 if args.quick else 3))
    host = machine()  # before the work: the load average says how quiet the machine was
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not env.get("RECIPE_DATA_PATH") and (ROOT.parent / "shared" / "data").is_dir():
        env["RECIPE_DATA_PATH"] = str(ROOT.parent / "shared" / "data")
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "RECIPE_DATA_PATH") if k in env})

    sys.path.insert(0, str(ROOT))
    from rich.console import Console
    from rich.table import Table

    from engine.errors import RecipeUserError
    from engine.recipe import load_recipe

    console = Console()
    recipe_path = args.recipe
    recipe_file = str(ROOT / recipe_path) if not Path(recipe_path).is_absolute() else recipe_path
    sets = ["train.max_steps=1", "train.save_steps=1000", f"eval.max_items={items}", "eval.sample_replies=0"]
    for item in OPTIONAL_OFF:  # only where the recipe schema has the key (the stage grows)
        try:
            load_recipe(recipe_file, [*sets, item])
            sets.append(item)
        except RecipeUserError:
            pass
    if args.batch_size is not None:
        sets.append(f"eval.batch_size={args.batch_size}")
    sets += args.overrides
    try:
        recipe = load_recipe(recipe_file, sets)
    except RecipeUserError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    batch_size = recipe.eval.batch_size
    if batch_size == "auto":  # what the stage passes to lm-eval (8 on a CPU: lm-eval's search is slow there)
        try:
            from engine.stages.eval import lm_eval_batch_size

            batch_size = lm_eval_batch_size(batch_size)
        except ImportError:
            import torch

            batch_size = "auto" if torch.cuda.is_available() else 8
    versions = library_versions()

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-overhead-"))
    logs = tmp / "logs"
    logs.mkdir()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else tmp / "run"
    recipe_bin = str(ROOT / ".venv" / "bin" / "recipe")
    lm_eval_bin = str(ROOT / ".venv" / "bin" / "lm_eval")
    base_cmd = [recipe_bin, "run", recipe_path, "--run-dir", str(run_dir), "--until", "eval"]
    for item in sets:
        base_cmd += ["--set", item]
    engine_cmd = [*base_cmd, "--force", "eval"]
    failed = False
    try:
        # ------------------------------------------------ setup: a short run up to eval
        console.print(f"setup: {shlex.join(['recipe', *base_cmd[1:]])}")
        code, setup_wall = run_logged(base_cmd, logs / "setup.log", env, ROOT)
        if code != 0:
            raise RuntimeError(f"setup run failed (exit {code}):\n{tail(logs / 'setup.log')}")
        setup_results = json.loads((run_dir / "eval" / "results.json").read_text())
        tasks = task_folders(run_dir)
        model = str((run_dir / "export" / "model").resolve())
        for entry in tasks:
            entry["documented_command"] = documented_command(Path(entry["yaml"]))
            entry["cli"] = plain_cli_command(entry["documented_command"], entry["task"], model, batch_size, lm_eval_bin)
        base_dir = None
        if args.base == "fresh":
            from engine.models import resolve_base_model

            base_dir = str(resolve_base_model(recipe.model, Console(quiet=True)))
        console.print(f"setup: {setup_wall:.1f} s; tasks: {', '.join(t['task'] for t in tasks)}; model {model}; batch size {batch_size}")
        setup = {
            "process_wall_s": round(setup_wall, 1),
            "timings": setup_results.get("timings"),
            "base_cached": base_was_cached(setup_results),
            "eval_stage_wall_s": json.loads(stage_record(run_dir, "eval")).get("wall_time_s"),
        }
        upstream_before = {s: stage_record(run_dir, s) for s in ("source", "clean", "dataset", "train", "export")}

        # ------------------------------------------------ the repeats
        def engine_run(index: int) -> tuple[dict, dict]:
            run_env = dict(env)
            if args.base == "fresh":
                run_env["RECIPE_CACHE"] = str(fresh_cache(tmp, index))
            log = logs / f"engine-{index + 1}.log"
            code, wall = run_logged(engine_cmd, log, run_env, ROOT)
            if code != 0:
                raise RuntimeError(f"engine run failed (exit {code}):\n{tail(log)}")
            reran = [s for s, before in upstream_before.items() if stage_record(run_dir, s) != before]
            if reran:
                raise RuntimeError(f"`--force eval` reran {', '.join(reran)} too: the measured runs would not be eval alone (see {log})")
            results = json.loads((run_dir / "eval" / "results.json").read_text())
            timings = results.get("timings") or {}
            base_cached = base_was_cached(results)
            if args.base == "cached" and base_cached is False:
                console.print("[yellow]the base model was scored again in a measured run (its cache entry was missing)[/yellow]")
            return {
                "process_wall_s": round(wall, 2),
                "process_cpu_s": CPU[str(log)],
                "eval_stage_wall_s": json.loads(stage_record(run_dir, "eval")).get("wall_time_s"),
                "tuned_scoring_s": timings.get("tuned_scoring_s"),
                "base_scoring_s": timings.get("base_scoring_s"),
                "base_cached": base_cached,
                "has_timings": timings.get("tuned_scoring_s") is not None,
            }, results

        def cli_run(index: int) -> dict:
            """The documented lm_eval command, one process per task folder."""
            total, per_task = 0.0, {}
            for entry in tasks:
                log = logs / f"cli-{entry['task']}-{index + 1}.log"
                code, cli_wall = run_logged(entry["cli"], log, env, Path(entry["folder"]))
                if code != 0:
                    raise RuntimeError(f"plain lm_eval failed (exit {code}): cd {entry['folder']} && {shlex.join(entry['cli'])}\n{tail(log)}")
                total += cli_wall
                per_task[entry["task"]] = {"process_wall_s": round(cli_wall, 2), "process_cpu_s": CPU[str(log)], "metrics": parse_table(log.read_text(errors="replace")).get(entry["task"])}
            return {"process_wall_s": round(total, 2), "process_cpu_s": round(sum(t["process_cpu_s"] for t in per_task.values()), 2), "tasks": per_task}

        def inproc_run(index: int, label: str, model_dir: str, mode: str = "plain") -> dict:
            """Plain lm-eval in a process of its own: model load + simple_evaluate, timed inside."""
            result_file = tmp / f"inproc-{label}-{index + 1}.json"
            cfg = {"model": model_dir, "batch_size": batch_size, "result": str(result_file), "mode": mode,
                   "tasks": [{"folder": t["folder"], "task": t["task"], "yaml": t["yaml"]} for t in tasks]}  # fmt: skip
            log = logs / f"inproc-{label}-{index + 1}.log"
            code, in_wall = run_logged([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)], log, env, ROOT)
            if code != 0 or not result_file.is_file():
                raise RuntimeError(f"plain in-process lm-eval failed (exit {code}):\n{tail(log)}")
            return {**json.loads(result_file.read_text()), "process_wall_s": round(in_wall, 2), "process_cpu_s": CPU[str(log)]}

        runs = []
        agreement = []
        for index in range(repeats):
            row: dict = {"repeat": index + 1}
            # alternate which side goes first, so a load that rises or falls over the run favours neither
            row["order"] = ["engine", "inproc"] if index % 2 == 0 else ["inproc", "engine"]
            if args.stage_like:
                row["order"].insert(1, "stage_like")
            for side in row["order"]:
                if side == "engine":
                    row["engine"], results = engine_run(index)
                elif side == "stage_like":
                    row["plain_stage_like"] = inproc_run(index, "stage-like", model, mode="stage_like")
                else:
                    row["plain_inproc_tuned"] = inproc_run(index, "tuned", model)
                    if base_dir:
                        row["plain_inproc_base"] = inproc_run(index, "base", base_dir)
            if index < args.cli_repeats:
                row["plain_cli"] = cli_run(index)

            # same scores?
            for entry in tasks:
                engine_scores = engine_task_scores(results, entry["task"], "tuned")
                checks = {
                    "task": entry["task"],
                    "repeat": index + 1,
                    "engine_vs_inproc": compare(engine_scores, row["plain_inproc_tuned"]["tasks"][entry["task"]]["metrics"], EXACT_TOLERANCE),
                    "engine": engine_scores,
                }
                if "plain_stage_like" in row:
                    checks["engine_vs_stage_like"] = compare(engine_scores, row["plain_stage_like"]["tasks"][entry["task"]]["metrics"], EXACT_TOLERANCE)
                if "plain_cli" in row:
                    checks["engine_vs_cli"] = compare(engine_scores, row["plain_cli"]["tasks"][entry["task"]]["metrics"], CLI_TOLERANCE)
                if base_dir:
                    checks["base_engine_vs_inproc"] = compare(
                        engine_task_scores(results, entry["task"], "base"), row["plain_inproc_base"]["tasks"][entry["task"]]["metrics"], EXACT_TOLERANCE
                    )
                agreement.append(checks)
                for name in ("engine_vs_inproc", "engine_vs_stage_like", "engine_vs_cli", "base_engine_vs_inproc"):
                    if name in checks and not checks[name]["same"]:
                        failed = True
                        console.print(f"[bold red]SCORES DIFFER ({name}, {entry['task']}, repeat {index + 1}): "
                                      f"{checks[name].get('differences') or checks[name].get('why')}[/bold red]")  # fmt: skip
            engine_s = row["engine"]["tuned_scoring_s"] if row["engine"]["has_timings"] else row["engine"]["eval_stage_wall_s"]
            cli_text = f" | plain lm_eval CLI {row['plain_cli']['process_wall_s']:.1f} s" if "plain_cli" in row else ""
            console.print(
                f"repeat {index + 1}: engine {'tuned_scoring_s' if row['engine']['has_timings'] else 'eval stage wall (no timings)'} "
                f"{engine_s:.2f} s (process {row['engine']['process_wall_s']:.1f} s) | plain in-process "
                f"{row['plain_inproc_tuned']['scoring_s']:.2f} s (process {row['plain_inproc_tuned']['process_wall_s']:.1f} s){cli_text}"
            )
            runs.append(row)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        console.print(f"logs kept in {logs}")
        return 1

    # ------------------------------------------------ figures
    has_timings = all(r["engine"]["has_timings"] for r in runs)
    engine_key = "tuned_scoring_s" if has_timings else "eval_stage_wall_s"

    def best(values):
        values = [v for v in values if v is not None]
        return min(values) if values else None

    engine_best = best(r["engine"][engine_key] for r in runs)
    inproc_best = best(r["plain_inproc_tuned"]["scoring_s"] for r in runs)
    engine_proc_best = best(r["engine"]["process_wall_s"] for r in runs)
    cli_best = best(r["plain_cli"]["process_wall_s"] for r in runs if "plain_cli" in r)
    inproc_proc_best = best(r["plain_inproc_tuned"]["process_wall_s"] for r in runs)
    stage_best = best(r["engine"]["eval_stage_wall_s"] for r in runs)
    ratio = engine_best / inproc_best
    figures = {
        "engine_figure": engine_key if has_timings else "eval_stage_wall_s (results.json has no timings: the whole stage, an upper bound)",
        "engine_tuned_scoring_s": engine_best,
        "plain_inproc_scoring_s": inproc_best,
        "ratio": round(ratio, 3),
        "ratio_headline": "engine tuned scoring / plain in-process (model load + simple_evaluate), best of each",
        "engine_eval_stage_wall_s": stage_best,
        "engine_process_wall_s": engine_proc_best,
        "plain_cli_process_wall_s": cli_best,
        "plain_inproc_process_wall_s": inproc_proc_best,
        "process_ratio_vs_cli": round(engine_proc_best / cli_best, 3) if cli_best else None,
        "engine_process_cpu_s": best(r["engine"]["process_cpu_s"] for r in runs),
        "plain_inproc_process_cpu_s": best(r["plain_inproc_tuned"]["process_cpu_s"] for r in runs),
        "plain_inproc_scoring_cpu_s": best(r["plain_inproc_tuned"]["scoring_cpu_s"] for r in runs),
        "plain_cli_process_cpu_s": best(r["plain_cli"]["process_cpu_s"] for r in runs if "plain_cli" in r),
        "stage_ratio_vs_inproc": round(stage_best / inproc_best, 3) if stage_best else None,
        "plain_stage_like_scoring_s": best(r["plain_stage_like"]["scoring_s"] for r in runs if "plain_stage_like" in r),
        "per_repeat_ratios": [round(r["engine"][engine_key] / r["plain_inproc_tuned"]["scoring_s"], 3) for r in runs],
    }
    if args.base == "fresh":
        engine_base = best(r["engine"]["base_scoring_s"] for r in runs)
        inproc_base = best(r["plain_inproc_base"]["scoring_s"] for r in runs)
        figures.update({"engine_base_scoring_s": engine_base, "plain_inproc_base_scoring_s": inproc_base,
                        "base_ratio": round(engine_base / inproc_base, 3) if engine_base and inproc_base else None})  # fmt: skip
    met = ratio <= GOAL_RATIO

    table = Table(title=f"eval stage vs plain lm-eval, {len(tasks)} task(s), {items} items each, batch {batch_size} (best of {repeats})")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("runs", justify="right")
    table.add_row(f"engine: {engine_key}", f"{engine_best:.2f}", ", ".join(f"{r['engine'][engine_key]:.2f}" for r in runs))
    table.add_row("plain in-process: load + simple_evaluate", f"{inproc_best:.2f}", ", ".join(f"{r['plain_inproc_tuned']['scoring_s']:.2f}" for r in runs))
    if figures["plain_stage_like_scoring_s"]:
        stage_like = figures["plain_stage_like_scoring_s"]
        table.add_row("plain in-process, called the stage's way", f"{stage_like:.2f}",
                      ", ".join(f"{r['plain_stage_like']['scoring_s']:.2f}" for r in runs))  # fmt: skip
    table.add_row("[bold]ratio (headline)[/bold]", f"[bold]{ratio:.3f}[/bold]", f"goal {GOAL_RATIO}: {'met' if met else 'MISSED'}")
    if has_timings:
        table.add_row("engine: eval stage wall_time_s", f"{stage_best:.2f}", ", ".join(f"{r['engine']['eval_stage_wall_s']:.2f}" for r in runs))
    table.add_row("engine: `recipe run --force eval` process", f"{engine_proc_best:.1f}", ", ".join(f"{r['engine']['process_wall_s']:.1f}" for r in runs))
    if cli_best:
        table.add_row("plain: `lm_eval` CLI process(es)", f"{cli_best:.1f}", ", ".join(f"{r['plain_cli']['process_wall_s']:.1f}" for r in runs if "plain_cli" in r))
    table.add_row("plain: in-process worker process", f"{inproc_proc_best:.1f}", ", ".join(f"{r['plain_inproc_tuned']['process_wall_s']:.1f}" for r in runs))
    table.add_row("ratio per repeat (same repeat)", "", ", ".join(f"{x:.3f}" for x in figures["per_repeat_ratios"]))
    table.add_row("CPU s: engine `recipe run --force eval` process", f"{figures['engine_process_cpu_s']:.1f}", ", ".join(f"{r['engine']['process_cpu_s']:.1f}" for r in runs))
    table.add_row("CPU s: plain in-process worker process", f"{figures['plain_inproc_process_cpu_s']:.1f}", ", ".join(f"{r['plain_inproc_tuned']['process_cpu_s']:.1f}" for r in runs))
    if figures["plain_cli_process_cpu_s"]:
        table.add_row("CPU s: plain `lm_eval` CLI process(es)", f"{figures['plain_cli_process_cpu_s']:.1f}", ", ".join(f"{r['plain_cli']['process_cpu_s']:.1f}" for r in runs if "plain_cli" in r))
    if figures["process_ratio_vs_cli"] is not None:
        table.add_row("process ratio (engine / CLI)", f"{figures['process_ratio_vs_cli']:.3f}", "different work: see the docstring")
    if args.base == "fresh":
        table.add_row("base: engine base_scoring_s", str(figures["engine_base_scoring_s"]), "")
        table.add_row("base: plain in-process", str(figures["plain_inproc_base_scoring_s"]), f"ratio {figures['base_ratio']}")
    console.print(table)
    if not has_timings:
        console.print("[yellow]results.json has no 'timings': the engine figure is the whole eval stage's wall time (an upper bound)[/yellow]")
    if failed:
        console.print("[bold red]the engine and plain lm-eval disagree on the scores: see 'agreement' in the JSON[/bold red]")
    else:
        sides = [f"the in-process worker (relative {RELATIVE_TOLERANCE:g})"]
        if any("engine_vs_stage_like" in a for a in agreement):
            sides.append("the stage-like worker")
        if any("engine_vs_cli" in a for a in agreement):
            sides.append("the lm_eval CLI (4 decimals)")
        console.print(f"scores agree ({', '.join(sorted({k for a in agreement for k in a['engine_vs_inproc'].get('compared', [])}))}) "
                      f"between the engine and {', '.join(sides)}")  # fmt: skip

    command = "RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/eval_overhead.py" + "".join(
        f" {shlex.quote(arg)}" for arg in (argv if argv is not None else sys.argv[1:])
    )
    host["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    first = runs[0]
    report = {
        "command": command,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**host, "torch_threads_worker": first["plain_inproc_tuned"].get("torch_threads"), "device": first["plain_inproc_tuned"].get("device")},
        "versions": versions,
        "settings": {"recipe": recipe_path, "items": items, "repeats": repeats, "base": args.base, "batch_size": batch_size, "sets": sets},
        "commands": {
            "setup": shlex.join(["recipe", *base_cmd[1:]]).replace(str(run_dir), "<run>"),
            "engine": shlex.join(["recipe", *engine_cmd[1:]]).replace(str(run_dir), "<run>"),
            "plain_cli": [f"cd <run>/eval/tasks/{t['task']} && " + shlex.join(["lm_eval", *t["cli"][1:]]).replace(str(run_dir), "<run>") for t in tasks],
            "documented_in_yaml": {t["task"]: t["documented_command"] for t in tasks},
            "plain_inproc": "python bench/eval_overhead.py --worker: HFLM(pretrained=<run>/export/model, device, batch_size) once, then per "
            "task folder: chdir, TaskManager(include_path=<folder>, include_defaults=False), simple_evaluate(model=lm, "
            "tasks=[task], task_manager=manager, log_samples=False); timed from before HFLM to after the last simple_evaluate",
        },
        "tasks": [t["task"] for t in tasks],
        "goal_ratio": GOAL_RATIO,
        "met": met,
        "figures": figures,
        "scores_agree": not failed,
        "agreement": agreement,
        "setup": setup,
        "runs": runs,
    }
    Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {args.output}")
    if args.keep or args.run_dir:
        console.print(f"kept {tmp if args.keep else run_dir}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
