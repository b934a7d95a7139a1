"""The population manager: ask the optimizer, dispatch, commit, tell, checkpoint; and resume.

Every candidate carries its ask index. Before dispatching one, the store is asked whether that
index with that genome was already scored (a resumed run re-asks what it had asked before the
crash): if so the stored result is told and nothing is re-scored. Results are committed to the
store before the optimizer is told, and the optimizer is checkpointed after every tell (a restored
optimizer re-asks exactly what it had asked since),
so a SIGKILL at any moment loses nothing committed and repeats only what was in flight. With
one worker the candidate sequence of a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from tqdm.auto import tqdm

from evomerge.baselines import LEARNED, BaselineSpec, baseline_recipes
from evomerge.config import LmEvalFitnessSpec, PythonFitness, RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.calibration import check_calibration, ensure_statistics, name_statistics
from evomerge.learn.in_run import (
    check_learning,
    ensure_learned,
    is_learned,
    learns_alike,
    name_learned,
    needed,
    same_merge,
)
from evomerge.merge.engine import plan_for, remove_if_orphaned
from evomerge.merge.io import ModelSource
from evomerge.merge.learned import learned_method
from evomerge.merge.methods import get_method
from evomerge.optim.registry import Candidate, Evaluation, Optimizer, make_optimizer
from evomerge.recipe import Recipe
from evomerge.results.pareto import pareto_records
from evomerge.results.store import Record, RunStore, genome_key, read_run_meta
from evomerge.results.tracking import MlflowTracker, check_tracking
from evomerge.search.fixed_stages import merged_model
from evomerge.search.racing import DocumentPlan, Race, Racer, check_stages
from evomerge.spaces import SearchSpace, build_space, read_space_spec
from evomerge.workers.evaluator import Outcome, load_callable
from evomerge.workers.pool import Pool
from evomerge.workers.scoring import task_manager, working_dir

RUN_CONFIG = "run.yaml"
BASELINE = "baseline:"  # seed label prefix of a baseline merge
MISSING_METRIC = "the fitness gives no metric"
log = logging.getLogger("evomerge")


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


# ----- building ------------------------------------------------------------------------------
def prepare(config: RunConfig, folder: Optional[Path] = None) -> tuple[RunConfig, SearchSpace]:
    """Resolve the config into a self-contained one (space inlined, local paths absolute) and
    build its search space; every error surfaces here, before anything is written. The
    config's `offline` switch is applied to this process here, before any hub library loads.
    `folder`: the run folder, where learned baselines keep their coefficients."""
    os.environ.update(config.offline_env())
    models = {  # a recipe file is its merge, made once (the earlier stages of a search)
        name: merged_model(ref, config.device, config.allow_pickle)
        or (str(Path(ref).resolve()) if Path(ref).exists() else ref)
        for name, ref in config.models.items()
    }
    fitness = config.fitness
    if isinstance(fitness, PythonFitness) and fitness.path:
        fitness = fitness.model_copy(update={"path": str(Path(fitness.path).resolve())})
    if not isinstance(fitness, PythonFitness) and fitness.include_path:
        include = Path(fitness.include_path)
        fitness = fitness.model_copy(
            update={"include_path": str(include.resolve()) if include.exists() else str(include)}
        )
    spec = read_space_spec(config.search_space)
    tracking = config.tracking
    check_tracking(tracking)
    if tracking is not None and "://" not in tracking.mlflow:  # a folder: the same on resume
        tracking = tracking.model_copy(update={"mlflow": str(Path(tracking.mlflow).resolve())})
    resolved = config.model_copy(
        update={
            "models": models,
            "search_space": spec.model_dump(mode="json", exclude_none=True),
            "fitness": fitness,
            "tracking": tracking,
        }
    )
    opened: dict[str, ModelSource] = {}  # headers only: no weights are read here

    def source(ref: str) -> ModelSource:
        if ref not in opened:
            opened[ref] = ModelSource(ref, allow_pickle=config.allow_pickle)
        return opened[ref]

    space = build_space(spec, models, config.base_model, lambda n: source(models[n]).num_layers)
    if space.size == 0:
        raise EvomergeError("field 'search_space': the space has no genes to search")
    sources = {ref: source(ref) for ref in dict.fromkeys(models.values())}
    check_space_recipes(space, sources)
    learned_dir = (Path(folder) if folder is not None else Path.cwd()) / LEARNED
    baselines = baseline_recipes(
        config.baselines, models, config.base_model, config.seed, learned_dir=learned_dir.resolve()
    )
    for name, recipe in baselines.items():
        parsed = Recipe.from_yaml_text(recipe)
        unlearned = (  # the run learns it before the first candidate, and checks it then
            learned_method(recipe) is not None
            and parsed.coefficients is not None
            and learned_dir.resolve() in Path(parsed.coefficients).parents
            and not Path(parsed.coefficients).is_file()
        )
        try:
            plan_for(
                parsed,
                {**sources, **_extra_sources(recipe, source)},
                statistics_required=not unlearned,
            )
        except EvomergeError as exc:
            raise EvomergeError(f"field 'baselines' ({name}): {exc}") from None
    if config.references_from:
        resolved.references_from = str(Path(config.references_from).resolve())
        references_config(resolved)
    # the run folder keeps each baseline as the recipe it scored (no paths to files outside it)
    resolved.baselines = [
        BaselineSpec(name=name, recipe=yaml.safe_load(recipe)) for name, recipe in baselines.items()
    ]
    # workers load only what some candidate or baseline merges (and the base): a `models:` entry
    # nothing reaches costs no memory, and is not scored as a source
    reached = {*space.model_names(), *([config.base_model] if config.base_model else [])}
    reached_refs = {ref for recipe in baselines.values() for ref in recipe_refs(recipe)}
    resolved.models = {
        name: ref for name, ref in models.items() if name in reached or ref in reached_refs
    }
    optimizer_for(resolved, space)  # bad optimizer names and options fail here
    check_fitness(resolved)
    if resolved.calibration is not None:
        calibration = resolved.calibration
        absolute = lambda f: str(Path(f).resolve()) if Path(f).exists() else f  # noqa: E731
        resolved.calibration = calibration.model_copy(
            update={
                "file": None if calibration.file is None else absolute(calibration.file),
                "files": {  # only the models the run keeps: run.yaml must load again
                    k: absolute(v) for k, v in calibration.files.items() if k in resolved.models
                },
            }
        )
    check_calibration(resolved, space)
    check_learning(resolved, needed(resolved, baselines, space, learned_dir.parent))
    return resolved, space


def recipe_refs(recipe: str) -> list[str]:
    """The model references (folders or hub names) a recipe's merge reads."""
    data = Recipe.from_yaml_text(recipe)
    refs = [m.model for m in data.models or [] if not isinstance(data.models, dict)]
    if isinstance(data.models, dict):
        refs += [ref for ref in data.models.values() if isinstance(ref, str)]
    refs += [p.model for s in data.slices or [] for p in s.sources]
    refs += [data.base_model] if data.base_model else []
    return list(dict.fromkeys(refs))


def _extra_sources(recipe: str, source) -> dict[str, ModelSource]:
    """Models a baseline recipe names that are not the run's own (opened, headers only)."""
    return {ref: source(ref) for ref in recipe_refs(recipe)}


def check_space_recipes(space: SearchSpace, sources: dict[str, ModelSource]) -> None:
    """Every candidate must at least plan: a range a method cannot take (a density of 0, a
    negative t) fails here, before the run, rather than as a failed evaluation at every corner
    the optimizer visits."""
    for label, part, genome in space.must_plan():
        recipe = part.decode(genome)
        # a learned merge's own file (a space that names one) is checked now, against the
        # space's models; the run's learned file does not exist before the run learns it
        given = recipe.coefficients is not None and Path(recipe.coefficients).is_file()
        try:
            plan_for(recipe, sources, statistics_required=given)
        except EvomergeError as exc:
            raise EvomergeError(
                f"field 'search_space': at {label} the recipe is invalid: {exc}"
            ) from None


def check_fitness(config: RunConfig) -> None:
    """Fail before the run starts on a fitness that cannot work: an unimportable function, an
    unknown lm-eval task or task folder."""
    fitness = config.fitness
    if isinstance(fitness, PythonFitness):
        load_callable(fitness.function, (Path(fitness.path),) if fitness.path else ())
        return
    if fitness.include_path and not Path(fitness.include_path).is_dir():
        raise EvomergeError(f"field 'fitness.include_path': {fitness.include_path} is not a folder")
    held = fitness.held_out.tasks if fitness.held_out else []
    benchmark = next((t for t in fitness.tasks if is_benchmark(t)), None)
    if benchmark and not held and not config.allow_benchmark_fitness:
        raise EvomergeError(
            f"field 'fitness.tasks': {benchmark!r} is a public benchmark's test split, and with no "
            "held-out tasks the run would report the scores it was tuned on; add "
            "fitness.held_out, or set allow_benchmark_fitness: true"
        )
    manager = task_manager(fitness.include_path)
    for field, names in (("fitness.tasks", fitness.tasks), ("fitness.held_out.tasks", held)):
        unknown = [t for t in names if t not in manager.all_tasks]
        if unknown:
            raise EvomergeError(f"field '{field}': lm-eval knows no task {unknown[0]!r}")
    if fitness.fidelity is not None:
        problem = check_stages(fitness.fidelity, task_documents(fitness))
        if problem:
            raise EvomergeError(f"field 'fitness.fidelity.stages': {problem}")


@functools.lru_cache(maxsize=8)
def _task_sizes(tasks: tuple[str, ...], include_path: Optional[str]) -> dict[str, int]:
    manager = task_manager(include_path)
    with working_dir(Path(include_path) if include_path else None):
        loaded = manager.load(list(tasks))["tasks"]
    return {name: len(task.eval_docs) for name, task in loaded.items() if name in tasks}


def task_documents(fitness: LmEvalFitnessSpec) -> dict[str, list[int]]:
    """The document ids a full-fidelity evaluation scores, per fitness task: the config's
    `samples`, else the first `limit`, else all."""
    sizes = _task_sizes(tuple(fitness.tasks), fitness.include_path)
    out = {}
    for task in fitness.tasks:
        if fitness.samples and task in fitness.samples:
            out[task] = list(fitness.samples[task])
        else:
            out[task] = list(range(min(sizes[task], fitness.limit or sizes[task])))
    return out


# lm-eval task families that are public benchmarks' test sets: searching on one and quoting it
# is tuning on the test set
BENCHMARK_FAMILIES = (
    "mmlu", "gsm8k", "arc_", "hellaswag", "winogrande", "truthfulqa", "piqa", "boolq",
    "lambada", "bbh", "gpqa", "ifeval", "hendrycks_math", "minerva_math", "mathqa", "humaneval",
    "mbpp", "leaderboard", "openbookqa",
)  # fmt: skip


def is_benchmark(task: str) -> bool:
    name = task.lower()
    return any(
        name == family.rstrip("_") or name.startswith(family) for family in BENCHMARK_FAMILIES
    )


def optimizer_for(config: RunConfig, space: SearchSpace) -> Optimizer:
    """A fresh optimizer of the run's kind over the space's box (also how configs are checked)."""
    lower, upper = space.bounds()
    return make_optimizer(
        config.optimizer.name,
        config.optimizer.options,
        lower,
        upper,
        space.initial(),
        len(config.objectives),
        config.seed,
        space.step_sizes(),
    )


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


# ----- the loop ------------------------------------------------------------------------------
def drive(run: Run, pool: Pool, progress: bool = True) -> None:
    """Run until the budget is spent; safe to kill at any moment and call again."""
    tracker = None
    try:
        tracker = MlflowTracker.for_run(run)
        ensure_statistics(run.folder, run.config, run.space, pool)
        config = run.config
        baselines = baseline_recipes(
            config.baselines, config.models, config.base_model, config.seed
        )
        ensure_learned(run.folder, config, baselines, run.space, progress)
        score_references(run, pool, progress)
        if tracker is not None:
            tracker.start(run.store.records())
        SearchLoop(run, pool, progress, tracker).run_to_budget()
        if getattr(run.config.fitness, "held_out", None) is not None:
            score_held_out(run, pool, progress)
    except BaseException:
        if tracker is not None:
            tracker.finish("KILLED")
        raise
    else:
        if tracker is not None:
            tracker.finish()
    finally:
        pool.close()


class SearchLoop:
    """The manager loop as named steps: restore the optimizer, then until the budget is spent
    dispatch candidates (replaying ones the store already holds, reusing identical merges) and
    record each result (commit, then tell, then checkpoint)."""

    def __init__(
        self,
        run: Run,
        pool: Pool,
        progress: bool = True,
        tracker: Optional[MlflowTracker] = None,
    ) -> None:
        self.run, self.pool, self.store = run, pool, run.store
        self.tracker = tracker
        records = self.store.records()
        # scored before a restart, keyed by (ask index, genome): told again, never re-scored
        self.replayable = {
            (r.index, genome_key(r.genome)): r
            for r in records
            if r.origin in ("optimizer", "source", "baseline")
        }
        self.sources = self.store.sources()
        self.baselines = self.store.baselines()
        self.scored = {recipe_key(r.recipe): r for r in records if not r.failed}
        self.racer, self.pending = self.restore_races(records)
        self.racing: dict[int, tuple[Candidate, Race]] = {}  # index -> its race, in the pool
        self.done = len(self.replayable)
        self.failing: list[str] = []  # errors of the evaluations failed in a row just now
        self.optimizer, self.sequence = self.restore()
        self.queue: deque[Candidate] = deque(self.optimizer.pending())
        self.bar = tqdm(
            total=run.config.budget,
            initial=min(self.done, run.config.budget),
            desc="evaluations",
            unit="eval",
            disable=not progress,
            dynamic_ncols=True,
        )

    def restore_races(self, records: list[Record]) -> tuple[Optional[Racer], dict[int, Race]]:
        """Racing state from the store: every stage result committed or saved between stages
        (the promotion windows), and the races a crash cut short (finished on re-ask)."""
        plan = self.run.document_plan
        if plan is None:
            return None, {}
        fitness = self.run.config.fitness
        racer = Racer(fitness.fidelity, plan, self.run.config.objectives)
        committed = {r.index for r in records}
        for r in records:
            if r.stages and not r.worker.startswith("cache of"):
                racer.know(
                    Race.from_json(
                        {
                            "index": r.index,
                            "genome_key": genome_key(r.genome),
                            "recipe": r.recipe,
                            "stages": r.stages,
                            "documents": r.per_document or {},
                        }
                    )
                )
        pending = {}
        for index, data in self.store.races().items():
            if index not in committed:
                pending[index] = Race.from_json(data)
                racer.know(pending[index])
        for result in [*self.sources.values(), *self.baselines.values()]:
            racer.know_reference(result.get("per_document"))
        return racer, pending

    def restore(self) -> tuple[Optimizer, int]:
        """The optimizer as last checkpointed (a fresh one before the first tell), and the
        checkpoint's sequence number."""
        optimizer = self.run.new_optimizer()
        checkpoint = self.store.load_checkpoint()
        if checkpoint is None:
            return optimizer, 0
        optimizer.load_state_dict(checkpoint[0])
        return optimizer, checkpoint[1]

    def run_to_budget(self) -> None:
        try:
            while True:
                self.dispatch()
                if self.pool.in_flight() == 0:
                    break
                for candidate, recipe, outcome in self.pool.wait():
                    self.receive(candidate, recipe, outcome)
        finally:
            self.bar.close()

    # ----- dispatch ----------------------------------------------------------------------------
    def room(self) -> int:
        """How many more candidates to hand to the pool now: a generational optimizer's whole
        generation (the pool queues what its workers cannot start yet, so none idles while the
        generation has work), a steady-state one's as many as workers are free (each new
        candidate then learns from the newest results); never past the budget."""
        open_now = len(self.racing) if self.racer else self.pool.in_flight()
        left = self.run.config.budget - self.done - open_now
        return left if self.optimizer.generational else min(left, self.pool.free())

    def dispatch(self) -> None:
        while (room := self.room()) > 0:
            if not self.queue:
                asked = self.optimizer.ask(room)  # no checkpoint: restored, it asks these again
                if not asked:
                    return  # a generation waits for its results
                self.queue.extend(asked)
            candidate = self.queue.popleft()
            if self.replay(candidate) or self.resume_race(candidate):
                continue
            if self.reuse_source(candidate):
                continue
            seed = self.run.candidate_seed(candidate.index)
            recipe_yaml = self.run.space.decode(candidate.genome, seed).to_yaml()
            if self.reuse(candidate, recipe_yaml):
                continue
            if self.racer is not None:
                race = Race(candidate.index, genome_key(candidate.genome), recipe_yaml)
                self.next_stage(candidate, race)
            else:
                self.pool.submit(candidate, recipe_yaml)

    def replay(self, candidate: Candidate) -> bool:
        """A re-asked candidate the store already holds is told from the store."""
        stored = self.replayable.pop((candidate.index, genome_key(candidate.genome)), None)
        if stored is None:
            return False
        self.tell(candidate, stored)
        return True

    def reuse_source(self, candidate: Candidate) -> bool:
        """A seed is a source model or baseline the run scored before the search: its score is
        committed again, with the recipe that was scored, not re-made."""
        label = self.run.seed_source(candidate.index)
        if label is None:
            return False
        if label.startswith(BASELINE):
            name, origin = label.removeprefix(BASELINE), "baseline"
            scored = self.baselines.get(name, {})
            recipe = scored.get("recipe")
        else:
            name, origin = label, "source"
            scored = self.sources.get(name, {})
            recipe = source_recipe(self.run.config.models[name])
        if not scored.get("values") or "per_example" not in scored or recipe is None:
            return False
        per_example = scored["per_example"]
        if self.racer is not None:  # the first stage's documents, as every candidate has
            per_example = self.racer.per_example(scored.get("per_document") or {})
        record = Record(
            index=candidate.index,
            genome=candidate.genome,
            recipe=recipe,
            values=scored["values"],
            metrics=scored.get("metrics") or {},
            per_example=per_example,
            worker=f"{origin} {name}",
            origin=origin,
        )
        self.commit(record)
        self.tell(candidate, record)
        return True

    def reuse(self, candidate: Candidate, recipe_yaml: str) -> bool:
        """A merge identical to one already scored is committed with that score, not re-scored."""
        twin = self.scored.get(recipe_key(recipe_yaml))
        if twin is None:
            return False
        record = replace(
            twin,
            index=candidate.index,
            genome=candidate.genome,
            seconds=0.0,
            worker=f"cache of #{twin.index}",
        )
        self.commit(record)
        self.tell(candidate, record)
        return True

    # ----- racing ------------------------------------------------------------------------------
    def next_stage(self, candidate: Candidate, race: Race) -> None:
        """Send a racing candidate to be scored on the documents its next stage adds."""
        assert self.run.document_plan is not None
        self.racing[candidate.index] = (candidate, race)
        docs = self.run.document_plan.new_docs(len(race.stages))
        self.pool.submit(candidate, race.recipe, docs=docs)

    def resume_race(self, candidate: Candidate) -> bool:
        """A re-asked candidate whose race a crash cut short goes on from its last stage."""
        race = self.pending.get(candidate.index)
        if race is None or race.genome_key != genome_key(candidate.genome) or not race.stages:
            return False
        del self.pending[candidate.index]
        if race.stages[-1].promoted:
            self.next_stage(candidate, race)
        else:
            self.finish_race(candidate, race)
        return True

    def receive(self, candidate: Candidate, recipe: str, outcome: Outcome) -> None:
        """A result from the pool: a racing stage, or a whole evaluation."""
        if self.racer is None or candidate.index not in self.racing:
            self.record(candidate, recipe, outcome)
            return
        race = self.racing[candidate.index][1]
        if outcome.error is None and outcome.per_document is None:
            outcome = replace(outcome, error="the fitness gave no per-document results to race")
        if outcome.error is not None:
            if not race.stages:  # the first stage failed: the candidate failed
                del self.racing[candidate.index]
                self.record(candidate, recipe, outcome)
                return
            log.warning("candidate #%d failed a later stage (%s)", candidate.index, outcome.error)
            race.stages[-1].promoted = False  # it ends where it got to
            self.finish_race(candidate, race)
            return
        stage = self.racer.add_stage(
            race, outcome.per_document, self.values_of, outcome.seconds, outcome.worker
        )
        if stage.values is None:  # a metric the objectives need is missing: a failed record
            del self.racing[candidate.index]
            self.record(candidate, recipe, replace(outcome, metrics=stage.metrics))
            return
        self.store.set_race(candidate.index, race.to_json())  # before any further step
        if stage.promoted:
            self.next_stage(candidate, race)
        else:
            self.finish_race(candidate, race)

    def values_of(self, metrics: dict[str, float]) -> Optional[dict[str, float]]:
        return objective_values(self.run.config.objectives, metrics)[0]

    def finish_race(self, candidate: Candidate, race: Race) -> None:
        """Commit a candidate whose race ended, with what racing tells for it, then tell."""
        assert self.racer is not None
        self.racing.pop(candidate.index, None)
        last = race.stages[-1]
        record = Record(
            index=candidate.index,
            genome=candidate.genome,
            recipe=race.recipe,
            values=self.racer.told(race, self.values_of),
            metrics=last.metrics,
            per_example=self.racer.per_example(race.documents),
            seconds=sum(s.seconds for s in race.stages),
            worker=last.worker,
            stages=race.to_json()["stages"],
            final=len(race.stages) == self.racer.plan.n_stages,
            per_document=race.documents,
        )
        self.settle(candidate, record)

    # ----- results -----------------------------------------------------------------------------
    def record(self, candidate: Candidate, recipe: str, outcome: Outcome) -> None:
        """Commit a scored candidate, then tell the optimizer (never the other way round)."""
        self.settle(candidate, to_record(self.run, candidate, recipe, outcome))

    def settle(self, candidate: Candidate, record: Record) -> None:
        """Label a seed's record, commit it, then tell the optimizer and watch for failures."""
        label = self.run.seed_source(candidate.index)
        if label is not None:
            record.origin = "baseline" if label.startswith(BASELINE) else "source"
        self.commit(record)
        if not record.failed:
            self.scored.setdefault(recipe_key(record.recipe), record)
        self.bar.set_postfix_str(_postfix(record), refresh=False)
        if record.error and record.error.startswith(MISSING_METRIC):
            raise EvomergeError(f"field 'objectives': {record.error}")
        self.tell(candidate, record)
        self.fail_fast(record)

    def fail_fast(self, record: Record) -> None:
        """Stop a run whose evaluations keep failing, before it spends its budget on them; what
        was committed stays, and the run resumes once the cause is fixed."""
        self.failing = self.failing + [record.error] if record.failed else []
        if len(self.failing) < self.run.config.max_consecutive_failures:
            return
        error, count = Counter(self.failing).most_common(1)[0]
        raise EvomergeError(
            f"{len(self.failing)} evaluations in a row failed ({count} with: {error}); fix the "
            f"cause, then continue with `evomerge resume {self.run.folder}`"
        )

    def commit(self, record: Record) -> None:
        self.store.commit(record)
        self.done += 1
        self.bar.update(1)
        if self.tracker is not None:
            self.tracker.log(record)

    def tell(self, candidate: Candidate, record: Record) -> None:
        self.optimizer.tell(
            Evaluation(
                candidate.index,
                candidate.genome,
                self.run.losses(record),
                None if record.per_example is None else np.asarray(record.per_example),
            )
        )
        self.checkpoint()

    def checkpoint(self) -> None:
        """After every tell: a restored optimizer re-asks exactly what it asked since."""
        self.sequence += 1
        self.store.save_checkpoint(self.optimizer.state_dict(), self.sequence)


def source_recipe(ref: str) -> str:
    """A source model as a recipe: itself, unchanged (linear, weight 1)."""
    return Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
    ).to_yaml()


def reference_recipes(run: Run) -> dict[tuple[str, str], str]:
    """(kind, name) -> recipe of what the search is measured against: the source models (unless
    score_sources is off) and the baseline merges."""
    out = {}
    if run.config.score_sources:
        for name, ref in run.config.models.items():
            out[("source", name)] = source_recipe(ref)
    baselines = baseline_recipes(
        run.config.baselines, run.config.models, run.config.base_model, run.config.seed
    )
    out.update({("baseline", name): recipe for name, recipe in baselines.items()})
    return out


def stored_references(run: Run) -> dict[tuple[str, str], dict]:
    stored = {("source", k): v for k, v in run.store.sources().items()}
    stored.update({("baseline", k): v for k, v in run.store.baselines().items()})
    return stored


def store_reference(run: Run, key: tuple[str, str], result: dict) -> None:
    kind, name = key
    (run.store.set_source if kind == "source" else run.store.set_baseline)(name, result)


def references_config(config: RunConfig) -> RunConfig:
    """The `references_from` run's config, refused unless it scores as this one does."""
    folder = Path(config.references_from or "")
    try:
        read_run_meta(folder)
    except EvomergeError as exc:
        raise EvomergeError(f"field 'references_from': {exc}") from None
    other = RunConfig.load(folder / RUN_CONFIG)

    def scoring(c: RunConfig) -> dict:  # racing changes how candidates are scored, not these
        data = c.model_dump(include={"fitness", "objectives", "score_dtype"})
        data["fitness"].pop("fidelity", None)
        return data

    if scoring(other) != scoring(config):
        raise EvomergeError(
            f"field 'references_from': {folder} scored with another fitness, objectives or "
            "score_dtype; its scores cannot stand for this run's"
        )
    return other


def borrowed_references(run: Run) -> dict[tuple[str, str], dict]:
    """Scores of this run's sources and baselines held by the `references_from` run, when
    they were scored the same way (fitness, objectives, score_dtype) on the same recipe (its
    failures are not scores: this run scores those itself)."""
    if not run.config.references_from:
        return {}
    folder = Path(run.config.references_from)
    other = references_config(run.config)
    theirs = Run(folder, other, run.space, RunStore.open(folder))
    their_recipes = reference_recipes(theirs)
    mine = reference_recipes(run)
    alike = learns_alike(run.config, other)
    return {
        key: result
        for key, result in stored_references(theirs).items()
        if key in mine
        and (alike or not is_learned(mine[key]))
        and same_merge(their_recipes.get(key), mine[key], folder, run.folder)
        and not result.get("error")
    }


def score_references(run: Run, pool: Pool, progress: bool = True) -> None:
    """Score every source model and baseline merge once on the fitness tasks (not counted in
    the budget, not told to the optimizer): status and the report set the search against them,
    and the hypervolume reference defaults to the sources' worst values. One that failed
    (out of memory, a fitness bug since fixed) is scored again when the run resumes."""
    done = {
        key: result for key, result in stored_references(run).items() if not result.get("error")
    }
    recipes = reference_recipes(run)
    for key, result in borrowed_references(run).items():
        if key in recipes and key not in done:
            store_reference(run, key, result)
            done[key] = result
    todo = [(key, recipe) for key, recipe in recipes.items() if key not in done]
    if not todo:
        return
    jobs = [(Candidate(-1 - k, np.zeros(0)), recipe, False) for k, (_, recipe) in enumerate(todo)]
    bar = tqdm(total=len(todo), desc="sources and baselines", unit="model", disable=not progress)
    for candidate, recipe, outcome in score_all(pool, jobs):
        key = todo[-1 - candidate.index][0]
        record = to_record(run, candidate, recipe, outcome)
        result = {
            "values": record.values,
            "metrics": outcome.metrics,
            "per_example": outcome.per_example,
            "error": record.error,
        }
        if outcome.per_document is not None:
            result["per_document"] = outcome.per_document
        store_reference(run, key, result if key[0] == "source" else {**result, "recipe": recipe})
        bar.update(1)
    bar.close()


def score_held_out(run: Run, pool: Pool, progress: bool = True) -> None:
    """Score the Pareto set, the source models and the baselines on the held-out tasks (once
    each, stored with them)."""
    front = pareto_records(run.store.records(), run.config.objectives)
    jobs = [(Candidate(r.number, r.genome), r.recipe, True) for r in front if r.held_out is None]
    stored = stored_references(run)
    recipes = reference_recipes(run)
    references = [k for k in recipes if k in stored and stored[k].get("held_out") is None]
    jobs += [
        (Candidate(-1 - k, np.zeros(0)), recipes[key], True) for k, key in enumerate(references)
    ]
    bar = tqdm(total=len(jobs), desc="held-out", unit="model", disable=not progress)
    for candidate, _, outcome in score_all(pool, jobs):
        metrics = outcome.metrics if outcome.error is None else {"error": outcome.error}
        if candidate.index >= 0:  # the index here is the store number
            run.store.set_held_out(candidate.index, metrics)
        else:
            key = references[-1 - candidate.index]
            store_reference(run, key, {**stored[key], "held_out": metrics})
        bar.update(1)
    bar.close()


def score_all(
    pool: Pool, jobs: list[tuple[Candidate, str, bool]]
) -> Iterator[tuple[Candidate, str, Outcome]]:
    """Score (candidate, recipe, held_out) jobs outside the search loop, keeping every worker
    busy; results come back as they finish."""
    queue = deque(jobs)
    while queue or pool.in_flight():
        while queue and pool.free() > 0:
            pool.submit(*queue.popleft())
        yield from pool.wait()


@functools.lru_cache(maxsize=4096)
def recipe_key(recipe_yaml: str) -> str:
    """Identity of a merge: the recipe without seeds when no method in it draws randomness."""
    recipe = Recipe.from_yaml_text(recipe_yaml)
    data = recipe.model_dump(mode="json", exclude_none=True)
    if not _stochastic(recipe):
        data = _without_seeds(data)
    return hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=16).hexdigest()


def _stochastic(recipe: Recipe) -> bool:
    if recipe.merge_method != "dataflow" and get_method(recipe.merge_method).stochastic:
        return True
    models = recipe.models.values() if isinstance(recipe.models, dict) else []
    return any(isinstance(m, Recipe) and _stochastic(m) for m in models)


def _without_seeds(data):
    if isinstance(data, dict):
        return {k: _without_seeds(v) for k, v in data.items() if k != "seed"}
    if isinstance(data, list):
        return [_without_seeds(v) for v in data]
    return data


def objective_values(
    objectives: list, metrics: dict[str, float]
) -> tuple[Optional[dict[str, float]], Optional[str]]:
    """The objectives' values from a fitness's metrics, or None and why not."""
    values = {}
    for o in objectives:
        value = o.value(metrics)
        if value is None:
            missing = next(m for m in o.metrics() if m not in metrics)
            return None, (
                f"{MISSING_METRIC} {missing!r} for objective {o.name!r}; it gave "
                f"{', '.join(sorted(metrics)) or 'nothing'}; fix the metric name"
            )
        if not math.isfinite(value):
            return None, f"objective {o.name!r} is {value}"
        values[o.name] = value
    return values, None


def to_record(run: Run, candidate: Candidate, recipe: str, outcome: Outcome) -> Record:
    values, error = None, outcome.error
    if error is None:
        values, error = objective_values(run.config.objectives, outcome.metrics)
    return Record(
        index=candidate.index,
        genome=candidate.genome,
        recipe=recipe,
        values=values,
        metrics=outcome.metrics,
        per_example=outcome.per_example,
        seconds=outcome.seconds,
        worker=outcome.worker,
        error=error,
        per_document=outcome.per_document,
    )


def _postfix(record: Record) -> str:
    if record.values is None:
        return f"#{record.index} failed"
    return f"#{record.index} " + " ".join(f"{k}={v:.4g}" for k, v in record.values.items())
