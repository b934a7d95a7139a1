"""Data-flow (DFS) and PS-then-DFS search spaces over `DataflowGenome`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.recipe import PathStep, Recipe
from evomerge.spaces.base import SearchSpace
from evomerge.spaces.dataflow_genome import DataflowGenome, Layout, ScalingForm
from evomerge.spaces.parameter import ParameterSpace, ParameterSpaceSpec

MERGED = "merged"  # in a ps_dfs space, the name of the parameter-space stage's result
# the first step on a searched `embed_from` gene (bins of width 1, starting mid-bin): about
# one candidate in three tries another model's embeddings, so a budget of ten tries them
EMBED_STEP = 1.0


class DataflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = "dataflow"
    # laid end to end in this order; the first is the paper's model A. Default: the run's models
    # (in a ps_dfs space: the PS result `merged`, then the run's models)
    models: Optional[list[str]] = Field(default=None, min_length=1)
    # whose embeddings, final norm and head the path reads: one model, or several to search
    # over (one more gene; the first listed is the start). Default: the first of `models`
    embed_from: Optional[str | list[str]] = None
    repetitions: int = Field(default=2, ge=1)
    scaling: ScalingForm = "full"
    rank: int = Field(default=2, ge=1)
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    sigma: float = Field(default=0.1, gt=0)
    # longest path a candidate may have; default: twice the deepest model of the space
    max_layers: Optional[int] = Field(default=None, ge=1)
    # end_to_end: the paper's slot order; interleaved: by depth, so a layer taken from the other
    # model is a local move
    layout: Layout = "end_to_end"
    dtype: Optional[str] = None


class CombinedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = "ps_dfs"
    parameter: ParameterSpaceSpec
    dataflow: DataflowSpec


class DataflowSpace(SearchSpace):
    kind = "dataflow"

    def __init__(
        self,
        spec: DataflowSpec,
        models: dict[str, Any],
        depth_of: Callable[[str], int],
    ) -> None:
        if spec.models is None:
            spec = spec.model_copy(update={"models": list(models)})
        for name in spec.models:
            if name not in models:
                raise EvomergeError(
                    f"field 'search_space.models': {name!r} is not a key of the run's 'models'"
                )
        embeds = spec.models[0] if spec.embed_from is None else spec.embed_from
        self.embeds = [embeds] if isinstance(embeds, str) else list(embeds)
        for name in self.embeds:
            if name not in models:
                raise EvomergeError(
                    f"field 'search_space.embed_from': {name!r} is not a key of the run's 'models'"
                )
        if not self.embeds or len(set(self.embeds)) < len(self.embeds):
            raise EvomergeError(
                "field 'search_space.embed_from': name one model, or several without repeats"
            )
        self.spec, self.models = spec, models
        depths = tuple((name, depth_of(name)) for name in spec.models)
        self.genome = DataflowGenome(
            depths,
            max_layers=spec.max_layers or 2 * max(depth for _, depth in depths),
            repetitions=spec.repetitions,
            scaling=spec.scaling,
            rank=spec.rank,
            scale_bounds=tuple(spec.scale_bounds),
            sigma=spec.sigma,
            layout=spec.layout,
        )

    @property
    def searches_embeddings(self) -> bool:
        """Whether a gene (the last) picks whose embeddings the path reads."""
        return len(self.embeds) > 1

    def gene_names(self) -> list[str]:
        return self.genome.gene_names() + (["embed_from"] if self.searches_embeddings else [])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = self.genome.bounds()
        if self.searches_embeddings:
            low, high = np.append(low, 0.0), np.append(high, float(len(self.embeds)))
        return low, high

    def _with_embeddings(self, genes: np.ndarray, name: str) -> np.ndarray:
        """The genome's genes and, where searched, the `embed_from` gene at the middle of
        `name`'s bin."""
        if not self.searches_embeddings:
            return genes
        return np.append(genes, self.embeds.index(name) + 0.5)

    def initial(self) -> np.ndarray:
        return self._with_embeddings(self.genome.initial(), self.embed_from)

    def step_sizes(self) -> Optional[np.ndarray]:
        steps = self.genome.step_sizes()
        return np.append(steps, EMBED_STEP) if self.searches_embeddings else steps

    @property
    def embed_from(self) -> str:
        """The embeddings the search starts from."""
        return self.embeds[0]

    def embeddings_of(self, genome: np.ndarray) -> str:
        if not self.searches_embeddings:
            return self.embed_from
        k = int(np.floor(np.asarray(genome, dtype=float)[-1]))
        return self.embeds[min(max(k, 0), len(self.embeds) - 1)]

    def own_path(self, name: str) -> np.ndarray:
        """The genome of model `name`'s own layers in order, every scale 1, with its own
        embeddings where the search picks among them (else those of `embed_from`)."""
        depth = dict(self.genome.models)[name]
        path = self.genome.encode([PathStep(model=name, layer=k) for k in range(depth)])
        return self._with_embeddings(path, name if name in self.embeds else self.embed_from)

    def model_names(self) -> list[str]:
        return [n for n in dict.fromkeys([*self.spec.models, *self.embeds]) if n != MERGED]

    def must_plan(self) -> list[tuple[str, SearchSpace, np.ndarray]]:
        """The start, and the start with each other model's embeddings (their shapes must fit
        the path's layers)."""
        start = self.initial()
        planned = super().must_plan()
        for k, name in enumerate(self.embeds[1:], start=1):
            x = start.copy()
            x[-1] = k + 0.5
            planned.append((f"embed_from {name}", self, x))
        return planned

    def source_genomes(self) -> list[tuple[str, np.ndarray]]:
        """A path keeps the embeddings, final norm and head of the model it reads them from, so
        a model is a source here only with its own: its own layers, in order, unscaled."""
        found = []
        for name in self.embeds:
            if name == MERGED or name not in self.spec.models:
                continue
            with contextlib.suppress(EvomergeError):  # a scaling form without all-ones scales
                found.append((name, self.own_path(name)))
        return found

    def decode(self, genome: np.ndarray, seed: int = 0) -> Recipe:
        x = np.asarray(genome, dtype=float)
        path = self.genome.decode(x[: self.genome.size])
        embeds = self.embeddings_of(x)
        used = dict.fromkeys([embeds, *(s.model for s in path)])
        data: dict[str, Any] = {
            "merge_method": "dataflow",
            "embed_from": embeds,
            "models": {name: self.models[name] for name in used},
            "path": [step.model_dump() for step in path],
            "seed": int(seed),
        }
        if self.spec.dtype:
            data["dtype"] = self.spec.dtype
        return Recipe.from_dict(data, source="search space")


class CombinedSpace(SearchSpace):
    """PS then DFS: the genome is the PS genes followed by the DFS genes; the path may read the
    PS result under the name `merged`."""

    kind = "ps_dfs"

    def __init__(
        self,
        spec: CombinedSpec,
        models: dict[str, str],
        base: Optional[str],
        depth_of: Callable[[str], int],
    ) -> None:
        if MERGED in models:
            raise EvomergeError(
                f"field 'models': {MERGED!r} is reserved for the PS result in a ps_dfs space"
            )
        self.ps = ParameterSpace(spec.parameter, models, base, depth_of)
        donor = base or self.ps.models[0]
        names = {MERGED: MERGED, **models}
        self.dfs = DataflowSpace(
            spec.dataflow, names, lambda n: depth_of(donor if n == MERGED else n)
        )
        self.split = self.ps.size

    def gene_names(self) -> list[str]:
        return [f"ps.{n}" for n in self.ps.gene_names()] + [
            f"dfs.{n}" for n in self.dfs.gene_names()
        ]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        (a, b), (c, d) = self.ps.bounds(), self.dfs.bounds()
        return np.concatenate([a, c]), np.concatenate([b, d])

    def initial(self) -> np.ndarray:
        return np.concatenate([self.ps.initial(), self.dfs.initial()])

    def step_sizes(self) -> Optional[np.ndarray]:
        """The PS part's own steps (a quarter of each gene's range unless it says otherwise),
        then the DFS part's σ."""
        ps = self.ps.step_sizes()
        if ps is None:
            low, high = self.ps.bounds()
            ps = (high - low) / 4
        return np.concatenate([ps, self.dfs.step_sizes()])

    def model_names(self) -> list[str]:
        names = self.dfs.model_names()
        if MERGED in self.dfs.spec.models or MERGED in self.dfs.embeds:
            names += self.ps.model_names()
        return list(dict.fromkeys(names))

    def must_plan(self) -> list[tuple[str, SearchSpace, np.ndarray]]:
        start = self.ps.initial()
        embeddings = [  # the start with each other model's embeddings
            (label, self, np.concatenate([start, x])) for label, _, x in self.dfs.must_plan()[1:]
        ]
        return [*super().must_plan(), *embeddings, *self.ps.must_plan()[1:]]  # PS ranges' ends

    def source_genomes(self) -> list[tuple[str, np.ndarray]]:
        """A path over the PS result's own layers is that merge: each source the PS part
        expresses is one here too. A path embedded from a run model is that model whatever the
        PS part holds (the start's is used)."""
        found: list[tuple[str, np.ndarray]] = []
        if MERGED in self.dfs.embeds and MERGED in self.dfs.spec.models:
            try:
                path = self.dfs.own_path(MERGED)
                found = [(n, np.concatenate([g, path])) for n, g in self.ps.source_genomes()]
            except EvomergeError:
                pass
        start, named = self.ps.initial(), {name for name, _ in found}
        return found + [
            (name, np.concatenate([start, g]))
            for name, g in self.dfs.source_genomes()
            if name not in named
        ]

    def genome_of(self, recipe: Recipe) -> Optional[np.ndarray]:
        """A recipe the PS part expresses, followed by the PS result's own layers in order."""
        ps = self.ps.genome_of(recipe)
        if ps is None or MERGED not in self.dfs.embeds or MERGED not in self.dfs.spec.models:
            return None
        try:
            return np.concatenate([ps, self.dfs.own_path(MERGED)])
        except EvomergeError:
            return None

    def decode(self, genome: np.ndarray, seed: int = 0) -> Recipe:
        x = np.asarray(genome, dtype=float)
        ps = self.ps.decode(x[: self.split], seed)
        dfs = self.dfs.decode(x[self.split :], seed)
        data = dfs.model_dump(mode="json", exclude_none=True)
        if MERGED in data["models"]:
            data["models"][MERGED] = ps.model_dump(mode="json", exclude_none=True)
        return Recipe.from_dict(data, source="search space")
