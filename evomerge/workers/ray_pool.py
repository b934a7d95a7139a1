"""The Ray pool: evaluators placed on a cluster, one actor per device, kept busy, replaced when
they die.

Each actor runs an `Evaluator` (evaluator.py): it loads the source tensors once onto its device
and scores recipes in a live model. The pool takes any number of candidates: they wait in a
backlog on the driver and go to actors as places free, two per actor (one running, one queued
behind it, so an actor never idles while the driver commits and asks). A generational optimizer
hands over its whole generation at once; every actor works until the generation runs dry. An
actor that dies mid-candidate (killed, OOM, node lost) is replaced and its candidate dispatched
again; one past the per-candidate timeout is killed, replaced, and its candidate recorded as
failed. `ray.util.ActorPool` is not used: it does not survive a dead actor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from evomerge.errors import EvomergeError
from evomerge.optim.base import Candidate
from evomerge.workers.evaluator import Evaluator, Outcome, SourceJob
from evomerge.workers.shipping import stage

log = logging.getLogger("evomerge")
MAX_ATTEMPTS = 3  # dispatches of one candidate whose worker died before it is recorded failed
MAX_START_FAILURES = 3  # actors that die while loading their sources: give up
POLL_SECONDS = 0.5
DEPTH = 2  # candidates per actor: one running, one queued, so no actor waits on the driver
CPU_THREADS = 2  # threads per CPU actor unless threads_per_worker says otherwise


@dataclass
class Job:
    actor: int
    candidate: Candidate
    recipe: str
    started: Optional[float]  # None while queued behind another job on the same actor
    attempt: int
    held_out: bool = False
    handle: Any = None  # the actor it was sent to (a replaced slot holds a new one)
    order: int = 0
    docs: Optional[dict[str, list[int]]] = None  # a racing stage's documents

    def again(self, attempt: int) -> tuple:
        """This job as a backlog entry, for another actor."""
        return (self.candidate, self.recipe, self.held_out, attempt, self.docs)


def start_ray(address: Optional[str], working_dir: Optional[Path] = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start Ray on this machine. True if this call
    connected (the pool disconnects when it closes; a cluster it connected to keeps running).
    `working_dir`: files every node's workers get (Ray ships a local folder only for a whole
    job, so it is given here). Token authentication is left as Ray configures it (on for local
    clusters)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        env = {"working_dir": str(working_dir)} if working_dir is not None else None
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=env)
        return True
    # local workers import the fitness module from the folder the run was started in
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path.cwd()), path) if p)
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    return True


EVOMERGE_ERROR = f"{EvomergeError.__module__}.{EvomergeError.__name__}: "


def start_failure_reason(exc: Exception) -> str:
    """The line that says why an actor died in __init__: the raised exception's, not Ray's."""
    lines = [line.strip() for line in str(getattr(exc, "error_msg", "") or exc).splitlines()]
    lines = [line for line in lines if line]
    if getattr(exc, "_actor_init_failed", False) and lines:
        return lines[-1][:500]
    return (lines[0] if lines else type(exc).__name__)[:300]


def default_workers(
    nodes: list[dict[str, float]], use_gpu: bool, threads: int, gpus_per_worker: float = 1.0
) -> int:
    """Every GPU of the cluster divided by `gpus_per_worker`, else one actor per `threads` CPUs
    of each node (at least one): what fits, node by node, since an actor cannot span nodes."""
    if use_gpu:
        fit = sum(int(node.get("GPU", 0) / gpus_per_worker + 1e-9) for node in nodes)
        return max(1, fit)
    return max(1, sum(int(node.get("CPU", 0) // threads) for node in nodes))


def unplaceable(ask: dict[str, float], workers: int, nodes: list[dict[str, float]]) -> str:
    """Why `workers` actors asking `ask` each can never all be placed on `nodes` (empty when
    they can): an actor needs one node with all of its resources."""
    fit = sum(
        int(min(node.get(key, 0) / need + 1e-9 for key, need in ask.items() if need > 0))
        for node in nodes
    )
    if fit >= workers:
        return ""
    asked = ", ".join(f"{need:g} {key}" for key, need in ask.items())
    have = (
        "; ".join(", ".join(f"{node.get(key, 0):g} {key}" for key in ask) for node in nodes)
        or "no live nodes"
    )
    return (
        f"{workers} worker{'s' if workers != 1 else ''} asking {asked} each cannot be "
        f"placed: the cluster's nodes have "
        f"{have} (room for {fit}); lower workers, threads_per_worker or gpus_per_worker, or "
        "add nodes"
    )


class RayPool:
    def __init__(
        self,
        n_workers: Optional[int],
        worker_kwargs: dict[str, Any],
        address: Optional[str] = None,
        threads: Optional[int] = None,
        timeout: Optional[float] = None,
        env: Optional[dict[str, str]] = None,
        gpus_per_worker: float = 1.0,
        placement_timeout: float = 600.0,
    ) -> None:
        import ray

        self.ray = ray
        self.worker_kwargs = dict(worker_kwargs)
        self.shipped: Optional[Path] = None
        if address or os.environ.get("RAY_ADDRESS"):  # other machines: send the fitness along
            self._ship()
        self.connected = start_ray(address, self.shipped)
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        gpus = sum(node.get("GPU", 0) for node in nodes)
        self.use_gpu = gpus >= 1 and worker_kwargs.get("device", "auto") in ("auto", "cuda")
        cpus = int(sum(node.get("CPU", 0) for node in nodes)) or 1
        largest = max((int(node.get("CPU", 1)) for node in nodes), default=1)
        self.gpus_per_worker = gpus_per_worker
        self.placement_timeout = placement_timeout
        if n_workers is None:
            self.threads = threads or min(CPU_THREADS, largest)
            n_workers = default_workers(nodes, self.use_gpu, self.threads, gpus_per_worker)
            self.cpu_share = float(self.threads)
        else:  # a given number of workers shares the cluster's CPUs unless told otherwise
            self.threads = threads or max(1, cpus // n_workers)
            self.cpu_share = float(threads) if threads else min(self.threads, cpus / n_workers)
        self.ask = {"GPU": gpus_per_worker} if self.use_gpu else {"CPU": self.cpu_share}
        problem = unplaceable(self.ask, n_workers, nodes)
        self.actors: list[Any] = []
        if problem:  # Ray would keep them pending for ever: say so before starting any
            self.close()
            raise EvomergeError(problem)
        if self.use_gpu:
            self.worker_kwargs["device"] = "cuda"
        self.env = dict(env or {})
        self.timeout = timeout
        self.served = [0] * n_workers
        self.generation = 0
        self.start_failures = 0
        self.jobs: dict[Any, Job] = {}
        self.backlog: deque[tuple[Candidate, str, bool, int, Optional[dict]]] = deque()
        self.submitted = 0
        try:
            self.actors = [self._spawn(slot) for slot in range(n_workers)]
            self._await_ready(list(range(n_workers)))
        except BaseException:
            self.close()
            raise

    def _ship(self) -> None:
        """Stage the fitness module or task folder for Ray to send to every node (as the
        job's working dir); the fitness spec the actors get points into it."""
        root = Path(tempfile.mkdtemp(prefix="evomerge-ship-"))
        staged, spec = stage(self.worker_kwargs["fitness"], root)
        if not staged:
            shutil.rmtree(root, ignore_errors=True)
            return
        self.shipped = root
        self.worker_kwargs["fitness"] = spec

    def _spawn(self, slot: int) -> Any:
        self.generation += 1
        options: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        if self.env:
            options["runtime_env"] = {"env_vars": self.env}
        if self.use_gpu:
            options["num_gpus"] = self.gpus_per_worker
        else:
            options["num_cpus"] = self.cpu_share
        remote = self.ray.remote(Evaluator).options(**options)
        name = f"worker-{slot}.{self.generation}"
        return remote.remote(**self.worker_kwargs, name=name, threads=self.threads)

    def _await_ready(self, slots: list[int]) -> None:
        """Wait until the actors in `slots` have loaded their sources (so a candidate's timeout
        never counts a worker's start-up); replace ones that die starting, a few times."""
        from ray.exceptions import GetTimeoutError, RayActorError

        pending = list(slots)
        deadline = time.monotonic() + self.placement_timeout
        while pending:
            slot = pending.pop(0)
            try:
                left = max(1.0, deadline - time.monotonic())
                self.ray.get(self.actors[slot].ping.remote(), timeout=left)
            except GetTimeoutError:
                asked = ", ".join(f"{need:g} {key}" for key, need in self.ask.items())
                raise EvomergeError(
                    f"worker {slot} (asking {asked}) was not placed and ready within "
                    f"placement_timeout ({self.placement_timeout:g} s); the cluster has "
                    f"{self.ray.available_resources()} free now: lower workers or "
                    "threads_per_worker, free the cluster, or raise placement_timeout where "
                    "loading the sources takes longer"
                ) from None
            except RayActorError as exc:
                self.start_failures += 1
                reason = start_failure_reason(exc)
                if reason.startswith(EVOMERGE_ERROR):  # bad input: the same on every retry
                    raise EvomergeError(reason[len(EVOMERGE_ERROR) :]) from None
                if self.start_failures >= MAX_START_FAILURES:
                    raise EvomergeError(f"workers die while starting: {reason}") from None
                log.warning("worker %d died while starting (%s); retrying", slot, reason)
                self.actors[slot] = self._spawn(slot)
                pending.append(slot)

    def _replace(self, slot: int) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._spawn(slot)
        self.served[slot] = 0
        self._await_ready([slot])

    # ----- the Pool protocol -------------------------------------------------------------------
    def _load(self, slot: int) -> int:
        return sum(1 for job in self.jobs.values() if job.actor == slot)

    def _places(self) -> int:
        return sum(max(0, DEPTH - self._load(slot)) for slot in range(len(self.actors)))

    def free(self) -> int:
        return max(0, self._places() - len(self.backlog))

    def in_flight(self) -> int:
        return len(self.jobs) + len(self.backlog)

    def submit(
        self,
        candidate: Candidate,
        recipe_yaml: str,
        held_out: bool = False,
        docs: Optional[dict[str, list[int]]] = None,
    ) -> None:
        """Take a candidate: it goes to an actor now if one has a place, else to the backlog."""
        self.backlog.append((candidate, recipe_yaml, held_out, 1, docs))
        self._feed()

    def _feed(self) -> None:
        """Move backlog candidates onto actors with a free place, least loaded first."""
        while self.backlog and self._places() > 0:
            self._send(*self.backlog.popleft())

    def _send(
        self,
        candidate: Candidate,
        recipe_yaml: str,
        held_out: bool,
        attempt: int,
        docs: Optional[dict[str, list[int]]],
    ) -> None:
        slot = min(range(len(self.actors)), key=self._load)
        started = time.monotonic() if self._load(slot) == 0 else None
        handle = self.actors[slot]
        ref = handle.evaluate.remote(recipe_yaml, held_out, docs)
        self.submitted += 1
        self.jobs[ref] = Job(
            slot, candidate, recipe_yaml, started, attempt, held_out, handle, self.submitted, docs
        )

    def _start_next(self, slot: int) -> None:
        """The actor at `slot` finished a job: its queued one starts now (for its timeout)."""
        queued = [j for j in self.jobs.values() if j.actor == slot and j.started is None]
        if queued:
            min(queued, key=lambda j: j.order).started = time.monotonic()

    def wait(self) -> list[tuple[Candidate, str, Outcome]]:
        """Block until at least one candidate is done (scored, failed or timed out)."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        while True:
            self._feed()  # candidates requeued after a worker died, onto replaced actors
            ready, _ = self.ray.wait(list(self.jobs), num_returns=1, timeout=POLL_SECONDS)
            done: list[tuple[Candidate, str, Outcome]] = []
            for ref in ready:
                job = self.jobs.pop(ref)
                self._start_next(job.actor)
                try:
                    outcome = self.ray.get(ref, timeout=60)
                except (RayActorError, GetTimeoutError) as exc:
                    self._worker_died(job, exc, done)
                    continue
                except RayTaskError as exc:  # evaluate() never raises; this is Ray's own error
                    outcome = Outcome(error=f"worker error: {str(exc).splitlines()[0][:300]}")
                self.served[job.actor] += 1
                done.append((job.candidate, job.recipe, outcome))
            done += self._expire()
            if done:
                self._feed()
                return done

    def _worker_died(self, job: Job, exc: Exception, done: list) -> None:
        reason = str(exc).splitlines()[0][:300]
        if job.handle is not self.actors[job.actor]:  # queued on an actor replaced since
            self.backlog.appendleft(job.again(job.attempt))
            return
        log.warning("worker %d died (%s); replacing it", job.actor, reason)
        self._replace(job.actor)
        if job.attempt >= MAX_ATTEMPTS:
            done.append(
                (
                    job.candidate,
                    job.recipe,
                    Outcome(error=f"worker died {job.attempt} times: {reason}"),
                )
            )
        else:
            self.backlog.appendleft(job.again(job.attempt + 1))

    def _expire(self) -> list[tuple[Candidate, str, Outcome]]:
        if self.timeout is None:
            return []
        expired = []
        for ref, job in list(self.jobs.items()):
            if job.started is None or time.monotonic() - job.started <= self.timeout:
                continue
            # finished but not collected yet (ray.wait hands back one at a time, and replacing
            # a worker blocks this loop while others' clocks run): collected next, not expired
            if self.ray.wait([ref], timeout=0)[0]:
                continue
            del self.jobs[ref]
            self._replace(job.actor)
            expired.append(
                (job.candidate, job.recipe, Outcome(error=f"timed out after {self.timeout:g} s"))
            )
        return expired

    def _result(self, ref: Any, what: str, doing: str) -> Any:
        """A worker's answer, or its failure in one line: an EvomergeError as it was raised,
        anything else named after `what` failed (or the worker `doing` it died)."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EvomergeError):
                raise EvomergeError(str(cause)) from None
            raise EvomergeError(
                f"{what} failed on a worker: {type(cause).__name__}: {cause}"
            ) from None
        except RayActorError as exc:
            raise EvomergeError(f"the worker {doing} died: {start_failure_reason(exc)}") from None

    def measure_sources(self, jobs: list[SourceJob]) -> Iterator[tuple[int, bytes]]:
        """Each source's calibration statistics measured by the workers on their devices
        (sources dealt round the workers), yielded as each arrives so a finished one is
        stored even if a later one fails."""
        pending = {
            self.actors[n % len(self.actors)].source_statistics.remote(*job): n
            for n, job in enumerate(jobs)
        }
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            number = pending.pop(done[0])
            source = jobs[number][0]
            yield (
                number,
                self._result(
                    done[0], f"statistics of {source}", f"measuring statistics of {source}"
                ),
            )

    def run_on_worker(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(device, *args)` on the first worker's device; its error ends here in one line."""
        return self._result(self.actors[0].run_here.remote(fn, *args), what, what)

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor, no_restart=True)
        self.actors = []
        if getattr(self, "shipped", None) is not None:
            shutil.rmtree(self.shipped, ignore_errors=True)
            self.shipped = None
        if self.connected:
            self.ray.shutdown()
