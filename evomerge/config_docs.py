"""The run config's reference, made from the fields' own descriptions: the JSON Schema that
editors validate a YAML run config with (`evomerge config --schema`), and the Markdown page of
the documentation (`evomerge config --reference`, docs/config.md, tested to match)."""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from evomerge.config import (
    CalibrationSpec,
    Fidelity,
    HeldOut,
    LearningSpec,
    LmEvalFitnessSpec,
    Objective,
    OptimizerSpec,
    PythonFitness,
    RunConfig,
    TrackingSpec,
)

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("the run config", RunConfig),
    ("objectives[]", Objective),
    ("optimizer", OptimizerSpec),
    ("fitness (kind: lm_eval)", LmEvalFitnessSpec),
    ("fitness.held_out", HeldOut),
    ("fitness.fidelity", Fidelity),
    ("fitness (kind: python)", PythonFitness),
    ("calibration", CalibrationSpec),
    ("learning", LearningSpec),
    ("tracking", TrackingSpec),
]


def schema() -> str:
    """The run config's JSON Schema."""
    data = RunConfig.model_json_schema()
    data["title"] = "evomerge run config"
    return json.dumps(data, indent=2) + "\n"


def _type(annotation: Any) -> str:
    """A field's type as a person writes it: `int | None`, `dict[str, str]`, `"a" | "b"`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return f"`{json.dumps(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`"


def reference_markdown() -> str:
    """docs/config.md: one table per section of the run config."""
    lines = [
        "# Run config reference",
        "",
        "Every field of a run config (`evomerge run CONFIG.yaml`), from the descriptions in",
        "`evomerge/config.py`; `evomerge config --schema` prints the same as a JSON Schema for",
        "editors. This page is generated: `evomerge config --reference > docs/config.md`.",
    ]
    for title, model in SECTIONS:
        lines += ["", f"## {title}", "", "| field | type | default | what it is |"]
        lines.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            kind = _type(field.annotation).replace("|", "\\|")
            text = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | `{kind}` | {_default(field)} | {text} |")
    return "\n".join(lines) + "\n"
