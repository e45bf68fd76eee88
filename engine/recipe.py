"""Loading a recipe: YAML (safe) with positions, `include:` of shared bases, `--set` overrides, and validation
against the pydantic models of every registered stage and source kind. Every problem found is reported at
once, each with file, line, column, key path and the fix; nothing here imports torch or transformers.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Annotated, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from engine.errors import Problem, RecipeError
from engine.launch import LaunchConfig
from engine.serve.config import ServeConfig
from engine.models import ModelConfig
from engine.persona import CharacterConfig
from engine.registry import SOURCES, load_all, stage_kinds

Path_ = tuple  # a key path: ("train", "lora", "rank")


@dataclass(frozen=True)
class Where:
    file: str
    line: Optional[int]
    column: Optional[int]


class RecipeBase(BaseModel):
    """Fields every recipe has; stage sections are added from the registry by build_recipe_model()."""

    model_config = ConfigDict(extra="forbid")
    _file: Path = PrivateAttr(default=Path("recipe.yaml"))

    def source_dir(self) -> Path:
        """The folder relative paths in the recipe are resolved against."""
        return self._file.resolve().parent

    @property
    def file(self) -> Path:
        return self._file


_MODEL_CACHE: dict[str, type[RecipeBase]] = {}


def build_recipe_model() -> type[RecipeBase]:
    """The Recipe model: common sections plus one section per registered stage kind."""
    if "recipe" in _MODEL_CACHE:
        return _MODEL_CACHE["recipe"]
    load_all()
    source_models = tuple(kind.config for kind in SOURCES.values())
    source_type: Any = source_models[0] if len(source_models) == 1 else Annotated[Union[source_models], Field(discriminator="kind")]
    fields: dict[str, Any] = {
        "name": (str, Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; the run folder is runs/<name>/.",
                            json_schema_extra={"reference_default": "the recipe file's name"})),
        "description": (str, Field("", description="One line about the character and the data.")),
        "character": (CharacterConfig, Field(..., description="Who the model becomes.")),
        "model": (ModelConfig, Field(default_factory=ModelConfig, description="The base model.")),
        "source": (source_type, Field(..., description="Where the dialogue comes from; `kind` picks the source format.")),
        "launch": (LaunchConfig, Field(default_factory=LaunchConfig, description="How the train stage starts its processes (launchers/); not part of any cache key.")),
        "serve": (ServeConfig, Field(default_factory=ServeConfig, description="How `recipe serve` / `recipe chat` run the exported model (precision, device, default sampling, limits); not part of any cache key.")),
    }
    for stage in stage_kinds():
        if stage.name != "source":
            fields[stage.name] = (stage.config, Field(default_factory=stage.config, description=stage.doc))
    model = create_model("Recipe", __base__=RecipeBase, **fields)
    _MODEL_CACHE["recipe"] = model
    return model


# ---------------------------------------------------------------- YAML with positions


class _Loaded:
    def __init__(self) -> None:
        self.key_pos: dict[Path_, Where] = {}
        self.value_pos: dict[Path_, Where] = {}
        self.problems: list[Problem] = []


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


MERGE_TAG = "tag:yaml.org,2002:merge"


def _node_to_python(node: yaml.Node, file: str, path: Path_, loaded: _Loaded, active: tuple[int, ...] = ()) -> Any:
    constructor = yaml.SafeLoader("")
    if id(node) in active:  # an alias inside the node it names (`a: &x {b: *x}`): it would never end
        where = Where(file, node.start_mark.line + 1, node.start_mark.column + 1)
        loaded.problems.append(Problem(file, where.line, where.column, ".".join(map(str, path)), "a YAML alias refers to a mapping that contains it; write the keys out instead"))
        return None
    active = active + (id(node),)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        # YAML merge keys (`<<: *defaults`): their keys first, so that the mapping's own keys win
        for key_node, value_node in node.value:
            if key_node.tag != MERGE_TAG:
                continue
            merged_nodes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for merged_node in merged_nodes:
                if not isinstance(merged_node, yaml.MappingNode):
                    where = Where(file, merged_node.start_mark.line + 1, merged_node.start_mark.column + 1)
                    loaded.problems.append(Problem(file, where.line, where.column, ".".join(map(str, path + ("<<",))), "a merge key (<<) takes a mapping or a list of mappings, e.g. <<: *defaults"))
                    continue
                merged = _node_to_python(merged_node, file, path, loaded, active)
                if isinstance(merged, dict):
                    result.update({key: value for key, value in merged.items() if key not in result})
        own: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = constructor.construct_object(key_node)
            where = Where(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key, str):
                key = str(key)
            if key in own:
                loaded.problems.append(Problem(file, where.line, where.column, ".".join(map(str, path + (key,))), "duplicate key — remove one of them"))
            own.add(key)
            loaded.key_pos[path + (key,)] = where
            loaded.value_pos[path + (key,)] = Where(file, value_node.start_mark.line + 1, value_node.start_mark.column + 1)
            result[key] = _node_to_python(value_node, file, path + (key,), loaded, active)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            loaded.value_pos[path + (index,)] = Where(file, item.start_mark.line + 1, item.start_mark.column + 1)
            items.append(_node_to_python(item, file, path + (index,), loaded, active))
        return items
    return constructor.construct_object(node)


def _read_yaml(path: Path, loaded: _Loaded) -> Any:
    file = _shown(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        loaded.problems.append(Problem(file, None, None, "", "recipe file not found"))
        return None
    except IsADirectoryError:
        loaded.problems.append(Problem(file, None, None, "", f"a folder, not a recipe file; name a YAML file, e.g. {file.rstrip('/')}/*.yaml"))
        return None
    except PermissionError:
        loaded.problems.append(Problem(file, None, None, "", "cannot be read (permission denied); check the file's permissions"))
        return None
    except UnicodeDecodeError as exc:
        loaded.problems.append(Problem(file, None, None, "", f"not UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"))
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            # e.g. a quote opened on line 14 and never closed: the problem is found at the end, the cause is there
            what += f" ({exc.context} that starts at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        loaded.problems.append(Problem(file, mark.line + 1 if mark else None, mark.column + 1 if mark else None, "", f"YAML syntax error: {what}"))
        return None
    if node is None:
        return {}
    data = _node_to_python(node, file, (), loaded)
    if not isinstance(data, dict):
        loaded.problems.append(Problem(file, 1, 1, "", "a recipe must be a mapping of keys (name:, character:, source:, ...)"))
        return None
    return data


def _deep_merge(base: dict, local: dict) -> dict:
    merged = dict(base)
    for key, value in local.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _find_include(name: str, including: Path) -> Optional[Path]:
    here = including.parent
    for candidate in (here / name, here / "_base" / name, here.parent / "_base" / name):
        if candidate.is_file():
            return candidate
    if not name.endswith((".yaml", ".yml")):
        return _find_include(name + ".yaml", including)
    return None


def _load_with_includes(path: Path, loaded: _Loaded, stack: tuple[Path, ...]) -> Optional[dict]:
    resolved = path.resolve()
    own = _Loaded()  # this file's positions win over those of its includes, so collect them apart
    data = _read_yaml(path, own)
    loaded.problems.extend(own.problems)
    if data is None:
        return None
    includes = data.pop("include", [])
    include_where = own.value_pos.get(("include",)) or Where(_shown(path), None, None)
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        loaded.problems.append(Problem(include_where.file, include_where.line, include_where.column, "include", "must be a file name or a list of file names"))
        includes = []
    merged: dict = {}
    for name in includes:
        target = _find_include(name, path)
        if target is None:
            loaded.problems.append(Problem(include_where.file, include_where.line, include_where.column, "include", f"included file '{name}' not found next to {_shown(path)} or in its _base/ folder"))
            continue
        if target.resolve() in stack + (resolved,):
            chain = " -> ".join(_shown(p) for p in stack + (resolved, target.resolve()))
            loaded.problems.append(Problem(include_where.file, include_where.line, include_where.column, "include", f"include cycle: {chain}; remove one of these includes"))
            continue
        base = _load_with_includes(target, loaded, stack + (resolved,))
        if base is not None:
            merged = _deep_merge(merged, base)
    loaded.key_pos.update(own.key_pos)
    loaded.value_pos.update(own.value_pos)
    return _deep_merge(merged, data)


def _apply_override(data: dict, assignment: str, loaded: _Loaded) -> None:
    if "=" not in assignment:
        loaded.problems.append(Problem("--set", None, None, assignment, "expected key.path=value, e.g. --set train.max_steps=10"))
        return
    key_path, raw = assignment.split("=", 1)
    keys = key_path.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    where = Where(f"--set {key_path}", None, None)
    node = data
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            node[key] = {}  # the --set made this mapping (replacing any value the files gave): errors point at it
            loaded.key_pos[tuple(keys[: depth + 1])] = where
            loaded.value_pos[tuple(keys[: depth + 1])] = where
        node = node[key]
        loaded.key_pos.setdefault(tuple(keys[: depth + 1]), where)
    node[keys[-1]] = value
    loaded.key_pos[tuple(keys)] = where
    loaded.value_pos[tuple(keys)] = where


# ---------------------------------------------------------------- validation errors -> problems


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> list[Any]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model_at(model: Any, data: Any, path: Path_) -> Any:
    """The pydantic model class that validates the mapping at `path` (None if not a model)."""
    current: Any = model
    node = data
    for key in path:
        options = [m for m in _members(current) if isinstance(m, type) and issubclass(m, BaseModel)]
        if not options:
            origin = typing.get_origin(_unwrap(current))
            if origin in (dict, list):  # dict[str, Model] / list[Model]: the key is data, not a field
                current = typing.get_args(_unwrap(current))[-1]
                node = node.get(key) if isinstance(node, dict) else (node[key] if isinstance(node, list) and isinstance(key, int) and key < len(node) else None)
                continue
            return None
        chosen = options[0]
        if len(options) > 1 and isinstance(node, dict):
            for option in options:
                kind_field = option.model_fields.get("kind")
                if kind_field is not None and node.get("kind") in typing.get_args(kind_field.annotation):
                    chosen = option
        if key not in chosen.model_fields:
            return None
        current = chosen.model_fields[key].annotation
        node = node.get(key) if isinstance(node, dict) else None
    options = [m for m in _members(current) if isinstance(m, type) and issubclass(m, BaseModel)]
    if not options:
        return None
    if len(options) > 1 and isinstance(node, dict):
        for option in options:
            kind_field = option.model_fields.get("kind")
            if kind_field is not None and node.get("kind") in typing.get_args(kind_field.annotation):
                return option
    return options[0]


def _data_path(loc: tuple, data: Any) -> Path_:
    """Turn a pydantic error location into a path through the recipe data (drops union tags)."""
    path: list = []
    node = data
    for element in loc:
        if isinstance(node, dict) and element in node:
            path.append(element)
            node = node[element]
        elif isinstance(node, list) and isinstance(element, int) and element < len(node):
            path.append(element)
            node = node[element]
        elif isinstance(node, dict) and node.get("kind") == element:
            continue  # discriminated-union tag
        elif isinstance(element, str) and ("[" in element or element.startswith("function-")):
            continue  # validator names pydantic puts in locations
        elif isinstance(element, str) and path and node is not None and not isinstance(node, dict):
            continue  # the member of a plain union (int | str ...) that a scalar value was tried against
        else:
            path.append(element)
            node = None
    return tuple(path)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


def _problem_for(error: dict, data: dict, model: type[BaseModel], loaded: _Loaded, recipe_file: str) -> Problem:
    path = _data_path(error["loc"], data)
    key_path = ".".join(str(p) for p in path)
    kind = error["type"]
    where = loaded.value_pos.get(path) or loaded.key_pos.get(path)
    for depth in range(len(path) - 1, 0, -1):  # inside a value given whole (a --set mapping): its nearest located key
        if where is not None:
            break
        where = loaded.value_pos.get(path[:depth])
    if kind == "extra_forbidden":
        where = loaded.key_pos.get(path) or where
        parent = _model_at(model, data, path[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        hint = _suggest(str(path[-1]), allowed)
        if not hint and allowed:
            hint = f" — allowed keys: {', '.join(allowed)}"
        message = f"unknown key{hint}"
    elif kind == "missing":
        parent_where = loaded.key_pos.get(path[:-1]) if len(path) > 1 else None
        where = parent_where or Where(recipe_file, None, None)
        field_model = _model_at(model, data, path[:-1])
        description = ""
        if field_model is not None and path and path[-1] in field_model.model_fields:
            description = field_model.model_fields[path[-1]].description or ""
        message = f"missing required key '{path[-1]}'" + (f" ({description})" if description else "")
    elif kind == "union_tag_invalid":
        expected = re.findall(r"'([^']+)'", str(error.get("ctx", {}).get("expected_tags", "")))
        tag = str(error.get("ctx", {}).get("tag", ""))
        where = loaded.value_pos.get(path + ("kind",)) or where
        key_path = key_path + ".kind"
        message = f"unknown kind '{tag}'{_suggest(tag, expected) or '.'} Available: {', '.join(expected)}"
    elif kind == "union_tag_not_found":
        expected = sorted(SOURCES)
        message = f"missing 'kind' — one of: {', '.join(expected)}"
    elif kind == "literal_error":
        expected = re.findall(r"'([^']+)'", str(error.get("ctx", {}).get("expected", "")))
        got = str(error.get("input"))
        message = f"'{got}' is not one of {', '.join(expected)}{_suggest(got, expected)}"
    elif kind in ("model_type", "dict_type") and error.get("input") is None:
        message = "is empty: give its keys under it, or delete the line to keep the defaults"
    elif kind == "string_type" and isinstance(error.get("input"), (int, float)) and not isinstance(error.get("input"), bool):
        message = f"must be text, and YAML read {error['input']!r} as a number; put the value in quotes"
    elif kind == "model_type":  # pydantic names its class ("instance of LoraSettings"): say what the user must write
        message = f"must be a mapping of keys (got {error.get('input')!r})"
    else:
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if "input" in error and not isinstance(error["input"], (dict, list)) and kind != "value_error":
            message += f" (got {error['input']!r})"
    where = where or Where(recipe_file, None, None)
    return Problem(where.file, where.line, where.column, key_path, message)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeBase:
    """Load, include, override and validate a recipe; raise RecipeError with every problem found."""
    path = Path(path)
    loaded = _Loaded()
    data = _load_with_includes(path, loaded, ())
    if data is None:
        raise RecipeError(loaded.problems)
    for assignment in overrides:
        _apply_override(data, assignment, loaded)
    data.setdefault("name", path.stem)
    _apply_character_card(data, path, loaded)
    model = build_recipe_model()
    problems = list(loaded.problems) + _numbers_given_as_bools_or_nan(data, model, loaded, _shown(path))
    told = {(p.file, p.line, p.column, p.key_path) for p in problems}
    try:
        recipe = model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problem = _problem_for(error, data, model, loaded, _shown(path))
            if (problem.file, problem.line, problem.column, problem.key_path) not in told:  # nan: said once, not twice
                problems.append(problem)
        ordered = sorted(_dedupe(problems), key=lambda p: (p.file != _shown(path), p.file, p.line or 0, p.column or 0))
        raise RecipeError(ordered) from None
    if problems:
        raise RecipeError(sorted(_dedupe(problems), key=lambda p: (p.file != _shown(path), p.file, p.line or 0, p.column or 0)))
    recipe._file = path.resolve()
    return recipe


def _numbers_given_as_bools_or_nan(data: dict, model: type[BaseModel], loaded: _Loaded, recipe_file: str) -> list[Problem]:
    """`rank: true` where a number is wanted (pydantic would take it as 1), and `.nan` / `.inf` anywhere (it
    would fail a bound as 'greater than 0 (got nan)', or pass where a key has none): say what to write instead."""
    problems: list[Problem] = []

    def walk(node: Any, path: Path_) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, (dict, list)):
                walk(value, path + (key,))
                continue
            where = loaded.value_pos.get(path + (key,)) or loaded.key_pos.get(path + (key,)) or Where(recipe_file, None, None)
            key_path = ".".join(map(str, path + (key,)))
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(Problem(where.file, where.line, where.column, key_path, f"must be a finite number, not {value}; write a number"))
                continue
            if not isinstance(value, bool) or not isinstance(key, str):
                continue
            parent = _model_at(model, data, path)
            field = parent.model_fields.get(key) if parent is not None else None
            if field is None:
                continue
            members = _members(field.annotation)
            if bool in members or not any(member in (int, float) for member in members):
                continue
            wanted = "an integer" if int in members and float not in members else "a number"
            example = field.default if isinstance(field.default, (int, float)) and not isinstance(field.default, bool) else 1
            problems.append(Problem(where.file, where.line, where.column, key_path,
                                    f"must be {wanted}, not {str(value).lower()}; write the number (e.g. {key}: {example})"))

    walk(data, ())
    return problems


def _apply_character_card(data: dict, recipe_path: Path, loaded: _Loaded) -> None:
    """Fill the persona from `character.card` where the recipe leaves it unset (the recipe always wins)."""
    from engine.cards import apply_card, load_card
    from engine.errors import RecipeUserError

    character = data.get("character")
    if not isinstance(character, dict) or not isinstance(character.get("card"), str):
        return
    card_path = Path(character["card"]).expanduser()
    if not card_path.is_absolute():
        card_path = recipe_path.parent / card_path
    try:
        data["character"] = apply_card(character, load_card(card_path))
    except RecipeUserError as exc:
        where = loaded.value_pos.get(("character", "card")) or Where(_shown(recipe_path), None, None)
        loaded.problems.append(Problem(where.file, where.line, where.column, "character.card", str(exc).replace("\n", " ")))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """One problem per located key: the union members a value failed against become one message."""
    merged: dict[tuple, list[str]] = {}
    for problem in problems:
        messages = merged.setdefault((problem.file, problem.line, problem.column, problem.key_path), [])
        if problem.message not in messages:
            messages.append(problem.message)
    return [Problem(*where, _join_alternatives(messages)) for where, messages in merged.items()]


def _join_alternatives(messages: list[str]) -> str:
    """'Input should be a valid integer' + 'Input should be a valid string' -> '... a valid integer or a valid string'."""
    if len(messages) == 1:
        return messages[0]
    prefix = "Input should be "
    got = ""
    alternatives = []
    for message in messages:
        body = message.removeprefix(prefix)
        if " (got " in body:
            body, got = body.split(" (got ", 1)[0], " (got " + body.split(" (got ", 1)[1]
        alternatives.append(body.split(", unable to")[0])
    if all(m.startswith(prefix) for m in messages):
        return prefix + ", ".join(alternatives[:-1]) + " or " + alternatives[-1] + got
    return "; or ".join(messages)


def section(recipe: BaseModel, name: str) -> Any:
    """A recipe section as plain JSON data (what enters cache keys)."""
    return recipe.model_dump(mode="json")[name]
