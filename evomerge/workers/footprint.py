"""What one worker holds at its peak, predicted from the checkpoints' headers before any worker
starts, so a run that cannot fit says so in its first line rather than as an out-of-memory
failure on every candidate.

    peak = sources + live model + merge temporaries + scoring
    sources      = the bytes of every tensor of every model the worker loads (checkpoint dtype):
                   on the device with `sources: device`, in pinned host memory with `host`
    live model   = the output model in the score dtype: the base's tensors for a parameter space;
                   for a layer-path space its tensors outside the layers plus `max_layers` of
                   its largest layer
    temporaries  = (models + 3) x the largest piece's elements x 4 bytes: each input upcast to
                   fp32, the result and two work buffers (masks, signs) while it is merged; a
                   piece is a whole tensor, or for a method that merges entry by entry a row
                   chunk of at most `merge_chunk_mib` per input
    scoring      = lm-eval's logits, activations and generation cache for one batch of the
                   fitness's longest request (scoring_footprint.py); with `batch_size: auto`
                   the largest batch that fits beside the rest, chosen here where the driver
                   sees the workers' memory (a machine of its own), else left to lm-eval

A run that learns a merge (DAM, AdaMerging) trains it first on one worker, beside the sources
that worker holds, with its live model released: that worker's peak is the larger of the
above and sources + training (learn/train.py's formula, given by the caller).

Read weights never reach the driver: the headers say every shape and dtype.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Optional

import psutil
import torch

from evomerge.config import LmEvalFitnessSpec, RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.engine import plan_for
from evomerge.merge.io import ModelSource
from evomerge.merge.ops import row_chunks
from evomerge.spaces.base import SearchSpace
from evomerge.workers.scoring_footprint import (
    ScoringFootprint,
    Shape,
    largest_batch,
    longest_requests,
    scoring_bytes,
)

GIB = 2**30
HEADROOM = 0.9  # of the memory the machine has free: what a run may plan to use
LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Footprint:
    sources: int
    live: int
    temporaries: int
    sources_on: str = "device"  # where a worker keeps them: device, host, or auto (decided there)
    scoring: Optional[ScoringFootprint] = None  # None: a Python fitness, not estimated
    auto_batch: bool = False  # batch_size auto: `scoring` is for the batch chosen (or for 1)
    learning: int = 0  # what training a learned merge adds on the worker that trains it

    @property
    def peak(self) -> int:
        return self.sources + max(self.reserve, self.learning)

    @property
    def scoring_bytes(self) -> int:
        return self.scoring.total if self.scoring is not None else 0

    @property
    def reserve(self) -> int:
        """What the device needs besides the sources: live model, merge temporaries, scoring."""
        return self.live + self.temporaries + self.scoring_bytes

    def describe(self) -> str:
        if self.scoring is None:
            scoring = " (scoring by a Python fitness: not estimated)"
        else:
            batch = f"batch {self.scoring.batch}" + (" (auto)" if self.auto_batch else "")
            scoring = (
                f" + scoring {self.scoring_bytes / GIB:.2f} GiB ({batch} x "
                f"{self.scoring.tokens} tokens)"
            )
        scored = self.sources + self.reserve
        head = (
            f"memory per worker: sources {self.sources / GIB:.2f} GiB + live model "
            f"{self.live / GIB:.2f} GiB + merge temporaries {self.temporaries / GIB:.2f} GiB"
            f"{scoring} = {scored / GIB:.2f} GiB"
        )
        if self.learning:
            head += (
                f"; while learning, the worker that trains: sources + training "
                f"{self.learning / GIB:.2f} GiB = {(self.sources + self.learning) / GIB:.2f} GiB"
            )
        if self.sources_on == "host":
            return (
                f"{head}; sources on the host: device {self.reserve / GIB:.2f} GiB, pinned "
                f"host {self.sources / GIB:.2f} GiB"
            )
        if self.sources_on == "auto":
            return f"{head}; sources on the device where it has that free, else on the host"
        return head


def predict(config: RunConfig, space: SearchSpace) -> Footprint:
    """The peak of one worker of this run (see the module's formula)."""
    refs = list(dict.fromkeys(config.models.values()))
    sources = [ModelSource(ref, allow_pickle=config.allow_pickle) for ref in refs]
    try:
        held = sum(info.nbytes for source in sources for info in source.index.values())
        base_ref = config.models.get(config.base_model or "", refs[0])
        base = sources[refs.index(base_ref)]
        score = _element_size(config.score_dtype) if config.score_dtype else None
        live = _live_bytes(base, _max_layers(space), score)
        largest = _largest_piece(space, dict(zip(refs, sources)), config.merge_chunk_mib)
        temporaries = (len(sources) + 3) * largest * 4
        element = score or _checkpoint_element(base)
        scoring = predict_scoring(config, base, element)
    finally:
        for source in sources:
            source.close()
    auto = isinstance(config.fitness, LmEvalFitnessSpec) and config.fitness.batch_size == "auto"
    return Footprint(held, live, temporaries, _sources_on(config), scoring, auto)


def predict_scoring(
    config: RunConfig, base: ModelSource, element: int
) -> Optional[ScoringFootprint]:
    """Scoring's term for the configured batch (for one sequence under `batch_size: auto`)."""
    fitness = config.fitness
    if not isinstance(fitness, LmEvalFitnessSpec):
        return None
    from transformers import AutoTokenizer  # heavy: only a run that scores with lm-eval

    tokenizer = AutoTokenizer.from_pretrained(
        str(base.path), trust_remote_code=config.trust_remote_code
    )
    requests = longest_requests(fitness, tokenizer)
    batch = fitness.batch_size if isinstance(fitness.batch_size, int) else 1
    return scoring_bytes(Shape.of(base.config), requests, batch, element)


def _checkpoint_element(source: ModelSource) -> int:
    """The bytes of the checkpoint's floating dtype: the score dtype when none is set."""
    sizes = [i.dtype.itemsize for i in source.index.values() if i.dtype.is_floating_point]
    return max(set(sizes), key=sizes.count) if sizes else 4


def _largest_piece(space: SearchSpace, sources: dict[str, ModelSource], chunk_mib: int) -> int:
    """Elements of the largest piece the start recipe merges at once (a whole tensor, or a
    row chunk where its method merges entry by entry); every source's largest tensor where
    the start recipe does not plan on its own (a layer path)."""
    whole = max(math.prod(info.shape) for s in sources.values() for info in s.index.values())
    try:
        plan = plan_for(space.decode(space.initial()), sources, statistics_required=False)
    except EvomergeError:
        return whole
    largest = 0
    for op in plan.ops:
        rows = row_chunks(op, plan.method, chunk_mib * 2**20)[0]
        span = op.shape[0] if rows is None else rows.stop - rows.start
        largest = max(largest, span * math.prod(op.shape[1:]) if op.shape else 1)
    return largest if plan.method.name != "dataflow" else whole


def _sources_on(config: RunConfig) -> str:
    """Where the workers keep their sources: what the config says; on a CPU worker the host is
    its device."""
    return config.sources if _on_gpu(config) else "device"


def _max_layers(space: SearchSpace) -> Optional[int]:
    """The longest layer path a space can build (None: the base's own depth)."""
    for part in (space, getattr(space, "dfs", None)):
        genome = getattr(part, "genome", None)
        if genome is not None and getattr(genome, "max_layers", None):
            return int(genome.max_layers)
    return None


def _live_bytes(base: ModelSource, layers: Optional[int], element: Optional[int]) -> int:
    def size(info) -> int:
        return math.prod(info.shape) * element if element else info.nbytes

    per_layer: dict[int, int] = {}
    outside = 0
    for name, info in base.index.items():
        found = LAYER.search(name)
        if found:
            per_layer[int(found.group(1))] = per_layer.get(int(found.group(1)), 0) + size(info)
        else:
            outside += size(info)
    if layers is None or not per_layer:
        return outside + sum(per_layer.values())
    return outside + layers * max(per_layer.values())


def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def check_fits(footprint: Footprint, config: RunConfig) -> Optional[str]:
    """Why the run's workers cannot fit this machine (empty when they can, or when the workers
    run on a cluster this driver cannot see into)."""
    machine = _machine(config)
    if machine is None:
        return None
    where, workers, have = machine
    # one worker trains a learned merge while the others wait with their live models built
    scoring = replace(footprint, learning=0)
    need = _worker_need(scoring, config) * (workers - 1) + _worker_need(footprint, config)
    if need <= HEADROOM * have:
        return None
    return (
        f"{footprint.describe()}; {where} needs {need / GIB:.2f} GiB for its workers and has "
        f"{have / GIB:.2f} GiB free: use fewer workers, a smaller fitness batch_size, "
        "score_dtype bfloat16, or fewer models"
        + (", or a smaller learning.batch_size" if footprint.learning else "")
    )


def _machine(config: RunConfig) -> Optional[tuple[str, int, int]]:
    """(what the workers share, how many workers share it, its free bytes) where this driver
    sees it: each GPU, or this machine for CPU workers; None for a cluster's workers."""
    if config.ray_address or (config.pool == "ray" and os.environ.get("RAY_ADDRESS")):
        return None
    if _on_gpu(config):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        per_device = max(1, int(1 / config.gpus_per_worker + 1e-9)) if config.pool == "ray" else 1
        return "each GPU", per_device, free
    threads = config.threads_per_worker or 2  # the Ray pool's default, per CPU worker
    default = max(1, (os.cpu_count() or 1) // threads)
    workers = 1 if config.pool == "local" else (config.workers or default)
    return "this machine", workers, psutil.virtual_memory().available


def _worker_need(footprint: Footprint, config: RunConfig) -> float:
    """One worker's bytes on what it shares: on a GPU, the sources only when they are kept
    there, and a live model spanning GPUs split over them (the first holds the rest)."""
    if not _on_gpu(config):
        return footprint.peak
    span = int(config.gpus_per_worker) if config.gpus_per_worker >= 2 else 1
    held = footprint.sources if footprint.sources_on == "device" else 0
    scoring = footprint.live / span + footprint.temporaries + footprint.scoring_bytes
    return held + max(scoring, footprint.learning)


def _on_gpu(config: RunConfig) -> bool:
    return config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )


def announce(config: RunConfig, space: SearchSpace, learning: int = 0) -> Footprint:
    """The footprint whose line a run prints first; raises when the workers cannot fit. Under
    `batch_size: auto` it is the footprint at the batch chosen (`choose_batch`). `learning`:
    the bytes training the run's learned merges adds on one worker (0: none to learn)."""
    footprint = replace(choose_batch(predict(config, space), config), learning=learning)
    problem = check_fits(footprint, config)
    if problem:
        raise EvomergeError(problem)
    return footprint


def choose_batch(footprint: Footprint, config: RunConfig) -> Footprint:
    """Under `batch_size: auto`, the largest batch whose scoring fits beside the rest of each
    worker's peak in the memory this driver sees its workers have (they run on this machine);
    on a cluster it cannot see, the footprint stays at batch 1 and lm-eval probes its own."""
    if not footprint.auto_batch or footprint.scoring is None:
        return footprint
    machine = _machine(config)
    if machine is None:
        return footprint
    _, workers, have = machine
    rest = _worker_need(footprint, config) - footprint.scoring_bytes
    per_sequence = footprint.scoring.total  # predicted at batch 1; every term is linear in it
    batch = largest_batch(per_sequence, int(HEADROOM * have / workers - rest))
    return replace(footprint, scoring=footprint.scoring.at_batch(batch))


def pool_config(config: RunConfig, footprint: Footprint) -> RunConfig:
    """The config the workers get: `batch_size: auto` replaced by the batch chosen, where one
    was (the run's own config keeps auto, so a resume on other hardware chooses again)."""
    if not footprint.auto_batch or footprint.scoring is None or footprint.scoring.batch == 1:
        return config
    fitness = config.fitness.model_copy(update={"batch_size": footprint.scoring.batch})
    return config.model_copy(update={"fitness": fitness})


def sources_placement(setting: str, device: torch.device, sources: int, reserve: int) -> str:
    """Where a worker keeps its sources: `device` or `host`; `auto` is the device when the
    sources, the live model and the merge temporaries fit its free memory with headroom."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "device"  # a CPU worker's host memory is its device
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if sources + reserve <= HEADROOM * free else "host"
