"""mergekit-evolve's configs, read as they are: the `genome:` and `tasks:` of a mergekit-evolve
file (and its command-line flags) become an evomerge run config searching the same genes.

The genome is mergekit-evolve's: per layer group (layer_granularity layers each), per model, per
filter (and the rest), its method's parameters (weight; density for TIES and DARE-TIES; t for
SLERP). Discrete groups are mergekit slices of their own (`layer_shape: slices`), smooth ones a
gradient across the depth; the optimizer is CMA-ES with mergekit-evolve's start (weights 1/M,
densities 1, SLERP's t 0.5) and step (sigma0 1/6), the fitness lm-eval's weighted sum of the
tasks' metrics. Where evomerge bounds what mergekit-evolve leaves free (it folds genes with
abs()), the bounds hold the same merges: weights in [0, 1] ([-1, 1] with
allow_negative_weights), densities in [0.01, 1], t in [0, 1].
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from evomerge.errors import EvomergeError

log = logging.getLogger("evomerge")

METHOD_PARAMS = {
    "linear": ["weight"],
    "task_arithmetic": ["weight"],
    "ties": ["weight", "density"],
    "dare_ties": ["weight", "density"],
    "slerp": ["t"],
}
NEEDS_BASE = {"ties", "dare_ties", "task_arithmetic"}
NORMALIZED_BY_DEFAULT = {"ties", "dare_ties", "linear"}  # mergekit-evolve's normalize: None
GENOME_FIELDS = {
    "models", "merge_method", "base_model", "tokenizer_source", "layer_granularity",
    "normalize", "allow_negative_weights", "smooth", "filters",
}  # fmt: skip
TOP_FIELDS = {
    "genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
    "fewshot_as_multiturn",
}  # fmt: skip


@dataclass
class EvolveFlags:
    """mergekit-evolve's command-line flags that carry meaning in evomerge (its defaults)."""

    max_fevals: int = 100
    task_search_path: list[str] = field(default_factory=list)
    allow_benchmark_tasks: bool = False
    sigma0: float = 1 / 6
    force_population_size: Optional[int] = None
    random_seed: int = 0
    batch_size: Optional[int] = None
    num_gpus: Optional[int] = None
    trust_remote_code: bool = False
    strategy: str = "pool"


def is_evolve_config(data: Any) -> bool:
    """mergekit-evolve's files are recognised by their `genome:` section."""
    return isinstance(data, dict) and "genome" in data


def to_run_config(
    data: dict[str, Any], flags: EvolveFlags, name: str, depth_of, source: str = "config"
) -> dict[str, Any]:
    """The evomerge run config (as YAML-ready data) of a mergekit-evolve file. `depth_of(ref)`:
    the number of layers of a model (read from its config)."""
    where = f"{source} (a mergekit-evolve config)"
    for key in sorted(set(data) - TOP_FIELDS):
        log.warning(
            "%s: field %r is not mergekit-evolve's; ignored, as mergekit-evolve does", where, key
        )
    genome = data["genome"]
    if not isinstance(genome, dict):
        raise EvomergeError(f"{where}: field 'genome': expected a mapping (models, merge_method)")
    for key in sorted(set(genome) - GENOME_FIELDS):
        log.warning("%s: field 'genome.%s' is not mergekit-evolve's; ignored", where, key)
    method = genome.get("merge_method")
    if method not in METHOD_PARAMS:
        raise EvomergeError(
            f"{where}: field 'genome.merge_method': mergekit-evolve does not search {method!r}; "
            f"use one of {', '.join(METHOD_PARAMS)} (or write an evomerge run config for the rest)"
        )
    refs = _refs(genome.get("models"), "genome.models", where)
    base_ref = genome.get("base_model")
    if base_ref is not None:
        base_ref = _refs([base_ref], "genome.base_model", where)[0]
    if method in NEEDS_BASE and base_ref is None:
        raise EvomergeError(f"{where}: field 'genome.base_model': {method} needs a base model")
    names = _names([*refs, *([base_ref] if base_ref is not None and base_ref not in refs else [])])
    experts = [names[r] for r in refs]
    filters = list(genome.get("filters") or [])
    smooth = bool(genome.get("smooth", False))
    if method == "slerp":
        if smooth or filters:
            raise EvomergeError(f"{where}: field 'genome': slerp takes neither smooth nor filters")
        if len(refs) != 2:
            raise EvomergeError(
                f"{where}: field 'genome.models': slerp merges two models, got {len(refs)}"
            )
    depth = depth_of(refs[0])
    granularity = int(genome.get("layer_granularity") or 0)
    if granularity > 0 and depth % granularity:
        raise EvomergeError(
            f"{where}: field 'genome.layer_granularity': {granularity} does not divide the "
            f"models' {depth} layers; choose a divisor"
        )
    groups = depth // granularity if granularity > 0 else 1
    negative = bool(genome.get("allow_negative_weights", False))
    ranges = {
        "weight": {"low": -1.0 if negative else 0.0, "high": 1.0, "init": round(1 / len(refs), 8)},
        "density": {"low": 0.01, "high": 1.0, "init": 1.0},
        "t": {"low": 0.0, "high": 1.0, "init": 0.5},
    }
    space: dict[str, Any] = {
        "kind": "parameter",
        "method": method,
        "parameters": {p: ranges[p] for p in METHOD_PARAMS[method]},
        "dtype": "bfloat16",  # mergekit-evolve merges and scores in bfloat16
    }
    normalize = genome.get("normalize")
    normalize = method in NORMALIZED_BY_DEFAULT if normalize is None else bool(normalize)
    if method in NORMALIZED_BY_DEFAULT or (method == "task_arithmetic" and normalize):
        space["fixed"] = {"normalize": normalize}
    elif normalize:
        raise EvomergeError(f"{where}: field 'genome.normalize': {method} does not normalize")
    if groups > 1:
        space["layer_groups"] = groups
        space["layer_shape"] = "gradient" if smooth else "slices"
    if filters:
        space["filters"] = filters
    base_name: Optional[str] = None
    if method == "slerp":  # one end is the base: t = 0 is the first model, t = 1 the second
        base_name, experts = experts[0], experts[1:]
    elif base_ref is not None and method in NEEDS_BASE:  # linear merges every listed model
        base_name = names[base_ref]
        experts = [e for e in experts if e != base_name]
    space["models"] = experts
    tokenizer = genome.get("tokenizer_source")
    if tokenizer not in (None, "base", base_ref):
        log.warning(
            "%s: genome.tokenizer_source %r: evomerge takes the tokenizer of the base model "
            "(the models share one vocabulary)", where, tokenizer,
        )  # fmt: skip
    tasks, weights = _tasks(data.get("tasks"), where)
    fitness: dict[str, Any] = {
        "kind": "lm_eval",
        "tasks": tasks,
        "apply_chat_template": bool(data.get("apply_chat_template", True)),
        "fewshot_as_multiturn": bool(data.get("fewshot_as_multiturn", True)),
    }
    if not fitness["apply_chat_template"]:
        fitness["fewshot_as_multiturn"] = False  # lm-eval needs the template for it
    for key in ("limit", "num_fewshot"):
        if data.get(key) is not None:
            fitness[key] = data[key]
    if flags.batch_size is not None:
        fitness["batch_size"] = flags.batch_size
    if len(flags.task_search_path) > 1:
        raise EvomergeError(
            "--task-search-path: evomerge reads one folder of task YAMLs; put them in one folder"
        )
    if flags.task_search_path:
        fitness["include_path"] = flags.task_search_path[0]
    if data.get("shuffle"):
        log.warning(
            "%s: shuffle: every candidate is scored on the same documents (mergekit-evolve's "
            "unseeded shuffle drew new ones per worker); use fitness.samples to choose them", where
        )  # fmt: skip
    options: dict[str, Any] = {"sigma": flags.sigma0}
    if flags.force_population_size is not None:
        options["population_size"] = flags.force_population_size
    if data.get("random_init"):
        options["random_start"] = True
    config: dict[str, Any] = {
        "name": name,
        "models": {names[r]: r for r in names},
        **({"base_model": base_name} if base_name is not None else {}),
        "search_space": space,
        "objectives": [{"name": "score", "weights": weights}],
        "optimizer": {"name": "cma", "options": options},
        "budget": flags.max_fevals,
        "seed": flags.random_seed,
        "fitness": fitness,
        "seed_with_sources": False,  # the search starts where mergekit-evolve's does
    }
    if flags.strategy == "serial":
        config["pool"] = "local"
    if flags.num_gpus is not None:
        config["workers"] = flags.num_gpus
    if flags.allow_benchmark_tasks:
        config["allow_benchmark_fitness"] = True
    if flags.trust_remote_code:
        config["trust_remote_code"] = True
    return config


def _refs(value: Any, at: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise EvomergeError(f"{where}: field '{at}': expected a list of model names or paths")
    refs = []
    for ref in value:
        if isinstance(ref, dict):  # mergekit's long form: {model: {path: ...}} or {path: ...}
            inner = ref.get("model", ref)
            ref = inner.get("path") if isinstance(inner, dict) else inner
        if not isinstance(ref, str) or not ref:
            raise EvomergeError(f"{where}: field '{at}': {ref!r} is not a model name or path")
        if "+" in ref:
            raise EvomergeError(
                f"{where}: field '{at}': {ref!r} applies a LoRA; merge it into its model first "
                "and name that folder"
            )
        refs.append(ref)
    return refs


def _names(refs: list[str]) -> dict[str, str]:
    """Short, unique run-config names for model references (their last path part)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for ref in dict.fromkeys(refs):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref.rstrip("/").rsplit("/", 1)[-1]) or "model"
        name, n = stem, 2
        while name in taken:
            name, n = f"{stem}_{n}", n + 1
        taken.add(name)
        names[ref] = name
    return names


def _tasks(value: Any, where: str) -> tuple[list[str], dict[str, float]]:
    if not isinstance(value, list) or not value:
        raise EvomergeError(
            f"{where}: field 'tasks': expected a list of tasks (name, weight, metric)"
        )
    weights: dict[str, float] = {}
    for i, task in enumerate(value):
        task = {"name": task} if isinstance(task, str) else task
        if not isinstance(task, dict) or not isinstance(task.get("name"), str):
            raise EvomergeError(f"{where}: field 'tasks.{i}': give a task name")
        key = f"{task['name']}: {task.get('metric', 'acc,none')}"
        weights[key] = weights.get(key, 0.0) + float(task.get("weight", 1.0))
    tasks = list(dict.fromkeys(k.split(": ", 1)[0] for k in weights))
    return tasks, weights
