"""source: read raw dialogue into turns {scene, index, speaker, text, meta} with the recipe's source kind."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from engine.datafiles import DataRef, resolve
from engine.errors import StageError
from engine.registry import SOURCES, InputFile, StageContext, register_stage


def source_inputs(recipe: Any) -> dict[str, InputFile]:
    """The files the recipe's source kind reads, resolved and hashed (downloaded only if nowhere else)."""
    kind = SOURCES[recipe.source.kind]
    resolved = {}
    for name, ref in kind.files(recipe.source).items():
        resolved[name] = resolve(ref, recipe.source_dir()) if isinstance(ref, DataRef) else ref
    return resolved


def _source_config_type():
    # The config of this stage is the discriminated union of every registered source kind; the recipe
    # model builds that union itself, so the stage registers with a placeholder that is never used alone.
    from pydantic import BaseModel

    class AnySource(BaseModel):
        kind: str

    return AnySource


@register_stage(
    "source",
    config=_source_config_type(),
    version="1",
    external_inputs=source_inputs,
)
def run_source(ctx: StageContext) -> dict:
    """Read the raw dialogue into turns.jsonl, one turn a line."""
    kind = SOURCES[ctx.config.kind]
    speakers: Counter[str] = Counter()
    scenes: set[str] = set()
    count = 0
    with open(ctx.out / "turns.jsonl", "w", encoding="utf-8") as handle:
        for turn in kind.read(ctx.config, ctx.inputs, ctx.console):
            handle.write(json.dumps(turn, ensure_ascii=False) + "\n")
            speakers[turn["speaker"]] += 1
            scenes.add(turn["scene"])
            count += 1
    if count == 0:
        raise StageError("source", f"the {kind.name} source produced no turns; check the file and the source keys")
    character = ctx.recipe.character.name
    return {
        "turns": count,
        "scenes": len(scenes),
        "speakers": len(speakers),
        "character_turns": speakers.get(character, 0),
        "top_speakers": speakers.most_common(5),
        "source_version": kind.version,
    }
