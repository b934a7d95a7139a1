"""SearchSpace: a genome layout (names, bounds, start point) and a pure decode to a Recipe."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

MAX_GENES = 1_000_000  # far past what any optimizer here can search; stops typos like r: 1e9


def experts_named(
    named: Optional[list[str]], models: dict[str, str], base: Optional[str]
) -> list[str]:
    """A space's experts: those its `models` names, each a key of the run's models, or by
    default every run model but the base."""
    names = named or [m for m in models if m != base]
    unknown = [m for m in names if m not in models]
    if unknown:
        raise EvomergeError(
            f"field 'search_space.models': {unknown[0]!r} is not a key of the run's 'models'"
        )
    return names


class SearchSpace(ABC):
    """Decodes a flat float genome into the one description of a merge."""

    kind: str

    @abstractmethod
    def gene_names(self) -> list[str]: ...

    @abstractmethod
    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def initial(self) -> np.ndarray: ...

    @abstractmethod
    def decode(self, genome: np.ndarray, seed: int = 0) -> Recipe:
        """The recipe a genome stands for; `seed` fixes stochastic methods' random state."""

    def must_plan(self) -> list[tuple[str, SearchSpace, np.ndarray]]:
        """(label, space that decodes it, genome) for each recipe that must plan before a run
        may start: the start, and wherever a space can reach values a merge method refuses."""
        return [("the start genome", self, self.initial())]

    def step_sizes(self) -> Optional[np.ndarray]:
        """The first step an optimizer should take on each gene, where the space knows better
        than a fraction of the bounds (a DFS genome: σ, so that a step flips a few slots);
        None: the optimizer's own default."""
        return None

    @abstractmethod
    def model_names(self) -> list[str]:
        """The run's models (by name) that some genome of this space merges: a worker loads
        these and no others."""

    def source_genomes(self) -> list[tuple[str, np.ndarray]]:
        """(run model name, genome) for each source model this space expresses exactly: the
        genome's merge is that model, unchanged. The run starts its search from them."""
        return []

    def genome_of(self, recipe: Recipe) -> Optional[np.ndarray]:
        """The genome whose merge is `recipe` (a baseline the search should start from), or
        None where this space cannot express it exactly."""
        return None

    @property
    def size(self) -> int:
        return len(self.gene_names())
