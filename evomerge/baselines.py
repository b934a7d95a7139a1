"""Baseline merges a run is measured against: presets (the plain merges a user would try first)
or any recipe. They are scored like the source models, on the fitness and the held-out tasks,
outside the budget, so that status and the report say whether the search beat them.

Presets, over the run's models other than `base_model` (the experts), with weight 1 each and
every other setting at the method's mergekit default:
- average:          linear (normalized: the plain mean of the experts' weights)
- task_arithmetic:  base + the sum of the experts' task vectors (not normalized)
- ties:             TIES at density 0.5 (normalized by the electing weights)
- dare_ties:        DARE-TIES at density 0.5 (rescaled, not normalized), seeded with the run seed
- dam:              DAM's learned column coefficients (each expert distilled on its own
                    calibration text), learned once into the run folder
- adamerging:       AdaMerging's learned lambdas per layer (entropy on the fitness prompts),
                    learned once into the run folder
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

LEARNED_PRESETS = ("dam", "adamerging")
PRESETS = ("average", "task_arithmetic", "ties", "dare_ties", *LEARNED_PRESETS)
NEEDS_BASE = ("task_arithmetic", "ties", "dare_ties", "adamerging")
LEARNED = "learned"  # the run folder's learned coefficients, one folder per method


def learned_file(learned_dir: Path, method: str) -> Path:
    """Where a run keeps the coefficients of its learned `method` merge."""
    return Path(learned_dir) / method / "coefficients.safetensors"


class BaselineSpec(BaseModel):
    """`{name, preset}` or `{name, recipe}` (a recipe file, or one written inline); model
    references in a recipe may be the run's model names."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    preset: Optional[str] = None
    recipe: Optional[Union[str, dict[str, Any]]] = None

    @model_validator(mode="after")
    def _one_kind(self) -> BaselineSpec:
        if (self.preset is None) == (self.recipe is None):
            raise ValueError("give exactly one of 'preset' or 'recipe'")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return self


def normalize_baselines(entries: list[Union[str, BaselineSpec]]) -> list[BaselineSpec]:
    """Plain strings are presets named after themselves; names must be unique."""
    unknown = next((e for e in entries if isinstance(e, str) and e not in PRESETS), None)
    if unknown is not None:
        raise EvomergeError(
            f"field 'baselines': unknown preset {unknown!r}; choose one of {', '.join(PRESETS)} "
            "or give {name, recipe}"
        )
    specs = [BaselineSpec(name=e, preset=e) if isinstance(e, str) else e for e in entries]
    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise EvomergeError(f"field 'baselines': the name {duplicate!r} is used twice; rename one")
    return specs


def baseline_recipes(
    specs: list[BaselineSpec],
    models: dict[str, str],
    base_model: Optional[str],
    seed: int,
    base_dir: Optional[Path] = None,
    learned_dir: Path = Path(LEARNED),
) -> dict[str, str]:
    """name -> recipe YAML, with model names resolved to the run's model references (a learned
    preset names its coefficients under `learned_dir`)."""
    return {
        s.name: _recipe(s, models, base_model, seed, base_dir, learned_dir).to_yaml() for s in specs
    }


def _recipe(
    spec: BaselineSpec,
    models: dict[str, str],
    base_model: Optional[str],
    seed: int,
    base_dir: Optional[Path],
    learned_dir: Path,
) -> Recipe:
    field = f"field 'baselines' ({spec.name})"
    if spec.preset is not None:
        return preset_recipe(spec.preset, models, base_model, seed, field, learned_dir)
    data = spec.recipe
    if isinstance(data, str):
        path = Path(data)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise EvomergeError(f"{field}: cannot read recipe {spec.recipe} ({exc})") from None
        named = data.get("coefficients") if isinstance(data, dict) else None
        if isinstance(named, str) and not Path(named).is_absolute():  # beside its recipe file
            data = {**data, "coefficients": str((path.parent / named).resolve())}
    try:
        recipe = Recipe.from_dict(data, source=f"{field} recipe")
    except EvomergeError as exc:
        raise EvomergeError(str(exc)) from None
    return Recipe.model_validate(_resolve_names(recipe.model_dump(exclude_none=True), models))


def _resolve_names(data: Any, models: dict[str, str]) -> Any:
    """Model names of the run (keys of `models:`) become their references, anywhere a recipe
    names a model."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key in ("model", "base_model", "tokenizer_source") and value in models:
                out[key] = models[value]
            else:
                out[key] = _resolve_names(value, models)
        return out
    if isinstance(data, list):
        return [_resolve_names(v, models) for v in data]
    return data


def preset_recipe(
    preset: str,
    models: dict[str, str],
    base_model: Optional[str],
    seed: int,
    field: str,
    learned_dir: Path = Path(LEARNED),
) -> Recipe:
    experts = [ref for name, ref in models.items() if name != base_model]
    if not experts:
        raise EvomergeError(f"{field}: preset {preset!r} needs models besides base_model")
    if preset in NEEDS_BASE and base_model is None:
        raise EvomergeError(
            f"{field}: preset {preset!r} merges task vectors and needs base_model; set "
            "base_model or use the 'average' preset"
        )
    if preset in LEARNED_PRESETS:
        data = {
            "merge_method": preset,
            "models": [{"model": ref} for ref in experts],
            "coefficients": str(learned_file(learned_dir, preset)),
            "seed": seed,
        }
        if base_model is not None:
            data["base_model"] = models[base_model]
        return Recipe.from_dict(data)
    if preset == "average":
        return Recipe.from_dict(
            {
                "merge_method": "linear",
                "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in experts],
            }
        )
    parameters: dict[str, float] = {"weight": 1.0}
    if preset in ("ties", "dare_ties"):
        parameters["density"] = 0.5
    return Recipe.from_dict(
        {
            "merge_method": preset,
            "base_model": models[base_model],  # type: ignore[index]
            "models": [{"model": ref, "parameters": dict(parameters)} for ref in experts],
            "seed": seed,
        }
    )
