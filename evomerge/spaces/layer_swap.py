"""Layer swapping: which expert owns each contiguous block of layers, where the blocks meet, and
how wide the blend is at each boundary (Bandarkar et al., "Layer Swapping for Zero-Shot
Cross-Lingual Transfer", as a search space).

The depth is cut into `segments` blocks at searched positions; each block's layers take the
task vector (`task_arithmetic`, over a base) or the whole weights (`linear`) of the expert that
owns it. At a boundary the owners blend linearly over `transition` layers (0: a sharp swap).
Tensors outside the layers (embeddings, final norm, head) follow the lowest block's owner.

Genes, in genome order: `cut[k]` (k = 1 .. segments - 1, a fraction of the depth; cuts are
sorted on decode), `owner[s]` (s = 0 .. segments - 1, in [0, M): the floor is the expert's
index), `transition` when it is searched, then `<expert>.scale` per expert when `scale` is given
(its task vector's weight where it owns a layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.spaces.base import SearchSpace, experts_named
from evomerge.spaces.parameter import GeneRange


class LayerSwapSpec(BaseModel):
    """What a layer-swap search-space file holds."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "layer_swap"
    method: Literal["task_arithmetic", "linear"] = "task_arithmetic"
    models: Optional[list[str]] = Field(default=None, min_length=2)  # default: all but base
    segments: int = Field(default=3, ge=1, le=256)
    owners: Optional[list[str]] = None  # the start's owner of each segment; default alternating
    transition: Union[float, GeneRange] = 0.0  # layers; a range makes it a gene
    scale: Optional[GeneRange] = None  # one gene per expert (task_arithmetic only)
    dtype: Optional[str] = None


class LayerSwapSpace(SearchSpace):
    kind = "layer_swap"

    def __init__(
        self,
        spec: LayerSwapSpec,
        models: dict[str, str],
        base: Optional[str],
        depth_of: Callable[[str], int],
    ) -> None:
        names = experts_named(spec.models, models, base)
        if len(names) < 2:
            raise EvomergeError(
                "field 'search_space.models': a layer swap needs at least two experts"
            )
        if spec.method == "task_arithmetic" and base is None:
            raise EvomergeError(
                "field 'base_model': a task_arithmetic layer swap adds task vectors to a base; "
                "set base_model or use method: linear"
            )
        if spec.scale is not None and spec.method != "task_arithmetic":
            raise EvomergeError(
                "field 'search_space.scale': scales weight task vectors; use it with "
                "method: task_arithmetic"
            )
        owners = spec.owners or [names[s % len(names)] for s in range(spec.segments)]
        if len(owners) != spec.segments:
            raise EvomergeError(
                f"field 'search_space.owners': {len(owners)} owners for {spec.segments} "
                "segments; give one per segment"
            )
        stray = [o for o in owners if o not in names]
        if stray:
            raise EvomergeError(
                f"field 'search_space.owners': {stray[0]!r} is not one of the experts "
                f"({', '.join(names)})"
            )
        self.depth = depth_of(names[0])
        if spec.segments > self.depth:
            raise EvomergeError(
                f"field 'search_space.segments': {spec.segments} segments for models of "
                f"{self.depth} layers; use at most {self.depth}"
            )
        width = spec.transition.high if isinstance(spec.transition, GeneRange) else spec.transition
        if not 0 <= width <= self.depth:
            raise EvomergeError(
                f"field 'search_space.transition': {width} layers; use 0 to {self.depth}"
            )
        self.spec, self.models, self.refs, self.base = spec, names, models, base
        self.owners = owners

    # ----- layout --------------------------------------------------------------------------
    @property
    def searched_transition(self) -> bool:
        return isinstance(self.spec.transition, GeneRange)

    def gene_names(self) -> list[str]:
        names = [f"cut[{k}]" for k in range(1, self.spec.segments)]
        names += [f"owner[{s}]" for s in range(self.spec.segments)]
        names += ["transition"] if self.searched_transition else []
        names += [f"{m}.scale" for m in self.models] if self.spec.scale is not None else []
        return names

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        cuts, segments = self.spec.segments - 1, self.spec.segments
        low = [0.0] * cuts + [0.0] * segments
        high = [1.0] * cuts + [float(len(self.models))] * segments
        if isinstance(self.spec.transition, GeneRange):
            low.append(self.spec.transition.low)
            high.append(self.spec.transition.high)
        if self.spec.scale is not None:
            low += [self.spec.scale.low] * len(self.models)
            high += [self.spec.scale.high] * len(self.models)
        return np.array(low), np.array(high)

    def _genome(self, owners: list[str], scale: Optional[float] = None) -> np.ndarray:
        segments = self.spec.segments
        genes = [k / segments for k in range(1, segments)]
        genes += [self.models.index(o) + 0.5 for o in owners]
        if isinstance(self.spec.transition, GeneRange):
            genes.append(self.spec.transition.start)
        if self.spec.scale is not None:
            start = self.spec.scale.start if scale is None else scale
            genes += [start] * len(self.models)
        return np.array(genes, dtype=float)

    def initial(self) -> np.ndarray:
        return self._genome(self.owners)

    def model_names(self) -> list[str]:
        return [*([self.base] if self.spec.method == "task_arithmetic" else []), *self.models]

    def source_genomes(self) -> list[tuple[str, np.ndarray]]:
        """Every segment owned by one expert, its scale 1: that expert, unchanged."""
        if self.spec.scale is not None and not self.spec.scale.low <= 1.0 <= self.spec.scale.high:
            return []
        segments = self.spec.segments
        return [(m, self._genome([m] * segments, scale=1.0)) for m in self.models]

    # ----- decode -----------------------------------------------------------------------------
    def layer_weights(self, genome: np.ndarray) -> dict[str, list[float]]:
        """Each expert's weight at each layer: its share of the window of `transition` layers
        around the layer's centre that blocks it owns hold, times its scale."""
        x = np.asarray(genome, dtype=float)
        size = len(self.gene_names())
        if x.shape != (size,) or not np.all(np.isfinite(x)):
            raise EvomergeError(f"genome has shape {x.shape}; the space has {size} finite genes")
        segments, m = self.spec.segments, len(self.models)
        cuts = np.sort(np.clip(x[: segments - 1], 0.0, 1.0)) * self.depth
        owner_genes = x[segments - 1 : 2 * segments - 1]
        owners = [min(m - 1, max(0, int(math.floor(g)))) for g in owner_genes]
        k = 2 * segments - 1
        if isinstance(self.spec.transition, GeneRange):
            width, k = max(0.0, float(x[k])), k + 1
        else:
            width = float(self.spec.transition)
        scales = [float(s) for s in x[k : k + m]] if self.spec.scale is not None else [1.0] * m
        edges = [-math.inf, *cuts.tolist(), math.inf]
        weights = {name: [0.0] * self.depth for name in self.models}
        for layer in range(self.depth):
            centre = layer + 0.5
            for s, owner in enumerate(owners):
                lo, hi = edges[s], edges[s + 1]
                if width <= 0:
                    share = 1.0 if lo <= centre < hi else 0.0
                else:
                    a, b = max(lo, centre - width / 2), min(hi, centre + width / 2)
                    share = max(0.0, b - a) / width
                weights[self.models[owner]][layer] += share
        return {
            name: [round(w * scale, 8) for w in weights[name]]
            for name, scale in zip(self.models, scales)
        }

    def decode(self, genome: np.ndarray, seed: int = 0) -> Recipe:
        weights = self.layer_weights(genome)
        models = [
            {"model": self.refs[name], "parameters": {"weight": _compact(weights[name])}}
            for name in self.models
        ]
        data: dict[str, Any] = {"merge_method": self.spec.method, "models": models, "seed": seed}
        if self.spec.method == "task_arithmetic":
            data["base_model"] = self.refs[self.base]
        if self.spec.dtype:
            data["dtype"] = self.spec.dtype
        return Recipe.from_dict(data, source="search space")


def _compact(values: list[float]) -> Union[float, list[float]]:
    """A per-layer list, or its one value where every layer has the same."""
    return values[0] if all(v == values[0] for v in values) else values
