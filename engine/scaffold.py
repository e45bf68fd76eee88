"""`recipe new NAME --source KIND`: write a commented recipe to start a new character from.

The file is generated from the config models, so it always matches the engine: every section and key is
there with its description as a comment. Keys the user must fill are active, with a TODO placeholder (a
data path, the character's speaker name); every other key is commented out and shows its default, so the
recipe stays short, keeps following the engine's defaults, and a key is changed by uncommenting it. The
source section comes from the chosen source kind's config model. The text is checked with load_recipe
before it is written: a scaffold always validates as written (its data file need not exist yet).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile
import textwrap
import typing
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from engine.datafiles import DataRef
from engine.errors import RecipeError, RecipeUserError
from engine.recipe import _members, _unwrap, build_recipe_model, load_recipe
from engine.registry import SOURCES, load_all

TODO = "TODO"
WIDTH = 110  # comment lines are wrapped to this many characters
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9 _./+-]*$")  # strings that YAML reads back as the same string
_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "null", "y", "n", "~"}
_EXAMPLES = re.compile(r"\be\.g\.,?\s*(.+?)(?:\)|;|$)")


class ScaffoldError(RecipeUserError):
    """A recipe that `recipe new` refuses to write (the file exists, an unknown source kind, a bad name)."""

    exit_code = 2


def write_new_recipe(name: str, source_kind: str, folder: Path) -> Path:
    """Write `<folder>/<name>.yaml`, a commented recipe for a character read with `source_kind`; its path.

    Raises ScaffoldError when the name is not a valid run name, the source kind is unknown (with a
    did-you-mean) or the file already exists (it is never overwritten).
    """
    if not _NAME.match(name):
        raise ScaffoldError(
            f"'{name}' cannot be a recipe name: use letters, digits, '_', '.' and '-', starting with a letter or "
            "digit (e.g. southpark_kyle)"
        )
    load_all()
    if source_kind not in SOURCES:
        close = difflib.get_close_matches(source_kind, list(SOURCES), n=1, cutoff=0.5)
        hint = f" — did you mean '{close[0]}'?" if close else "."
        raise ScaffoldError(f"unknown source kind '{source_kind}'{hint} Available: {', '.join(SOURCES)}")
    folder = Path(folder)
    path = folder / f"{name}.yaml"
    if path.exists():
        raise ScaffoldError(f"{path} already exists; `recipe new` never overwrites a file: pick another name or delete it")
    text = render_recipe(name, source_kind)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".yaml", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        try:
            load_recipe(temporary)
        except RecipeError as exc:  # a bug in the scaffold, never the user's: say so plainly
            raise ScaffoldError(f"the scaffold for source kind '{source_kind}' does not validate:\n{exc}") from None
    finally:
        os.unlink(temporary)
    try:
        with open(path, "x", encoding="utf-8") as out:  # "x": fails if the file appeared meanwhile
            out.write(text)
    except FileExistsError:
        raise ScaffoldError(f"{path} already exists; `recipe new` never overwrites a file: pick another name or delete it") from None
    return path


def render_recipe(name: str, source_kind: str) -> str:
    """The text of the scaffold (see write_new_recipe)."""
    load_all()
    recipe_model = build_recipe_model()
    kind = SOURCES[source_kind]
    lines = _comment(f"{name} — a new character, read with the {source_kind} source: {_lower_first(kind.doc)}", 0)
    lines += [
        f"# Written by `recipe new {name} --source {source_kind}`. Replace every {TODO}, then check and run it:",
        f"#   recipe validate recipes/{name}.yaml",
        f"#   recipe plan recipes/{name}.yaml",
        f"#   recipe run recipes/{name}.yaml --smoke     # a tiny random model: does it run end to end?",
        f"#   recipe run recipes/{name}.yaml",
        "# Active keys are the ones to fill; a commented-out key shows its default: uncomment it to change it.",
        "# Unknown keys are errors. The reference of every key is in README.md (`recipe reference`).",
        "",
        "# Shared settings merged first (local keys win), e.g. the base tuned for the embedded model on CPU:",
        "# include: [smollm2_cpu.yaml]",
        "",
    ]
    fields = recipe_model.model_fields
    lines += _comment(fields["name"].description, 0) + [f"name: {_scalar(name)}"]
    lines += _comment(fields["description"].description, 0) + [f"description: {_scalar(TODO + ': one line about the character and the data')}"]
    for section, field in fields.items():
        if section in ("name", "description"):
            continue
        lines.append("")
        if section == "source":
            model: type[BaseModel] = kind.config
            active = source_values(source_kind)
            title = f"{field.description} This kind ({source_kind}): {_lower_first(kind.doc)}"
        else:
            model = _section_model(field.annotation)
            active = {key: TODO for key, sub in model.model_fields.items() if sub.is_required()}
            title = field.description or ""
        lines += _comment(f"{section} — {title}", 0)
        lines += _block(section, model, active, 0)
    return "\n".join(lines) + "\n"


def source_values(source_kind: str) -> dict[str, Any]:
    """The source section's active keys: `kind`, every required key with a placeholder, and whatever else
    the kind's own validation needs (an example from the key's description, one of two alternatives)."""
    model = SOURCES[source_kind].config
    base = {"kind": source_kind}
    for key, field in model.model_fields.items():
        if key != "kind" and field.is_required():
            base[key] = _placeholder(field)
    with_examples = {**base, **{key: value for key, field in model.model_fields.items() if key in base and key != "kind"
                                for value in [_example(field)] if value is not None}}
    attempts = [base, with_examples]
    for key, field in model.model_fields.items():  # a kind that needs one of several optional mappings
        if not field.is_required() and _model_in(field.annotation) is not None:
            attempts += [{**attempt, key: _placeholder(field)} for attempt in (base, with_examples)]
    errors = ""
    for attempt in attempts:
        try:
            model.model_validate(attempt)
            return attempt
        except ValidationError as exc:
            errors = errors or str(exc)
    raise ScaffoldError(f"cannot write placeholders that the source kind '{source_kind}' accepts:\n{errors}")


# ---------------------------------------------------------------- placeholders


def _lower_first(text: str) -> str:
    """'One turn per row' -> 'one turn per row'; 'Character-LLM scenes' stays (a name)."""
    first_word = text.split(" ", 1)[0]
    return text[:1].lower() + text[1:] if first_word[1:] == first_word[1:].lower() else text


def _section_model(annotation: Any) -> type[BaseModel]:
    model = _model_in(annotation)
    assert model is not None, annotation
    return model


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None


def _examples_in(description: str) -> list[str]:
    """'The CSV file, e.g. All-seasons.csv or by-season/Season-1.csv.' -> ['All-seasons.csv', 'by-season/Season-1.csv']"""
    match = _EXAMPLES.search(description or "")
    if not match:
        return []
    parts = re.split(r",\s*|\s+or\s+|\s+and\s+", match.group(1))
    return [part.strip(" .'\"`") for part in parts if part.strip(" .'\"`")]


def _placeholder(field: Any) -> Any:
    """A value that marks a required key as still to fill, of the key's type."""
    annotation = _unwrap(field.annotation)
    model = _model_in(annotation)
    if model is DataRef:
        suffixes = [Path(example).suffix for example in _examples_in(field.description) if Path(example).suffix]
        return {"path": TODO + (suffixes[0] if suffixes else "")}
    if model is not None:
        return {key: _placeholder(sub) for key, sub in model.model_fields.items() if sub.is_required()}
    members = _members(annotation)
    origin = typing.get_origin(members[0]) if members else None
    if origin is typing.Literal:
        return typing.get_args(members[0])[0]
    if origin in (list, tuple, set):
        return [TODO]
    if origin is dict:
        return {}
    simple = members[0] if members else str
    return {bool: False, int: 0, float: 0.0}.get(simple, TODO)


def _example(field: Any) -> Any:
    """The first example(s) a key's description gives, in the key's type, or None."""
    examples = _examples_in(field.description)
    if not examples:
        return None
    annotation = _unwrap(field.annotation)
    if _model_in(annotation) is DataRef:
        return {"path": examples[0]}
    members = _members(annotation)
    if members and typing.get_origin(members[0]) in (list, tuple, set):
        return examples
    if members and members[0] is str:
        return examples[0]
    return None


# ---------------------------------------------------------------- YAML text


def _comment(text: Optional[str], indent: int) -> list[str]:
    if not text:
        return []
    prefix = " " * indent + "# "
    return textwrap.wrap(" ".join(text.split()), width=WIDTH, initial_indent=prefix, subsequent_indent=prefix)


def _scalar(value: Any) -> str:
    """A value as YAML that safe_load reads back as the same value (JSON where YAML would be ambiguous)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 reads 1e-05 as a string: write 1.0e-05
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _YAML_WORDS and not value.endswith(" "):
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(str(k))}: {_scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return _scalar(value.model_dump(mode="json"))
    return json.dumps(value, ensure_ascii=False, default=str)


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _block(key: str, model: type[BaseModel], active: dict[str, Any], indent: int) -> list[str]:
    """`key:` and the model's keys under it: active ones as values, the others commented out with defaults."""
    pad = " " * indent
    lines = [f"{pad}{key}:" if active else f"{pad}# {key}:"]
    for name, field in model.model_fields.items():
        description = field.description or ""
        if name in active:
            required = "(required) " if field.is_required() else ""
            lines += _comment(required + description, indent + 2)
            lines += _value_lines(name, field, active[name], indent + 2)
            continue
        lines += _comment(description, indent + 2)
        sub_model = _model_in(field.annotation)
        default = _default(field)
        if sub_model is not None and isinstance(default, BaseModel):  # a nested section: its keys, commented
            lines += [line if line.lstrip().startswith("#") else "# " + line for line in _block(name, sub_model, {}, indent + 2)]
        else:
            lines.append(f"{pad}  # {name}: {_scalar(default)}")
    return lines


def _value_lines(name: str, field: Any, value: Any, indent: int) -> list[str]:
    pad = " " * indent
    sub_model = _model_in(field.annotation)
    if sub_model is not None and isinstance(value, dict):
        lines = [f"{pad}{name}:"]
        for sub_name, sub_field in sub_model.model_fields.items():
            lines += _comment(sub_field.description, indent + 2)
            if sub_name in value:
                lines.append(f"{pad}  {sub_name}: {_scalar(value[sub_name])}")
            else:
                lines.append(f"{pad}  # {sub_name}: {_scalar(_default(sub_field))}")
        return lines
    return [f"{pad}{name}: {_scalar(value)}"]
