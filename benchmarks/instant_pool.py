"""A worker pool that scores at once from the genome, for benchmarks that time the manager alone
(the search loop, the store, the optimizer) with no model merged or evaluated."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from evomerge.workers.evaluator import Outcome

Score = Callable[[np.ndarray], Outcome]


class InstantPool:
    """One free slot; `wait` scores the oldest submitted genome with `score` and returns it."""

    def __init__(self, score: Score) -> None:
        self.score = score
        self.queue: deque = deque()
        self.returned: list[int] = []  # indices scored (the rest were told from the store)

    def free(self) -> int:
        return 0 if self.queue else 1

    def in_flight(self) -> int:
        return len(self.queue)

    def submit(self, candidate, recipe, held_out=False, docs=None) -> None:
        self.queue.append((candidate, recipe))

    def wait(self):
        candidate, recipe = self.queue.popleft()
        self.returned.append(candidate.index)
        return [(candidate, recipe, self.score(candidate.genome))]

    def close(self) -> None:
        pass
