"""What one worker holds at its peak, predicted from the checkpoints' headers before any worker
starts, so a run that cannot fit says so in its first line rather than as an out-of-memory
failure on every candidate.

    peak = sources + live model + merge temporaries
    sources      = the bytes of every tensor of every model the worker loads (checkpoint dtype):
                   on the device with `sources: device`, in pinned host memory with `host`
    live model   = the output model in the score dtype: the base's tensors for a parameter space;
                   for a layer-path space its tensors outside the layers plus `max_layers` of
                   its largest layer
    temporaries  = (models + 3) x the largest piece's elements x 4 bytes: each input upcast to
                   fp32, the result and two work buffers (masks, signs) while it is merged; a
                   piece is a whole tensor, or for a method that merges entry by entry a row
                   chunk of at most `merge_chunk_mib` per input

Read weights never reach the driver: the headers say every shape and dtype.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.engine import plan_for
from evomerge.merge.io import ModelSource
from evomerge.merge.ops import row_chunks
from evomerge.spaces.base import SearchSpace

GIB = 2**30
HEADROOM = 0.9  # of the memory the machine has free: what a run may plan to use
LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Footprint:
    sources: int
    live: int
    temporaries: int
    sources_on: str = "device"  # where a worker keeps them: device, host, or auto (decided there)

    @property
    def peak(self) -> int:
        return self.sources + self.live + self.temporaries

    @property
    def reserve(self) -> int:
        """What the device needs besides the sources: live model and merge temporaries."""
        return self.live + self.temporaries

    def describe(self) -> str:
        head = (
            f"memory per worker: sources {self.sources / GIB:.2f} GiB + live model "
            f"{self.live / GIB:.2f} GiB + merge temporaries {self.temporaries / GIB:.2f} GiB "
            f"= {self.peak / GIB:.2f} GiB"
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
    finally:
        for source in sources:
            source.close()
    return Footprint(held, live, temporaries, _sources_on(config))


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
    gpu = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    return config.sources if gpu else "device"


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
    if config.ray_address or (config.pool == "ray" and os.environ.get("RAY_ADDRESS")):
        return None
    if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        per_device = max(1, int(1 / config.gpus_per_worker + 1e-9)) if config.pool == "ray" else 1
        # a worker spanning GPUs holds its sources and temporaries on the first, its live
        # model's layers spread over all: the first is the fullest
        span = int(config.gpus_per_worker) if config.gpus_per_worker >= 2 else 1
        held = footprint.sources if footprint.sources_on == "device" else 0
        worker = held + footprint.live / span + footprint.temporaries
        where, need, have = "each GPU", worker * per_device, free
    else:
        import psutil

        threads = config.threads_per_worker or 2  # the Ray pool's default, per CPU worker
        default = max(1, (os.cpu_count() or 1) // threads)
        workers = 1 if config.pool == "local" else (config.workers or default)
        where, need, have = (
            "this machine",
            footprint.peak * workers,
            psutil.virtual_memory().available,
        )
    if need <= HEADROOM * have:
        return None
    return (
        f"{footprint.describe()}; {where} needs {need / GIB:.2f} GiB for its workers and has "
        f"{have / GIB:.2f} GiB free: use fewer workers, score_dtype bfloat16, or fewer models"
    )


def announce(config: RunConfig, space: SearchSpace) -> Footprint:
    """The footprint whose line a run prints first; raises when the workers cannot fit."""
    footprint = predict(config, space)
    problem = check_fits(footprint, config)
    if problem:
        raise EvomergeError(problem)
    return footprint


def sources_placement(setting: str, device: torch.device, sources: int, reserve: int) -> str:
    """Where a worker keeps its sources: `device` or `host`; `auto` is the device when the
    sources, the live model and the merge temporaries fit its free memory with headroom."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "device"  # a CPU worker's host memory is its device
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if sources + reserve <= HEADROOM * free else "host"
