"""A run: its folder, resolved config, search space and store; created atomically, opened for
resume, and the seeds the optimizer asks first."""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from evomerge.baselines import baseline_recipes
from evomerge.config import LmEvalFitnessSpec, RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.calibration import name_statistics
from evomerge.learn.in_run import name_learned
from evomerge.merge.engine import remove_if_orphaned
from evomerge.optim.registry import Optimizer
from evomerge.recipe import Recipe
from evomerge.results.store import Record, RunStore, read_run_meta
from evomerge.search.prepare import RUN_CONFIG, optimizer_for, prepare, task_documents
from evomerge.search.racing import DocumentPlan
from evomerge.spaces import SearchSpace

BASELINE = "baseline:"  # seed label prefix of a baseline merge


@dataclass
class Run:
    folder: Path
    config: RunConfig
    space: SearchSpace
    store: RunStore

    def candidate_seed(self, index: int) -> int:
        """Seed of the stochastic methods in candidate `index`'s recipe."""
        return (self.config.seed * 1_000_003 + index) % 2**31

    def losses(self, record: Record) -> Optional[np.ndarray]:
        if record.values is None:
            return None
        return np.array(
            [
                -record.values[o.name] if o.direction == "maximize" else record.values[o.name]
                for o in self.config.objectives
            ]
        )

    @functools.cached_property
    def seeds(self) -> list[tuple[str, np.ndarray]]:
        """(label, genome) the optimizer asks first: each source model the space expresses
        (labelled by its name), then each baseline merge ("baseline:<name>"); none when seeding
        is off."""
        if not self.config.seed_with_sources:
            return []
        seeds = list(self.space.source_genomes())
        baselines = baseline_recipes(
            self.config.baselines, self.config.models, self.config.base_model, self.config.seed
        )
        for name, recipe in baselines.items():
            genome = self.space.genome_of(Recipe.from_yaml_text(recipe))
            if genome is not None:
                seeds.append((f"{BASELINE}{name}", genome))
        return seeds

    def seed_source(self, index: int) -> Optional[str]:
        """The source model or baseline ("baseline:<name>") that ask index `index` stands for,
        if it is a seed."""
        return self.seeds[index][0] if index < len(self.seeds) else None

    def seeding_line(self) -> str:
        if not self.config.seed_with_sources:
            return "seeding: off (seed_with_sources: false)"
        if not self.seeds:
            return (
                "seeding: the search space expresses none of the source models or baselines "
                "exactly; the run starts unseeded"
            )
        return "seeding: the search starts from " + ", ".join(name for name, _ in self.seeds)

    @functools.cached_property
    def document_plan(self) -> Optional[DocumentPlan]:
        """Which documents each racing stage scores; None without `fitness.fidelity`."""
        fitness = self.config.fitness
        if not isinstance(fitness, LmEvalFitnessSpec) or fitness.fidelity is None:
            return None
        return DocumentPlan(fitness.fidelity, task_documents(fitness), self.config.seed)

    def new_optimizer(self) -> Optimizer:
        optimizer = optimizer_for(self.config, self.space)
        optimizer.seed_with([genome for _, genome in self.seeds])
        return optimizer


def create_run(config: RunConfig, folder: Path) -> Run:
    """Create the run folder atomically: everything is written into a hidden sibling that is
    renamed into place once the store, its study and run.yaml are complete, so that at every
    instant (a SIGKILL, a power cut, a preemption included) `folder` is either absent or a run
    that `evomerge resume` continues."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EvomergeError(
            f"--out {folder}: exists and is not empty; resume it with `evomerge resume {folder}` "
            "or choose another folder"
        )
    resolved, space = prepare(config, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_creations(folder)
    staging = creation_folder(folder)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        store = RunStore.create(
            staging,
            resolved.store,
            [(o.name, o.direction) for o in resolved.objectives],
            space.gene_names(),
        )
        text = yaml.safe_dump(resolved.model_dump(mode="json", exclude_none=True), sort_keys=False)
        (staging / RUN_CONFIG).write_text(text)
        store.close()
        if folder.exists():
            folder.rmdir()  # empty (checked above): the finished run takes its place
        os.replace(staging, folder)
    except (EvomergeError, OSError) as exc:  # told of the folder asked for, not the sibling
        shutil.rmtree(staging, ignore_errors=True)
        reason = str(exc) if isinstance(exc, EvomergeError) else f"--out {folder}: {exc}"
        raise EvomergeError(reason.replace(str(staging), str(folder))) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    store = RunStore.open(folder)
    name_statistics(space, folder)  # data-aware recipes read the run's own statistics
    name_learned(space, folder, resolved)  # and learned ones its learned coefficients
    return Run(folder, resolved, space, store)


def creation_folder(folder: Path, pid: Optional[int] = None) -> Path:
    """The hidden sibling a run is built in by process `pid` (default: this one)."""
    return folder.parent / f".{folder.name}.creating-{os.getpid() if pid is None else pid}"


def remove_abandoned_creations(folder: Path) -> None:
    """Half-built runs of `folder` whose creating process is gone (killed mid-creation)."""
    for leftover in folder.parent.glob(f".{folder.name}.creating-*"):
        pid = leftover.name.rpartition("-")[2]
        if pid.isdigit():
            remove_if_orphaned(leftover, int(pid))


def open_run(folder: Path) -> Run:
    read_run_meta(folder)
    config = RunConfig.load(folder / RUN_CONFIG)
    resolved, space = prepare(config, folder)
    store = RunStore.open(folder)
    if store.gene_names and store.gene_names != space.gene_names():
        raise EvomergeError(f"{folder}: the search space no longer matches the stored genomes")
    name_statistics(space, folder)  # data-aware recipes read the run's own statistics
    name_learned(space, folder, resolved)  # and learned ones its learned coefficients
    return Run(folder, resolved, space, store)
