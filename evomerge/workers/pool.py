"""Where candidates are scored: the pool protocol the manager loop talks to, the in-process pool
(one evaluator, one candidate at a time) and the choice between it and the Ray pool."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Optional, Protocol

from evomerge.config import RunConfig
from evomerge.optim.base import Candidate
from evomerge.workers.evaluator import Evaluator, Outcome, SourceJob
from evomerge.workers.ray_pool import RayPool


class Pool(Protocol):
    """Takes any number of candidates; scores them as evaluators free up."""

    def free(self) -> int:
        """Candidates the pool could start now without any evaluator waiting for work."""
        ...

    def submit(
        self,
        candidate: Candidate,
        recipe_yaml: str,
        held_out: bool = False,
        docs: Optional[dict[str, list[int]]] = None,
    ) -> None:
        """Queue a candidate: scored on the held-out tasks, or on `docs` (document ids per
        task, a racing stage), or on the whole fitness."""
        ...

    def in_flight(self) -> int:
        """Submitted and not yet returned by wait() (running or waiting for an evaluator)."""
        ...

    def wait(self) -> list[tuple[Candidate, str, Outcome]]: ...

    def measure_sources(self, jobs: list[SourceJob]) -> Iterator[tuple[int, bytes]]:
        """Calibration statistics of sources (job: reference, texts, kinds, max_length),
        measured on the evaluators' devices: (job number, safetensors bytes) as each ends."""
        ...

    def run_on_worker(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(device, *args)` on one evaluator's device, its result returned here (it must
        travel: tensors on the CPU); `what` names it in an error."""
        ...

    def close(self) -> None: ...


class LocalPool:
    """One in-process evaluator, one candidate at a time (what the resume tests use)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.queue: deque[tuple[Candidate, str, bool, Optional[dict]]] = deque()

    def free(self) -> int:
        return 0 if self.queue else 1

    def submit(
        self,
        candidate: Candidate,
        recipe_yaml: str,
        held_out: bool = False,
        docs: Optional[dict[str, list[int]]] = None,
    ) -> None:
        self.queue.append((candidate, recipe_yaml, held_out, docs))

    def in_flight(self) -> int:
        return len(self.queue)

    def wait(self) -> list[tuple[Candidate, str, Outcome]]:
        candidate, recipe, held_out, docs = self.queue.popleft()
        return [(candidate, recipe, self.evaluator.evaluate(recipe, held_out, docs))]

    def measure_sources(self, jobs: list[SourceJob]) -> Iterator[tuple[int, bytes]]:
        for number, job in enumerate(jobs):
            yield number, self.evaluator.source_statistics(*job)

    def run_on_worker(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        return self.evaluator.run_here(fn, *args)

    def close(self) -> None:
        pass


def make_pool(config: RunConfig, reserve_bytes: int = 0) -> Pool:
    """Ray actors (embedded Ray, or the cluster at ray_address / RAY_ADDRESS), or one
    in-process evaluator with `pool: local`. `reserve_bytes`: the device memory a worker needs
    besides its sources (live model, merge temporaries), for `sources: auto`."""
    kwargs = {
        "refs": list(dict.fromkeys(config.models.values())),
        "fitness": config.fitness.model_dump(mode="json"),
        "device": config.device,
        "allow_pickle": config.allow_pickle,
        "trust_remote_code": config.trust_remote_code,
        "score_dtype": config.score_dtype,
        "sources_on": config.sources,
        "reserve_bytes": reserve_bytes,
        "chunk_bytes": config.merge_chunk_mib * 2**20,
        "gpus": config.gpus_per_worker,
    }
    if config.pool == "local":
        return LocalPool(Evaluator(**kwargs, threads=config.threads_per_worker))
    return RayPool(
        config.workers,
        kwargs,
        address=config.ray_address,
        threads=config.threads_per_worker,
        timeout=config.candidate_timeout,
        env=config.offline_env(),
        gpus_per_worker=config.gpus_per_worker,
        placement_timeout=config.placement_timeout,
    )
