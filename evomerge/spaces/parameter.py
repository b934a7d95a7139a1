"""Parameter-space (PS) search: one merge method, a weight/density/... gene per model, optionally
per layer group and per tensor filter (attention / mlp / the rest).

Layer groups become mergekit's per-layer value lists. With ``layer_shape: gradient`` a list of
G values is read at t = layer / (n - 1), so G genes span the depth and values blend between
them; with ``layer_shape: blocks`` group g owns the contiguous layers [g n / G, (g + 1) n / G)
outright (the list holds one value per layer), so a swap at a block boundary can be written;
``layer_shape: slices`` writes each group as a mergekit slice of its own, with scalar values
(mergekit-evolve's layout: the final norm and head follow the last group, not the first).
Filters become ``{filter, value}`` entries with a final catch-all for the rest. Method
parameters shared by all inputs (slerp's ``t``, ``lambda``) get one gene set, not one per model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import EvomergeError
from evomerge.merge.methods import Param, get_method
from evomerge.recipe import Recipe
from evomerge.spaces.base import MAX_GENES, SearchSpace, experts_named

# What a task-vector or interpolation merge needs to give back one of its inputs unchanged: the
# other inputs weighted 0 (the base: every weight 0) or slerp's t at that end, nothing pruned and
# nothing scaled. `None`: any value does (epsilon prunes nothing once density is 1).
AT_A_SOURCE: dict[str, Optional[float]] = {
    "density": 1.0,
    "lambda": 1.0,
    "gamma": 0.0,
    "epsilon": None,
    "lines.alpha": 1.0,  # a LiNeS schedule of alpha 1, beta 0 scales nothing
    "lines.beta": 0.0,
}
LINES = {"lines.alpha": 1.0, "lines.beta": 0.0}  # searchable schedule genes, and their neutral
WEIGHTED = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "nuslerp", "multislerp",
}  # fmt: skip


class GeneRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    init: Optional[float] = None

    @model_validator(mode="after")
    def _ordered(self) -> GeneRange:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"bounds [{self.low}, {self.high}] must be finite with low < high")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} lies outside [{self.low}, {self.high}]")
        return self

    @property
    def start(self) -> float:
        return self.init if self.init is not None else (self.low + self.high) / 2


class ParameterSpaceSpec(BaseModel):
    """What a PS search-space file holds."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "parameter"
    method: str
    models: Optional[list[str]] = None  # names from the run's `models`; default: all but base
    parameters: dict[str, GeneRange] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)  # method parameters held constant
    layer_groups: int = Field(default=1, ge=1)
    # gradient: values blend linearly across depth; blocks: each group owns its layers outright
    # slices: like blocks, each group a mergekit slice (the final norm and head follow the last)
    layer_shape: Literal["gradient", "blocks", "slices"] = "gradient"
    filters: list[str] = Field(default_factory=list)  # e.g. [self_attn, mlp]; the rest follow
    dtype: Optional[str] = None
    # a learned method (dam, adamerging): the coefficient file its `scale` genes tune; default
    # the run's own learned merge of that method (learned before the first candidate)
    coefficients: Optional[str] = None


class ParameterSpace(SearchSpace):
    kind = "parameter"

    def __init__(
        self,
        spec: ParameterSpaceSpec,
        models: dict[str, str],
        base: Optional[str],
        depth_of: Callable[[str], int],
    ):
        self.spec = spec
        method = get_method(spec.method)
        names = experts_named(spec.models, models, base)
        if method.base == "required" and base is None:
            raise EvomergeError(
                f"field 'base_model': merge method {method.name} needs a base model"
            )
        inputs = len(names) + (1 if method.base != "ignored" and base not in names else 0)
        if method.max_inputs is not None and inputs > method.max_inputs:
            raise EvomergeError(
                f"field 'search_space.models': {method.name} merges at most "
                f"{method.max_inputs} models (base included); name the expert(s) to use"
            )
        self.models, self.refs, self.base = names, models, base
        known = {p.name: p for p in method.params}
        for key in [*spec.parameters, *spec.fixed]:
            if key in LINES and method.task_vector:
                continue
            if key not in known:
                takes = sorted(known) + (sorted(LINES) if method.task_vector else [])
                raise EvomergeError(
                    f"field 'search_space.parameters.{key}': {method.name} has no parameter "
                    f"{key!r}; it takes {', '.join(takes)}"
                )
        # the LiNeS schedule: one gene each, whatever the filters and layer groups
        self.lines = [k for k in spec.parameters if k in LINES]
        self.statistics: Optional[str] = None  # a run names its statistics folder here
        self.coefficients: Optional[str] = spec.coefficients  # or the run's learned file
        if spec.coefficients is not None and not method.learned:
            raise EvomergeError(
                f"field 'search_space.coefficients': {method.name} reads no learned "
                "coefficients; use it with dam or adamerging"
            )
        known.update({k: Param(k, float, "shared", v) for k, v in LINES.items()})
        self.shared = [k for k in spec.parameters if known[k].scope == "shared" and k not in LINES]
        self.per_model = [k for k in spec.parameters if known[k].scope != "shared"]
        self.method = method
        self.blocks = [*spec.filters, None]  # None: the rest
        depth = depth_of(base if base is not None else names[0])
        self.depth = depth
        if spec.layer_groups > depth:
            raise EvomergeError(
                f"field 'search_space.layer_groups': {spec.layer_groups} groups for models "
                f"of {depth} layers; use at most {depth}"
            )
        size = (len(self.shared) + len(self.per_model) * len(names)) * len(self.blocks)
        size *= spec.layer_groups  # arithmetic only: nothing is allocated yet
        if size > MAX_GENES:
            raise EvomergeError(
                f"field 'search_space': {size:,} genes is more than {MAX_GENES:,}; use fewer "
                "layer_groups or filters"
            )

    # ----- layout --------------------------------------------------------------------------
    def _genes(self) -> list[tuple[Optional[str], str, Optional[str], int]]:
        """(model or None for shared, parameter, filter, layer group), in genome order."""
        genes = []
        owners: list[tuple[Optional[str], list[str]]] = [(None, self.shared)]
        owners += [(m, self.per_model) for m in self.models]
        for owner, params in owners:
            for param in params:
                for block in self.blocks:
                    for group in range(self.spec.layer_groups):
                        genes.append((owner, param, block, group))
        genes += [(None, key, None, 0) for key in self.lines]
        return genes

    def gene_names(self) -> list[str]:
        names = []
        for owner, param, block, group in self._genes():
            name = f"{owner}.{param}" if owner else param
            if param in LINES:
                names.append(name)
                continue
            if block is not None or self.spec.filters:
                name += f"[{block or 'rest'}]"
            if self.spec.layer_groups > 1:
                name += f"@{group}"
            names.append(name)
        return names

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        genes = self._genes()
        lo = np.array([self.spec.parameters[p].low for _, p, _, _ in genes])
        hi = np.array([self.spec.parameters[p].high for _, p, _, _ in genes])
        return lo, hi

    def initial(self) -> np.ndarray:
        return np.array([self.spec.parameters[p].start for _, p, _, _ in self._genes()])

    def model_names(self) -> list[str]:
        return [*([self.base] if self.base is not None else []), *self.models]

    def must_plan(self) -> list[tuple[str, SearchSpace, np.ndarray]]:
        low, high = self.bounds()
        return [
            *super().must_plan(),
            ("the low end of its ranges", self, low),
            ("the high end of its ranges", self, high),
        ]

    # ----- the sources as genomes ---------------------------------------------------------------
    def source_genomes(self) -> list[tuple[str, np.ndarray]]:
        """A weighted merge is a source when that source's weight is 1 and every other one 0
        (the base: all 0, for methods that add task vectors to it); slerp is its base at t = 0
        and its expert at t = 1. A source whose values lie outside the genes' bounds, or that a
        fixed parameter rules out, is not expressible."""
        if self.method.name in WEIGHTED:
            names = list(self.models)
            if self.base is not None and self.method.base == "required":
                names.append(self.base)
        elif self.method.name == "slerp" and self.base is not None:
            names = [self.base, *self.models]
        else:
            return []
        found = []
        for name in names:
            genome = self._genome_at(name)
            if genome is not None:
                found.append((name, genome))
        return found

    def _genome_at(self, source: str) -> Optional[np.ndarray]:
        for param, value in self.spec.fixed.items():
            if param in ("weight", "t") or AT_A_SOURCE.get(param, value) not in (None, value):
                return None
        start = self.initial()
        low, high = self.bounds()
        genome = np.empty_like(start)
        for k, (owner, param, _block, _group) in enumerate(self._genes()):
            if param == "weight":
                value: Optional[float] = 1.0 if owner == source else 0.0
            elif param == "t":
                value = 0.0 if source == self.base else 1.0
            elif param in AT_A_SOURCE:
                value = AT_A_SOURCE[param]
            else:
                return None  # a parameter with no known neutral value
            value = start[k] if value is None else value
            if not low[k] <= value <= high[k]:
                return None
            genome[k] = value
        return genome

    def genome_of(self, recipe: Recipe) -> Optional[np.ndarray]:
        """A recipe of this space's method over its models (and base), with one scalar per
        searched parameter and the fixed ones as fixed, inside the bounds: e.g. the
        task_arithmetic and ties baselines in a space of those methods."""
        if recipe.merge_method != self.method.name or recipe.slices or recipe.path:
            return None
        if not isinstance(recipe.models, list):
            return None
        base = self.refs[self.base] if self.base is not None else None
        if self.method.base != "ignored" and recipe.base_model != base:
            return None
        given = {m.model: m.parameters or {} for m in recipe.models if m.model != base}
        if sorted(given) != sorted(self.refs[m] for m in self.models):
            return None
        shared = recipe.parameters or {}
        if any(shared.get(k, v) != v for k, v in self.spec.fixed.items()):
            return None
        defaults = {p.name: p.default for p in self.method.params} | LINES
        if recipe.lines is not None:  # a scheduled baseline: only a neutral one
            defaults |= {f"lines.{k}": v for k, v in recipe.lines.model_dump().items()}
        # a setting the space leaves at its default must be at that default in the recipe
        for k in set(shared) - set(self.spec.fixed) - set(self.shared):
            if shared[k] != defaults.get(k):
                return None
        for parameters in given.values():
            for k in set(parameters) - set(self.per_model) - set(self.spec.fixed):
                if parameters[k] != defaults.get(k):
                    return None
        low, high = self.bounds()
        genome = np.empty(len(low))
        for k, (owner, param, _block, _group) in enumerate(self._genes()):
            source = shared if owner is None else given[self.refs[owner]]
            value = source.get(param, defaults.get(param))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None  # per-layer lists, filters, or no value at all
            if not low[k] <= value <= high[k]:
                return None
            genome[k] = float(value)
        return genome

    # ----- decode -----------------------------------------------------------------------------
    def block_of_layers(self) -> list[int]:
        """The layer group that owns each layer under `layer_shape: blocks`: contiguous, and as
        even as the depth allows."""
        groups = self.spec.layer_groups
        return [(layer * groups) // self.depth for layer in range(self.depth)]

    def settings(
        self, genome: np.ndarray, group: Optional[int] = None
    ) -> dict[Optional[str], dict[str, Any]]:
        """Per owner (model, or None for shared), each parameter's mergekit setting (of one
        layer group's genes only, where `group` names it)."""
        x = np.asarray(genome, dtype=float)
        genes = self._genes()
        if x.shape != (len(genes),):
            raise EvomergeError(f"genome has shape {x.shape}; the space has {len(genes)} genes")
        values: dict[tuple[Optional[str], str, Optional[str]], list[float]] = {}
        for value, (owner, param, block, at) in zip(x, genes):
            if group is not None and at != group and param not in LINES:
                continue
            values.setdefault((owner, param, block), []).append(round(float(value), 8))
        out: dict[Optional[str], dict[str, Any]] = {}
        for (owner, param, block), series in values.items():
            if len(series) > 1 and self.spec.layer_shape == "blocks":
                series = [series[g] for g in self.block_of_layers()]
            value: Any = series[0] if len(series) == 1 else series
            target = out.setdefault(owner, {})
            if not self.spec.filters or param in LINES:
                target[param] = value
            else:
                entry = {"value": value} if block is None else {"filter": block, "value": value}
                target.setdefault(param, []).append(entry)
        return out

    def decode(self, genome: np.ndarray, seed: int = 0) -> Recipe:
        settings = self.settings(genome)
        shared = {**self.spec.fixed, **settings.get(None, {})}
        lines = {k.removeprefix("lines."): shared.pop(k, v) for k, v in LINES.items()}
        models = [{"model": self.refs[m], "parameters": settings.get(m, {})} for m in self.models]
        data: dict[str, Any] = {
            "merge_method": self.method.name,
            "models": models,
            "seed": int(seed),
        }
        if self.base is not None and self.method.base != "ignored":
            data["base_model"] = self.refs[self.base]
        if self.method.name in ("slerp", "nuslerp") and self.base is not None:
            data["models"] = [{"model": self.refs[self.base]}, *models]
        if self.spec.layer_shape == "slices":
            shared = {k: v for k, v in shared.items() if k in self.spec.fixed or k in LINES}
            data["slices"] = self._slices(genome, [m["model"] for m in data.pop("models")])
        if shared:
            data["parameters"] = shared
        if self.spec.dtype:
            data["dtype"] = self.spec.dtype
        if self.lines or any(k in self.spec.fixed for k in LINES):
            data["lines"] = lines
        if self.method.statistics and self.statistics:
            data["statistics"] = self.statistics
        if self.method.learned and self.coefficients:
            data["coefficients"] = self.coefficients
        return Recipe.from_dict(data, source="search space")

    def _slices(self, genome: np.ndarray, refs: list[str]) -> list[dict[str, Any]]:
        """One mergekit slice per layer group: its own layers, its own scalar values (the
        base, where the method takes one, a source without parameters, as mergekit-evolve
        writes it)."""
        owners = {self.refs[m]: m for m in self.models}
        groups = self.block_of_layers()
        out = []
        for group in range(self.spec.layer_groups):
            layers = [i for i, g in enumerate(groups) if g == group]
            span = [layers[0], layers[-1] + 1]
            settings = self.settings(genome, group)
            sources = []
            for ref in refs:
                source: dict[str, Any] = {"model": ref, "layer_range": span}
                if ref in owners and settings.get(owners[ref]):
                    source["parameters"] = settings[owners[ref]]
                sources.append(source)
            base = self.refs[self.base] if self.base is not None else None
            if base is not None and self.method.base != "ignored" and base not in refs:
                sources.append({"model": base, "layer_range": span})
            part: dict[str, Any] = {"sources": sources}
            shared = {k: v for k, v in settings.get(None, {}).items() if k not in LINES}
            if shared:
                part["parameters"] = shared
            out.append(part)
        return out
