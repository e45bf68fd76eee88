"""Cache keys, stage records and the lock file.

A stage's key is the sha256 of canonical JSON of what decides its output: the stage kind and its code version,
the recipe sections it reads, the content hashes of its external inputs, the output hashes of the stages it
consumes, and the versions of the libraries that change its output. Never mtimes. A finished stage folder
holds `.stage.json` with that material, its key and the hashes of what it wrote; the folder is valid only
when that record is there and its key matches, so a kill can never leave a half-done stage marked done.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.datafiles import sha256_file

RECORD = ".stage.json"
LOCK = "recipe.lock.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def output_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote, by path relative to its folder."""
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != RECORD
    }


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lora": {"rank": 16}}} -> {"train.lora.rank": 16}: to say which key changed."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def explain_change(old: dict, new: dict) -> list[str]:
    """Why a stage's key changed, in words a user can act on."""
    reasons: list[str] = []
    if old.get("code_version") != new.get("code_version"):
        reasons.append(f"stage code changed (version {old.get('code_version')} → {new.get('code_version')})")
    old_config, new_config = flatten(old.get("config", {})), flatten(new.get("config", {}))
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, "∅") != new_config.get(key, "∅"):
            reasons.append(f"{key}: {old_config.get(key, '(unset)')!r} → {new_config.get(key, '(unset)')!r}")
    for kind in ("inputs", "upstream"):
        old_items, new_items = old.get(kind, {}), new.get(kind, {})
        for name in sorted(set(old_items) | set(new_items)):
            if old_items.get(name) != new_items.get(name):
                what = "input" if kind == "inputs" else "output of stage"
                reasons.append(f"{what} {name} changed")
    old_libs, new_libs = old.get("libraries", {}), new.get("libraries", {})
    for name in sorted(set(old_libs) | set(new_libs)):
        if old_libs.get(name) != new_libs.get(name):
            reasons.append(f"library {name} {old_libs.get(name)} → {new_libs.get(name)}")
    return reasons or ["key changed"]
