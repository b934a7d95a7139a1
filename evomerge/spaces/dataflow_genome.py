"""The data-flow genome of Akiba et al. (evolutionary model merge): which layers, in which order,
with which scale on the stream.

The source models' layers are laid end to end (M layers in all; `layout: interleaved` orders
them by depth instead, layer 0 of every model, then layer 1, ..., so that taking layer k from
the other model is a move of two slots) and that sequence is repeated r times, giving
T = M x r slots. The genome holds an indicator per slot (slot t is on the path when
I_t > 0; its layer is t mod M) followed by the scaling genes. W[i, j] is the scale applied to the
stream entering layer j when the previous layer on the path was i; the first layer reads the
embeddings unscaled. W is stored as log2 scales, in one of these forms:

- full:      M x M genes, W[i, j] = 2 ** g[i, j] (the paper's matrix);
- per_layer: M genes, W[i, j] = 2 ** g[j] (one scale per entered layer, whatever came before);
- low_rank:  2 x M x k genes, W = 2 ** (U V^T) (for large M, where M x M is too many);
- none:      no genes, every scale is 1.

Decoding is pure: the same genome always gives the same path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.recipe import PathStep
from evomerge.spaces.base import MAX_GENES

ScalingForm = Literal["full", "per_layer", "low_rank", "none"]
Layout = Literal["end_to_end", "interleaved"]


@dataclass(frozen=True)
class DataflowGenome:
    """Genome layout for paths over `models` (name, depth), in the order they are laid out."""

    models: tuple[tuple[str, int], ...]
    repetitions: int = 2
    scaling: ScalingForm = "full"
    rank: int = 2
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    indicator_bounds: tuple[float, float] = (-1.0, 1.0)
    sigma: float = 0.1  # the optimizer's initial step; the paper initialises "on" slots at +2σ
    max_layers: Optional[int] = None  # longest path: the strongest slots are kept beyond it
    layout: Layout = "end_to_end"

    def __post_init__(self) -> None:
        if not self.models or any(depth < 1 for _, depth in self.models):
            raise EvomergeError("dataflow.models: give at least one model with at least one layer")
        if self.repetitions < 1:
            raise EvomergeError("dataflow.repetitions: must be >= 1")
        if self.max_layers is not None and self.max_layers < 1:
            raise EvomergeError("dataflow.max_layers: must be >= 1")
        if self.scaling == "low_rank" and self.rank < 1:
            raise EvomergeError("dataflow.rank: must be >= 1 for scaling: low_rank")
        lo, hi = self.scale_bounds
        if not (0 < lo <= 1 <= hi < math.inf):
            raise EvomergeError(
                f"dataflow.scale_bounds: [{lo}, {hi}] must satisfy 0 < low <= 1 <= high"
            )
        ilo, ihi = self.indicator_bounds
        if not (ilo < 0 < ihi):
            raise EvomergeError("dataflow.indicator_bounds: must straddle 0, e.g. [-1, 1]")
        size = self.slots + self.scaling_size  # arithmetic only: nothing is allocated yet
        if size > MAX_GENES:
            raise EvomergeError(
                f"dataflow: {size:,} genes ({self.slots:,} slots, {self.scaling} scaling) is more "
                f"than {MAX_GENES:,}; lower repetitions or rank, or use per_layer scaling"
            )

    # ----- layout ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[tuple[str, int]]:
        """The M layers in slot order: (model, layer index within it)."""
        if self.layout == "interleaved":
            deepest = max(depth for _, depth in self.models)
            return [
                (name, layer)
                for layer in range(deepest)
                for name, depth in self.models
                if layer < depth
            ]
        return [(name, layer) for name, depth in self.models for layer in range(depth)]

    @property
    def num_layers(self) -> int:
        return sum(depth for _, depth in self.models)

    @property
    def slots(self) -> int:
        return self.num_layers * self.repetitions

    @property
    def scaling_size(self) -> int:
        m = self.num_layers
        return {"full": m * m, "per_layer": m, "low_rank": 2 * m * self.rank, "none": 0}[
            self.scaling
        ]

    @property
    def size(self) -> int:
        return self.slots + self.scaling_size

    def gene_names(self) -> list[str]:
        names = [f"I[{t}]" for t in range(self.slots)]
        m = self.num_layers
        if self.scaling == "full":
            names += [f"log2W[{i},{j}]" for i in range(m) for j in range(m)]
        elif self.scaling == "per_layer":
            names += [f"log2W[{j}]" for j in range(m)]
        elif self.scaling == "low_rank":
            names += [f"U[{i},{k}]" for i in range(m) for k in range(self.rank)]
            names += [f"V[{j},{k}]" for j in range(m) for k in range(self.rank)]
        return names

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.empty(self.size), np.empty(self.size)
        lo[: self.slots], hi[: self.slots] = self.indicator_bounds
        if self.scaling in ("full", "per_layer"):
            lo[self.slots :] = math.log2(self.scale_bounds[0])
            hi[self.slots :] = math.log2(self.scale_bounds[1])
        elif self.scaling == "low_rank":  # U V^T reaches the log-scale bounds with |u|,|v| <= 1
            reach = math.sqrt(
                max(-math.log2(self.scale_bounds[0]), math.log2(self.scale_bounds[1]))
            )
            lo[self.slots :], hi[self.slots :] = -max(reach, 1e-3), max(reach, 1e-3)
        return lo, hi

    def initial(self) -> np.ndarray:
        """The paper's start: every slot off except the first model's layers in the first
        repetition; on at +2σ and off at -2σ, so that a step of σ flips a few slots (a local
        move) rather than half of them; every scale 1."""
        x = np.zeros(self.size)
        first = self.models[0][0]
        for t, (name, _layer) in enumerate(self.layers):
            x[t] = 2 * self.sigma if name == first else -2 * self.sigma
        x[self.num_layers : self.slots] = -2 * self.sigma
        return x

    def step_sizes(self) -> np.ndarray:
        """The optimizer's first step on each gene: σ on indicators and on log2 scales."""
        return np.full(self.size, self.sigma)

    # ----- genome -> path ----------------------------------------------------------------------
    def scale_matrix(self, genome: np.ndarray) -> np.ndarray:
        """W (M x M), clipped to `scale_bounds`."""
        g = self._check(genome)[self.slots :]
        m = self.num_layers
        if self.scaling == "full":
            log_w = g.reshape(m, m)
        elif self.scaling == "per_layer":
            log_w = np.broadcast_to(g, (m, m))
        elif self.scaling == "low_rank":
            u = g[: m * self.rank].reshape(m, self.rank)
            v = g[m * self.rank :].reshape(m, self.rank)
            log_w = u @ v.T
        else:
            log_w = np.zeros((m, m))
        lo, hi = self.scale_bounds
        return np.clip(np.exp2(log_w), lo, hi)

    def decode(self, genome: np.ndarray) -> list[PathStep]:
        """The path a genome describes. A genome with every slot off keeps its strongest slot,
        so that every genome is a model; one with more than `max_layers` slots on keeps the
        strongest `max_layers` of them (ties to the earlier slot), in slot order, so that no
        candidate is deeper than the live model's memory was planned for."""
        x = self._check(genome)
        indicator = x[: self.slots]
        on = [t for t in range(self.slots) if indicator[t] > 0]
        if not on:
            on = [int(np.argmax(indicator))]
        if self.max_layers is not None and len(on) > self.max_layers:
            on = sorted(sorted(on, key=lambda t: -indicator[t])[: self.max_layers])
        w = self.scale_matrix(x)
        layers = self.layers
        m = self.num_layers
        path, previous = [], None
        for t in on:
            j = t % m
            model, layer = layers[j]
            scale = 1.0 if previous is None else float(w[previous, j])
            path.append(PathStep(model=model, layer=layer, scale=scale))
            previous = j
        return path

    # ----- path -> genome ------------------------------------------------------------------------
    def encode(self, path: list[PathStep], off: Optional[float] = None) -> np.ndarray:
        """A genome that decodes to `path` (used to seed a search with a known model). The path
        must follow slot order, and its scales must fit the scaling form."""
        if not path:
            raise EvomergeError("dataflow: cannot encode an empty path")
        if self.max_layers is not None and len(path) > self.max_layers:
            raise EvomergeError(
                f"dataflow: a path of {len(path)} layers is longer than max_layers "
                f"{self.max_layers}"
            )
        on = self.sigma * 2
        x = np.full(self.size, -on if off is None else off)
        x[self.slots :] = 0.0
        position = {layer: j for j, layer in enumerate(self.layers)}
        m = self.num_layers
        t, previous = 0, None
        log_w: dict[tuple[int, int], float] = {}
        for i, step in enumerate(path):
            j = position.get((step.model, step.layer))
            if j is None:
                raise EvomergeError(
                    f"path.{i}: {step.model} layer {step.layer} is not in the space"
                )
            while t < self.slots and t % m != j:
                t += 1
            if t >= self.slots:
                raise EvomergeError(
                    f"path.{i}: needs more than {self.repetitions} repetitions of the layers"
                )
            x[t] = on
            t += 1
            lo, hi = self.scale_bounds
            if not lo <= step.scale <= hi:
                raise EvomergeError(f"path.{i}: scale {step.scale} is outside [{lo}, {hi}]")
            if previous is not None:
                key = (previous, j) if self.scaling == "full" else (0, j)
                value = math.log2(step.scale)
                if not math.isclose(log_w.setdefault(key, value), value, abs_tol=1e-12):
                    raise EvomergeError(
                        f"path.{i}: scale {step.scale} conflicts with an earlier step that "
                        f"the '{self.scaling}' scaling form shares it with"
                    )
            elif step.scale != 1.0:
                raise EvomergeError("path.0: the first layer reads the embeddings unscaled")
            previous = j
        if self.scaling == "none" and any(v != 0 for v in log_w.values()):
            raise EvomergeError("dataflow: scaling 'none' cannot hold scales other than 1")
        if self.scaling == "low_rank" and any(v != 0 for v in log_w.values()):
            raise EvomergeError("dataflow: low_rank scaling cannot encode arbitrary scales")
        for (i, j), value in log_w.items():
            if self.scaling == "full":
                x[self.slots + i * m + j] = value
            elif self.scaling == "per_layer":
                x[self.slots + j] = value
        return x

    def _check(self, genome: np.ndarray) -> np.ndarray:
        x = np.asarray(genome, dtype=float)
        if x.shape != (self.size,):
            raise EvomergeError(f"dataflow genome has shape {x.shape}; expected ({self.size},)")
        if not np.all(np.isfinite(x)):
            raise EvomergeError("dataflow genome has non-finite values")
        return x
