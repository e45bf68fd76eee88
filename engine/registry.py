"""Registries of stage kinds, source kinds and the decorators that fill them.

A stage kind is one module in engine/stages/ with a pydantic config model and a function decorated with
@register_stage; a source kind is one module in engine/sources/ decorated with @register_source. Adding
either never touches the runner: the recipe model and the runner read these registries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel


@dataclass
class InputFile:
    """A file a stage reads from outside the run folder, identified by its content."""

    path: Path
    sha256: str


@dataclass
class StageContext:
    """What a stage function gets: the recipe, its own config, where to write and what came before."""

    recipe: Any  # the validated Recipe model (engine.recipe.build_recipe_model())
    config: Any  # this stage's section of the recipe
    out: Path  # an empty temporary folder; renamed into place only when the stage returns
    run_dir: Path
    upstream: dict[str, Path]  # finished stage folders, by stage name
    inputs: dict[str, InputFile]  # resolved external files, by name
    console: Any  # rich Console for progress and messages
    key: str = ""  # this stage's cache key (the train stage records it in its checkpoints)


@dataclass
class StageKind:
    name: str
    config: type[BaseModel]
    run: Callable[[StageContext], dict]
    version: str
    doc: str
    # recipe sections (top-level keys) whose values enter this stage's cache key
    reads: tuple[str, ...]
    # earlier stages whose outputs this stage consumes
    needs: tuple[str, ...]
    # distributions whose versions change this stage's output
    libraries: tuple[str, ...]
    # recipe -> {name: InputFile}; external files (data, base model) that enter the cache key
    external_inputs: Callable[[Any], dict[str, InputFile]] | None = None
    # keep the temporary folder of an interrupted run with the same key (training checkpoints)
    resumable: bool = False


@dataclass
class SourceKind:
    name: str
    config: type[BaseModel]
    read: Callable[..., Any]  # (config, inputs: dict[str, InputFile], console) -> iterable of turn dicts
    files: Callable[[Any], dict[str, Any]]  # config -> {name: DataRef} that the source reads
    doc: str
    version: str


STAGES: dict[str, StageKind] = {}
SOURCES: dict[str, SourceKind] = {}

# The order stages run in. A stage module registers itself; this list fixes the pipeline.
STAGE_ORDER = ("source", "clean", "dataset", "train", "export", "eval")


def register_stage(
    name: str,
    *,
    config: type[BaseModel],
    version: str,
    reads: tuple[str, ...] = (),
    needs: tuple[str, ...] = (),
    libraries: tuple[str, ...] = (),
    external_inputs: Callable[[Any], dict[str, InputFile]] | None = None,
    resumable: bool = False,
) -> Callable[[Callable[[StageContext], dict]], Callable[[StageContext], dict]]:
    def decorate(func: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
        STAGES[name] = StageKind(
            name=name,
            config=config,
            run=func,
            version=version,
            doc=(func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else "",
            reads=reads or (name,),
            needs=needs,
            libraries=libraries,
            external_inputs=external_inputs,
            resumable=resumable,
        )
        return func

    return decorate


def register_source(
    name: str, *, config: type[BaseModel], files: Callable[[Any], dict[str, Any]], version: str = "1"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        SOURCES[name] = SourceKind(
            name=name,
            config=config,
            read=func,
            files=files,
            doc=(func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else "",
            version=version,
        )
        return func

    return decorate


def load_all() -> None:
    """Import every stage and source module so that they register (light imports only)."""
    import engine.sources  # noqa: F401
    import engine.stages  # noqa: F401


def stage_kinds() -> list[StageKind]:
    load_all()
    return [STAGES[name] for name in STAGE_ORDER if name in STAGES]

