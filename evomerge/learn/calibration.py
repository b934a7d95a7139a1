"""Calibration for a search over a data-aware method (fisher, regmean): the run's calibration
text must not overlap what the held-out scores are computed on, and each source's statistics
are computed once, before the first candidate, into the run folder (`statistics/`), where a
resume and an export find them again."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from evomerge.config import LmEvalFitnessSpec, RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.engine import pick_device
from evomerge.merge.methods import Method
from evomerge.merge.statistics import (
    measure_source,
    read_calibration,
    save_texts,
    stored,
    write_statistics,
)
from evomerge.spaces.base import SearchSpace
from evomerge.workers.pool import Pool
from evomerge.workers.scoring import task_manager, working_dir

log = logging.getLogger("evomerge")
STATISTICS = "statistics"  # the run folder's statistics, one file per source


def parameter_part(space: SearchSpace) -> Optional[SearchSpace]:
    """The parameter-space part of a space (itself, or a PS+DFS space's PS stage)."""
    if space.kind == "parameter":
        return space
    return getattr(space, "ps", None)


def data_method(space: SearchSpace) -> Optional[Method]:
    """The space's merge method when it reads calibration statistics."""
    part = parameter_part(space)
    method = getattr(part, "method", None)
    return method if method is not None and method.statistics else None


def name_statistics(space: SearchSpace, folder: Path) -> None:
    """Make every recipe the space decodes name the run's statistics folder."""
    part = parameter_part(space)
    if data_method(space) is not None and part is not None:
        part.statistics = str(folder / STATISTICS)


def check_calibration(config: RunConfig, space: SearchSpace) -> None:
    """Fail before the run on a data-aware space without calibration text, on a calibration
    file that cannot be read, and on calibration text that holds held-out documents."""
    method = data_method(space)
    if config.calibration is None:
        if method is not None:
            raise EvomergeError(
                f"field 'calibration': {method.name} weighs parameters by statistics of the "
                "sources on calibration text; add calibration: {file: PATH}"
            )
        return
    calibration = config.calibration
    if method is not None and method.statistics == "activations" and calibration.file is None:
        raise EvomergeError(
            "field 'calibration.file': regmean_plus measures the merged model on one text for "
            "all sources; give calibration.file"
        )
    files = {"calibration.file": calibration.file} if calibration.file else {}
    files |= {f"calibration.files.{name}": path for name, path in calibration.files.items()}
    texts = {
        field: read_calibration(Path(path), calibration.limit) for field, path in files.items()
    }
    held_out = held_out_of(config)
    for field, found in texts.items():
        check_no_held_out(found, held_out, field)


def held_out_of(config: RunConfig) -> list[tuple[str, int, str]]:
    """The run's held-out documents (see held_out_prompts); none without held-out tasks."""
    fitness = config.fitness
    if isinstance(fitness, LmEvalFitnessSpec) and fitness.held_out is not None:
        return held_out_prompts(fitness)
    return []


def check_no_held_out(
    texts: list[str], held_out: list[tuple[str, int, str]], field: str, what: str = "calibrate"
) -> None:
    """Refuse text that holds a held-out document's prompt: what the held-out scores are
    computed on must stay unseen by every merge that is scored on it."""
    for task, number, prompt in held_out:
        hit = next((i for i, text in enumerate(texts) if prompt in text), None)
        if hit is not None:
            raise EvomergeError(
                f"field '{field}': text {hit + 1} holds document {number} of the held-out "
                f"task {task}; {what} on documents the held-out scores never see"
            )


def held_out_prompts(fitness: LmEvalFitnessSpec) -> list[tuple[str, int, str]]:
    """(task, document number, its prompt) for every held-out document (prompts shorter than
    8 characters say too little to count as an overlap)."""
    folder = Path(fitness.include_path) if fitness.include_path else None
    manager = task_manager(fitness.include_path, fitness.held_out.tasks)
    with working_dir(folder):
        loaded = manager.load(list(fitness.held_out.tasks))["tasks"]
    out = []
    for name, task in loaded.items():
        for number, doc in enumerate(task.eval_docs):
            prompt = task.doc_to_text(doc)
            if isinstance(prompt, str) and len(prompt.strip()) >= 8:
                out.append((name, number, prompt.strip()))
    return out


def ensure_statistics(
    folder: Path, config: RunConfig, space: SearchSpace, pool: Optional[Pool] = None
) -> None:
    """Measure the statistics of every source the data-aware space merges, unless the run
    folder holds them already for the same text (a resume): on the pool's workers (their
    devices, the run's GPUs), or in this process without a pool."""
    method = data_method(space)
    if method is None or config.calibration is None:
        return
    calibration = config.calibration
    part = parameter_part(space)
    where = folder / STATISTICS
    if method.statistics == "activations":  # RegMean++ measures each merged candidate itself
        save_texts(where, read_calibration(Path(calibration.file), calibration.limit))
        return
    texts = {
        name: read_calibration(Path(calibration.file_for(name)), calibration.limit)
        for name in part.model_names()
        if calibration.file_for(name) is not None
    }
    no_text = next((name for name in part.model_names() if name not in texts), None)
    if no_text is not None:
        raise EvomergeError(
            f"field 'calibration.files': no calibration text for source {no_text!r}; add "
            f"calibration.files.{no_text}: PATH or a shared calibration.file"
        )
    missing = [
        (name, config.models[name])
        for name in part.model_names()
        if stored(where, config.models[name], texts[name]) is None
    ]
    if not missing:
        return
    length = calibration.max_length
    jobs = [(ref, texts[name], [method.statistics], length) for name, ref in missing]
    start = time.perf_counter()
    if pool is not None:
        measured: Iterable[tuple[int, bytes]] = pool.measure_sources(jobs)
    else:
        device = pick_device(config.device)
        measured = (
            (n, measure_source(ref, text, device, kinds, length, config.trust_remote_code))
            for n, (ref, text, kinds, length) in enumerate(jobs)
        )
    for number, data in measured:
        name, ref = missing[number]
        write_statistics(where, ref, data)
        seconds = time.perf_counter() - start
        log.info("statistics of %s (%s) in %.1f s: %s", name, method.statistics, seconds, where)
