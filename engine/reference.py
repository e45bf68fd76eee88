"""The recipe reference, generated from the config models so it cannot drift from the code."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from engine.recipe import _members, _unwrap, build_recipe_model
from engine.registry import SOURCES


def _type_name(annotation: Any) -> str:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    members = _members(annotation)
    if len(members) > 1 or (origin is typing.Union or str(origin) == "types.UnionType"):
        names = [_type_name(m) for m in members]
        optional = type(None) in typing.get_args(annotation)
        return " \\| ".join(names) + (" \\| null" if optional else "")
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if origin is dict:
        key, value = typing.get_args(annotation)
        return f"map[{_type_name(key)}, {_type_name(value)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "reference_default" in extra:  # filled in by the loader, e.g. name from the file's name
        return str(extra["reference_default"])
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "**required**"
    return "`" + json.dumps(value, default=str).replace("|", "\\|") + "`"


def _model_rows(model: type[BaseModel], prefix: str, rows: list[str], nested: list[tuple[str, type[BaseModel]]]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub_models = [m for m in _members(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        if len(sub_models) == 1 and prefix.count(".") < 3:
            nested.append((key, sub_models[0]))


def _section(title: str, model: type[BaseModel], prefix: str) -> list[str]:
    lines = [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    _model_rows(model, prefix, lines, nested)
    # nested sections (e.g. train.lora) expanded right after their parent
    while nested:
        key, sub = nested.pop(0)
        more: list[tuple[str, type[BaseModel]]] = []
        _model_rows(sub, key + ".", lines, more)
        nested = more + nested
    return lines + [""]


def render_reference() -> str:
    recipe = build_recipe_model()
    out = [
        "## Recipe reference",
        "",
        "Generated from the config models by `recipe reference`; `make reference` rewrites this section.",
        "Unknown keys are errors. `include: [file.yaml]` merges shared bases (local keys win).",
        "",
    ]
    top = [name for name, field in recipe.model_fields.items() if not [m for m in _members(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)]]
    out += ["### top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    out += ["| `include` | list[str] | `[]` | Recipes to merge first, looked up next to this file and in its `_base/` folder. |"]
    for name in top:
        field = recipe.model_fields[name]
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
    out.append("")
    for name, field in recipe.model_fields.items():
        if name in top:
            continue
        if name == "source":
            for kind_name, kind in SOURCES.items():
                out += _section(f"source (kind: {kind_name}) — {kind.doc}", kind.config, "source.")
            continue
        sub = [m for m in _members(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)][0]
        out += _section(name + (f" — {field.description}" if field.description else ""), sub, name + ".")
    return "\n".join(out).rstrip() + "\n"


START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def update_readme(path: str) -> bool:
    """Rewrite the reference section between the markers of a README; True when it changed."""
    from pathlib import Path

    readme = Path(path)
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render_reference()}{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        print("updated" if update_readme(sys.argv[2]) else "up to date")
    else:
        print(render_reference(), end="")
