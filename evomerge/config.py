"""The run config: what to merge, how to search, what to score. Validated before anything runs."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import EvomergeError
from evomerge.recipe import describe_validation_error


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)  # a key of the fitness result, e.g. "arith: acc,none"
    direction: Literal["maximize", "minimize"] = "maximize"


class OptimizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class PythonFitness(BaseModel):
    """`module:function(model, tokenizer) -> {metric: value}`, run in the worker."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["python"] = "python"
    function: str = Field(pattern=r"^[\w.]+:\w+$")
    options: dict[str, Any] = Field(default_factory=dict)  # passed as keyword arguments


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    models: dict[str, str] = Field(min_length=1)  # name -> local folder or hub name
    base_model: Optional[str] = None
    search_space: Union[str, dict[str, Any]]
    objectives: list[Objective] = Field(min_length=1)
    optimizer: OptimizerSpec
    budget: int = Field(gt=0)
    seed: int = 0
    fitness: PythonFitness
    device: str = "auto"
    store: Optional[str] = None  # None: SQLite under the run folder; or postgresql://...
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _names(self) -> RunConfig:
        if self.base_model is not None and self.base_model not in self.models:
            raise ValueError(f"base_model {self.base_model!r} is not a key of 'models'")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError("objective names must be unique")
        return self

    @classmethod
    def load(cls, path: Union[str, Path]) -> RunConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvomergeError(f"{path}: run config not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EvomergeError(f"{path}: cannot read run config ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise EvomergeError(f"{path}: not valid YAML{at}") from None
        return cls.from_dict(data, source=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "run config", base_dir: Optional[Path] = None
    ) -> RunConfig:
        if not isinstance(data, dict):
            raise EvomergeError(f"{source}: expected a mapping of run settings")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            message = describe_validation_error(exc)
            unknown = [e for e in exc.errors() if e["type"] == "extra_forbidden"]
            if unknown and len(unknown[0]["loc"]) == 1:
                close = difflib.get_close_matches(str(unknown[0]["loc"][0]), cls.model_fields, 1)
                hint = f"did you mean '{close[0]}'?" if close else "remove it"
                message = f"field '{unknown[0]['loc'][0]}': unknown field; {hint}"
            raise EvomergeError(f"{source}: {message}") from None
        if isinstance(config.search_space, str) and base_dir is not None:
            candidate = Path(config.search_space)
            if not candidate.is_absolute() and not candidate.exists():
                config.search_space = str(base_dir / candidate)
        return config
