"""A run config resolved and checked before anything is written: models and paths made absolute,
the search space built, every recipe a candidate or baseline can be planned, the fitness,
optimizer, calibration and learning checked."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import yaml

from evomerge.baselines import LEARNED, BaselineSpec, baseline_recipes
from evomerge.config import LmEvalFitnessSpec, PythonFitness, RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.calibration import check_calibration
from evomerge.learn.in_run import check_learning, needed
from evomerge.merge.engine import plan_for
from evomerge.merge.io import ModelSource
from evomerge.merge.learned import learned_method
from evomerge.optim.registry import Optimizer, make_optimizer
from evomerge.recipe import Recipe
from evomerge.results.store import read_run_meta
from evomerge.results.tracking import check_tracking
from evomerge.search.fixed_stages import merged_model
from evomerge.search.racing import check_stages
from evomerge.spaces import SearchSpace, build_space, read_space_spec
from evomerge.workers.evaluator import load_callable
from evomerge.workers.scoring import task_manager, working_dir

RUN_CONFIG = "run.yaml"  # the resolved config a run folder keeps


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
    manager = task_manager(fitness.include_path, [*fitness.tasks, *held])
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
    manager = task_manager(include_path, tasks)
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
