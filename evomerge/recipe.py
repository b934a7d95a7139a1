"""Recipe: the one description of a merge, read from and written to YAML.

The YAML is mergekit's merge-config format (models or slices, per-model parameters, per-layer
value lists, ``{filter, value}`` lists) plus ``seed``, which fixes the random state of
stochastic methods so that the same recipe always gives the same weights.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import EvomergeError

Scalar = Union[bool, int, float, str]


class FilteredValue(BaseModel):
    """A value that applies only to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: Union[Scalar, list[Scalar]]


Setting = Union[Scalar, list[Scalar], FilteredValue, list[FilteredValue]]
Parameters = dict[str, Setting]


class ModelInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[Parameters] = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _range_is_forward(self) -> SliceSource:
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range {list(self.layer_range)} must be [start, end) with 0 <= start < end"
            )
        return self


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Optional[Parameters] = None
    residual_weight: Optional[float] = None

    @model_validator(mode="after")
    def _no_residual_weight(self) -> OutputSlice:
        if self.residual_weight is not None:
            raise ValueError("residual_weight is not supported; remove it")
        return self


class PathStep(BaseModel):
    """One layer of a data-flow path: which layer of which model, and the residual scale that
    multiplies the hidden state where the path enters it."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0

    @model_validator(mode="after")
    def _scale_positive(self) -> PathStep:
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        return self


class LinesSchedule(BaseModel):
    """LiNeS (arXiv:2410.07949): the task vectors of decoder layer l of L are scaled by
    alpha + beta * l / (L - 1); tensors before the layers (embeddings) by alpha, after them
    (final norm, head) by alpha + beta."""

    model_config = ConfigDict(extra="forbid")
    alpha: float
    beta: float

    def scale(self, layer: Optional[int], layers: int, after: bool = False) -> float:
        if layer is None:
            return self.alpha + (self.beta if after else 0.0)
        return self.alpha + self.beta * (layer / (layers - 1) if layers > 1 else 1.0)


class Recipe(BaseModel):
    """A merge: method, inputs, parameters, output dtype and the seed of its random state."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    # dataflow recipes name their models; a name may hold a nested recipe (PS then DFS)
    models: Optional[Union[list[ModelInput], dict[str, Union[str, Recipe]]]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    seed: int = 0
    name: Optional[str] = None
    embed_from: Optional[str] = None
    path: Optional[list[PathStep]] = None
    # data-aware methods (fisher, regmean): the folder of the sources' calibration statistics
    statistics: Optional[str] = None
    # learned merges (dam, adamerging): their coefficient file (safetensors), beside the recipe
    coefficients: Optional[str] = None
    lines: Optional[LinesSchedule] = None  # a depth schedule for task-vector methods

    @model_validator(mode="after")
    def _models_xor_slices(self) -> Recipe:
        if self.merge_method == "dataflow":
            if not isinstance(self.models, dict) or not self.models:
                raise ValueError(
                    "a dataflow recipe needs 'models' as a mapping name -> path or nested recipe"
                )
            if not self.path:
                raise ValueError("a dataflow recipe needs a non-empty 'path'")
            names = [self.embed_from or "", *(step.model for step in self.path)]
            unknown = [n for n in names if n not in self.models]
            if unknown:
                raise ValueError(f"'{unknown[0]}' is not a key of 'models' (embed_from/path)")
            return self
        if self.path is not None or self.embed_from is not None:
            raise ValueError("'path' and 'embed_from' belong to merge_method: dataflow")
        if isinstance(self.models, dict):
            raise ValueError("'models' must be a list of {model, parameters}")
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (a non-empty list)")
        return self

    # ----- reading and writing -------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return cls.from_yaml_text(read_recipe_file(path), source=str(path))

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.composer.ComposerError:  # several `---` documents
            raise EvomergeError(
                f"{source}: holds several merge configs (a multi-stage file); `evomerge merge` "
                "reads it, here give one"
            ) from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise EvomergeError(f"{source}: not valid YAML{at}") from None
        if not isinstance(data, dict):
            raise EvomergeError(f"{source}: expected a mapping with 'merge_method' at the top")
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        for unsupported in ("modules", "tokenizer"):
            if unsupported in data:
                raise EvomergeError(
                    f"{source}: field '{unsupported}' is not supported by evomerge; "
                    "use 'models' or 'slices' and 'tokenizer_source'"
                )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EvomergeError(f"{source}: {describe_validation_error(exc)}") from None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)

    def to_mergekit_yaml(self) -> str:
        """The same merge as a mergekit config (without evomerge's own fields)."""
        data = self.model_dump(
            mode="json",
            exclude_none=True,
            exclude={"seed", "name", "statistics", "coefficients", "lines"},
        )
        return yaml.safe_dump(data, sort_keys=False)

    # ----- structure ------------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, each once, in first-mention order."""
        seen: dict[str, None] = {}
        if isinstance(self.models, dict):
            for model in self.models.values():
                for ref in model.referenced_models() if isinstance(model, Recipe) else [model]:
                    seen[ref] = None
            return list(seen)
        if self.base_model:
            seen[self.base_model] = None
        for model in self.models or []:
            seen[model.model] = None
        for out in self.slices or []:
            if out.base_model:
                seen[out.base_model] = None
            for src in out.sources:
                seen[src.model] = None
        return list(seen)


def read_recipe_file(path: str | Path) -> str:
    """A recipe file's text, or one line saying why it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvomergeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{path}: cannot read recipe ({exc})") from None


def describe_validation_error(exc: ValidationError) -> str:
    """First pydantic error as 'field a.b.c: message' — one line a user can act on."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
        close = difflib.get_close_matches(str(err["loc"][-1]), _FIELD_NAMES, n=1)
        if close:
            msg = f"unknown field; did you mean '{close[0]}'?"
    elif err["type"] == "missing":
        msg = "required field is missing"
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"field '{loc}': {msg}{extra}" if loc else f"{msg}{extra}"


_FIELD_NAMES = sorted(
    {
        "merge_method",
        "models",
        "slices",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "chat_template",
        "seed",
        "name",
        "model",
        "layer_range",
        "sources",
        "filter",
        "value",
        "residual_weight",
        "embed_from",
        "path",
        "layer",
        "scale",
    }
)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part.startswith(("list[", "dict[", "tuple["))
        or part in {"bool", "int", "float", "str", "python", "lm_eval"}  # last two: fitness tags
        or part.startswith("function-")
    )


# ----- parameter resolution (mergekit semantics) ---------------------------------------------
def resolve_setting(setting: Setting, tensor_name: str, t: float, kind: type) -> Any:
    """Value of one setting for one tensor at layer position t in [0, 1], or None if no filter
    matches.

    Numeric lists are interpolated linearly at t*(len-1); boolean/string lists pick an element;
    lists of ``{filter, value}`` take the first entry whose filter is a substring of the name.
    """
    if isinstance(setting, FilteredValue):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], FilteredValue):
        for cond in setting:
            if not isinstance(cond, FilteredValue):
                raise EvomergeError("a parameter list mixes {filter, value} entries and values")
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return resolve_setting(cond.value, tensor_name, t, kind)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [coerce(v, kind) for v in setting]
        if kind is bool or kind is str:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], kind)
    return coerce(setting, kind)


def coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"expected true/false, got {value!r}")
    if kind is float or kind is int:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return kind(float(value)) if kind is int else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    return str(value)
