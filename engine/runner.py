"""Plan and run a recipe's stages with the cache.

Each stage runs in `<run_dir>/.partial/<stage>-<key>/` and is renamed to `<run_dir>/<stage>/` only when it
returns; the lock file `<run_dir>/recipe.lock.json` records, per stage, its key, inputs, outputs, wall time
and library versions. A stage whose key matches its finished folder's record is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import cache
from engine.errors import MissingInputError, StageError
from engine.registry import SOURCES, InputFile, StageContext, StageKind, stage_kinds


@dataclass
class StagePlan:
    name: str
    status: str  # "cached", "run", "waits"
    reasons: list[str] = field(default_factory=list)
    key: str | None = None


@dataclass
class StageResult:
    name: str
    status: str  # "cached" or "ran"
    seconds: float
    summary: dict
    folder: Path


def default_run_dir(recipe: Any) -> Path:
    return Path("runs") / recipe.name


def _code_version(stage: StageKind, recipe: Any) -> str:
    if stage.name == "source":  # a source kind's reader is part of the source stage's code
        return f"{stage.version}+{recipe.source.kind}.{SOURCES[recipe.source.kind].version}"
    return stage.version


def _key_material(stage: StageKind, recipe: Any, inputs: dict[str, InputFile], upstream: dict[str, dict]) -> dict:
    dumped = recipe.model_dump(mode="json")
    return {
        "stage": stage.name,
        "code_version": _code_version(stage, recipe),
        "config": {section: dumped.get(section) for section in stage.reads},
        "inputs": {name: item.sha256 for name, item in sorted(inputs.items())},
        "upstream": {name: record["outputs_hash"] for name, record in sorted(upstream.items())},
        "libraries": cache.library_versions(stage.libraries),
    }


def _external_inputs(stage: StageKind, recipe: Any) -> dict[str, InputFile]:
    return stage.external_inputs(recipe) if stage.external_inputs else {}


def plan(recipe: Any, run_dir: Path, force: tuple[str, ...] = (), until: str | None = None) -> list[StagePlan]:
    """What `run` would do, and why, without running or downloading anything."""
    records: dict[str, dict | None] = {}
    plans: list[StagePlan] = []
    for stage in stage_kinds():
        existing = cache.read_record(run_dir / stage.name)
        pending = [name for name in stage.needs if records.get(name) is None]
        if pending:
            plans.append(StagePlan(stage.name, "waits", [f"runs after {', '.join(pending)} (its key depends on their new output)"]))
            records[stage.name] = None
        else:
            try:
                inputs = _external_inputs(stage, recipe)
            except MissingInputError as exc:
                plans.append(StagePlan(stage.name, "run", [f"input missing: {exc}"]))
                records[stage.name] = None
                continue
            material = _key_material(stage, recipe, inputs, {n: records[n] for n in stage.needs})  # type: ignore[misc]
            key = cache.digest(material)
            if existing is None:
                plans.append(StagePlan(stage.name, "run", ["never run"], key))
                records[stage.name] = None
            elif stage.name in force:
                plans.append(StagePlan(stage.name, "run", ["--force"], key))
                records[stage.name] = None
            elif existing.get("key") != key:
                plans.append(StagePlan(stage.name, "run", cache.explain_change(existing.get("material", {}), material), key))
                records[stage.name] = None
            else:
                plans.append(StagePlan(stage.name, "cached", [], key))
                records[stage.name] = existing
        if stage.name == until:
            break
    return plans


def _update_lock(run_dir: Path, recipe: Any, name: str, record: dict) -> None:
    lock_path = run_dir / cache.LOCK
    try:
        lock = json.loads(lock_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        lock = {}
    stages = lock.setdefault("stages", {})
    if stages.get(name, {}).get("key") == record["key"] and lock.get("recipe") == str(recipe.file):
        return  # already recorded: a no-op rerun writes nothing
    lock["recipe"] = str(recipe.file)
    lock["name"] = recipe.name
    stages[name] = {
        "key": record["key"],
        "code_version": record["material"]["code_version"],
        "inputs": {n: {"path": str(p), "sha256": h} for n, (p, h) in record["input_paths"].items()},
        "upstream": record["material"]["upstream"],
        "outputs_hash": record["outputs_hash"],
        "outputs": record["outputs"],
        "wall_time_s": record["wall_time_s"],
        "finished": record["finished"],
        "libraries": record["material"]["libraries"],
    }
    cache.write_json_atomic(lock_path, lock)


def _partial_dir(run_dir: Path, stage: StageKind, key: str, console: Any) -> Path:
    partial_root = run_dir / ".partial"
    partial = partial_root / f"{stage.name}-{key[:16]}"
    if partial_root.is_dir():
        for other in partial_root.glob(f"{stage.name}-*"):
            if other != partial:
                console.print(f"[yellow]discarding an interrupted {stage.name} run made with another configuration ({other.name})[/yellow]")
                shutil.rmtree(other, ignore_errors=True)
    if partial.exists() and not stage.resumable:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def _finish(run_dir: Path, stage: StageKind, partial: Path, record: dict) -> Path:
    cache.write_json_atomic(partial / cache.RECORD, record)
    final = run_dir / stage.name
    old = run_dir / ".partial" / f"{stage.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def run(
    recipe: Any,
    run_dir: Path,
    console: Any,
    *,
    force: tuple[str, ...] = (),
    until: str | None = None,
    on_stage: Any = None,
) -> list[StageResult]:
    """Run every stale stage in order (up to `until`), skipping those whose key matches their record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    results: list[StageResult] = []
    stages = list(stage_kinds())
    last = next((index for index, stage in enumerate(stages) if stage.name == until), len(stages) - 1)
    # every external input of the stages to run is found (or downloaded) first: a missing question file, model or
    # data file stops the run now, with its fix, and not after an hour of training
    inputs_of = {stage.name: _external_inputs(stage, recipe) for stage in stages[: last + 1]}
    for stage in stages:
        inputs = inputs_of[stage.name]
        material = _key_material(stage, recipe, inputs, {name: records[name] for name in stage.needs})
        key = cache.digest(material)
        existing = cache.read_record(run_dir / stage.name)
        if existing and existing.get("key") == key and stage.name not in force:
            records[stage.name] = existing
            _update_lock(run_dir, recipe, stage.name, existing)
            results.append(StageResult(stage.name, "cached", 0.0, existing.get("summary", {}), run_dir / stage.name))
            if on_stage:
                on_stage(results[-1])
        else:
            why = "never run" if existing is None else ("--force" if stage.name in force else "; ".join(cache.explain_change(existing.get("material", {}), material)))
            console.rule(f"[bold]{stage.name}[/bold] [dim]({why})[/dim]", align="left")
            partial = _partial_dir(run_dir, stage, key, console)
            context = StageContext(
                recipe=recipe,
                config=getattr(recipe, stage.name),
                out=partial,
                run_dir=run_dir,
                upstream={name: run_dir / name for name in stage.needs},
                inputs=inputs,
                console=console,
                key=key,
            )
            started = time.perf_counter()
            summary = stage.run(context)
            if not isinstance(summary, dict):
                raise StageError(stage.name, "the stage function must return a summary dict")
            seconds = time.perf_counter() - started
            cache.write_json_atomic(partial / "summary.json", summary)
            outputs = cache.output_hashes(partial)
            record = {
                "key": key,
                "material": material,
                "input_paths": {name: (str(item.path), item.sha256) for name, item in inputs.items()},
                "outputs": outputs,
                # summary.json holds timings: it is recorded, but only the stage's real outputs identify it
                "outputs_hash": cache.digest({k: v for k, v in outputs.items() if k != "summary.json"}),
                "wall_time_s": round(seconds, 2),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "summary": summary,
            }
            final = _finish(run_dir, stage, partial, record)
            _update_lock(run_dir, recipe, stage.name, record)
            records[stage.name] = record
            results.append(StageResult(stage.name, "ran", seconds, summary, final))
            if on_stage:
                on_stage(results[-1])
        if stage.name == until:
            break
    partial_root = run_dir / ".partial"
    if partial_root.is_dir() and not any(partial_root.iterdir()):
        partial_root.rmdir()
    return results
