"""The evaluator: one device's worth of work. It loads the source tensors once onto its device,
keeps one live model, writes each recipe into it in place and scores it. The in-process pool
(pool.py) holds one; the Ray pool (ray_pool.py) runs one inside each actor."""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.engine import load_source_tensors, merge_into_model, pick_device, plan_for
from evomerge.merge.io import ModelSource
from evomerge.merge.live import build_live_model
from evomerge.merge.memory import scoring_allocations
from evomerge.merge.ops import CHUNK_BYTES
from evomerge.merge.statistics import measure_source
from evomerge.recipe import Recipe
from evomerge.workers.footprint import sources_placement
from evomerge.workers.scoring import LmEvalFitness

# a source's calibration statistics to measure: (model reference, texts, kinds, max length)
SourceJob = tuple[str, list[str], list[str], int]


@dataclass
class Outcome:
    """What scoring one recipe gave: metrics, or the reason it failed."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_example: Optional[list[float]] = None
    # task -> document id -> "metric,filter" -> value (lm-eval fitness; what racing adds up)
    per_document: Optional[dict[str, dict[str, dict[str, float]]]] = None
    error: Optional[str] = None
    seconds: float = 0.0
    worker: str = ""


def load_callable(spec: str, search_dirs: tuple[Path, ...] = ()) -> Callable[..., Any]:
    """`package.module:function`, importable from the current folder or `search_dirs`."""
    module_name, _, attr = spec.partition(":")
    for folder in (Path.cwd(), *search_dirs):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvomergeError(
            f"field 'fitness.function': cannot import {module_name} ({exc})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvomergeError(f"field 'fitness.function': {module_name} has no function {attr!r}")
    return fn


def make_fitness(spec: dict[str, Any]) -> Callable[..., Any]:
    """The fitness callable a run config's `fitness` mapping describes."""
    if spec.get("kind") == "lm_eval":
        options = {k: v for k, v in spec.items() if k not in ("kind", "held_out", "fidelity")}
        return LmEvalFitness(**options)
    fn = load_callable(spec["function"], (Path(spec["path"]),) if spec.get("path") else ())
    options = spec.get("options") or {}
    return lambda model, tokenizer: fn(model, tokenizer, **options)


def node_name() -> str:
    """This machine as a cluster user knows it: host name, and its address within Ray."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host} ({ray.util.get_node_ip_address()})"
    except Exception:  # outside Ray, or Ray without a node address: the host name says enough
        pass
    return host


class Evaluator:
    def __init__(
        self,
        refs: list[str],
        fitness: dict[str, Any],
        device: str = "auto",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        name: str = "local",
        threads: Optional[int] = None,
        score_dtype: Optional[str] = None,
        sources_on: str = "auto",
        reserve_bytes: int = 0,
        chunk_bytes: Optional[int] = CHUNK_BYTES,
        gpus: float = 1.0,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        # a worker given several GPUs spreads its live model's layers over them
        self.devices = [self.device]
        if self.device.type == "cuda" and gpus >= 2:
            count = min(int(gpus), torch.cuda.device_count())
            self.devices = [torch.device("cuda", i) for i in range(count)]
        try:  # on a cluster each node resolves the paths (and hub names, via its own cache)
            self.sources = {ref: ModelSource(ref, allow_pickle=allow_pickle) for ref in refs}
        except EvomergeError as exc:
            raise EvomergeError(f"worker {name} on node {node_name()}: {exc}") from None
        held = sum(info.nbytes for s in self.sources.values() for info in s.index.values())
        largest = max(sum(info.nbytes for info in s.index.values()) for s in self.sources.values())
        # where the driver could not say (no footprint), the live model is about one source
        self.sources_on = sources_placement(sources_on, self.device, held, reserve_bytes or largest)
        host = self.sources_on == "host" and self.device.type != "cpu"
        self.tensors = load_source_tensors(
            self.sources,
            "cpu" if host else self.device,
            pin=host and self.device.type == "cuda",
        )
        self.chunk_bytes = chunk_bytes
        self.fitness = make_fitness(fitness)
        self.fitness_spec = fitness
        self.held_out_fitness: Optional[Callable[..., Any]] = None
        self.trust_remote_code = trust_remote_code
        self.score_dtype = score_dtype
        self.name = name
        self.model: Optional[torch.nn.Module] = None
        self.model_key: Optional[str] = None
        self.model_config: Optional[dict[str, Any]] = None  # the live model's shape
        self.tokenizers: dict[str, Any] = {}
        # build the live model now (a PS recipe keeps the first source's shape), so that a
        # candidate's time, and its timeout, never include the worker's start-up
        self.live_model(dict(self.sources[refs[0]].config))

    def live_model(self, config: dict[str, Any]) -> torch.nn.Module:
        """The live model (uninitialised: the plan writes all of it), rebuilt only when the
        recipe changes its shape (DFS depth)."""
        key = json.dumps(config, sort_keys=True, default=str)
        if self.model is None or key != self.model_key:
            dtype = (
                self.score_dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
            )
            self.release_model()  # the old model's memory is free before the new one exists
            self.model = build_live_model(
                config,
                self.device,
                getattr(torch, str(dtype).removeprefix("torch.")),
                self.trust_remote_code,
                self.devices,
            )
            self.model_key, self.model_config = key, config
        return self.model

    def release_model(self) -> None:
        """Drop the live model and every reference a fitness holds to it, so that its memory is
        free before a model of another shape is built."""
        for fitness in (self.fitness, self.held_out_fitness):
            release = getattr(fitness, "release", None)
            if callable(release):
                release()
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenizer(self, folder: Path) -> Any:
        from transformers import AutoTokenizer

        key = str(folder)
        if key not in self.tokenizers:
            self.tokenizers[key] = AutoTokenizer.from_pretrained(
                folder, trust_remote_code=self.trust_remote_code
            )
        return self.tokenizers[key]

    def materialize(self, recipe: Recipe) -> tuple[torch.nn.Module, Any]:
        plan = plan_for(recipe, self.sources)
        model = self.live_model(plan.output_config())
        merge_into_model(plan, self.tensors, model, self.chunk_bytes)
        return model, self.tokenizer(plan.sources[plan.tokenizer_source].path)

    def source_statistics(
        self, ref: str, texts: list[str], kinds: list[str], max_length: int
    ) -> bytes:
        """A source's calibration statistics measured on this worker's device (where the
        run's GPUs are), as the bytes of their safetensors file for the driver to store."""
        where = self.sources[ref].path if ref in self.sources else None
        return measure_source(
            ref,
            texts,
            self.device,
            kinds,
            max_length,
            self.trust_remote_code,
            str(where) if where is not None else None,
        )

    def run_here(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(device, *args)` on this worker's device: work that belongs where the run's GPUs
        are (training a learned merge), passed in by a layer above the workers. The live
        model's memory is the work's meanwhile (rebuilt after, so that no candidate's time
        counts it); on a CPU it runs on every core (the run's other workers wait for it)."""
        shape = self.model_config
        self.release_model()
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or threads)
        try:
            return fn(self.device, *args)
        finally:
            torch.set_num_threads(threads)
            if shape is not None:
                self.live_model(shape)

    def held_out(self) -> Callable[..., Any]:
        """The held-out fitness: the same task folder, the held-out tasks and limit."""
        if self.held_out_fitness is None:
            spec = self.fitness_spec.get("held_out")
            if not spec:
                raise EvomergeError("the fitness has no held_out tasks")
            shots = self.fitness_spec.get("num_fewshot")
            self.held_out_fitness = make_fitness(
                {
                    "kind": "lm_eval",
                    "tasks": spec["tasks"],
                    "limit": spec.get("limit"),
                    "include_path": self.fitness_spec.get("include_path"),
                    "batch_size": self.fitness_spec.get("batch_size", 8),
                    # a count for every task carries over; a per-task mapping names fitness tasks
                    "num_fewshot": shots if isinstance(shots, int) else None,
                    **{
                        key: self.fitness_spec[key]
                        for key in (
                            "apply_chat_template",
                            "system_instruction",
                            "fewshot_as_multiturn",
                            "gen_kwargs",
                        )
                        if key in self.fitness_spec
                    },
                }
            )
        return self.held_out_fitness

    def ping(self) -> str:
        return self.name

    def evaluate(
        self,
        recipe_yaml: str,
        held_out: bool = False,
        docs: Optional[dict[str, list[int]]] = None,
    ) -> Outcome:
        """Score one recipe (on `docs`, the document ids per task a racing stage adds, when
        given); any failure becomes an Outcome with its reason, never a raise."""
        start = time.perf_counter()
        try:
            recipe = Recipe.from_yaml_text(recipe_yaml)
            model, tokenizer = self.materialize(recipe)
            fitness = self.held_out() if held_out else self.fitness
            with torch.no_grad(), scoring_allocations():
                if docs is not None:
                    result = fitness(model, tokenizer, samples=docs)
                else:
                    result = fitness(model, tokenizer)
            outcome = _outcome_from(result)
        except Exception as exc:  # a candidate's failure is data, not the run's end
            outcome = Outcome(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()  # the next candidate gets the memory back
        outcome.seconds = time.perf_counter() - start
        outcome.worker = self.name
        return outcome


def _outcome_from(result: Any) -> Outcome:
    if not isinstance(result, dict):
        return Outcome(error=f"fitness returned {type(result).__name__}, expected a dict")
    per_example = result.get("per_example")
    per_document = result.get("per_document")
    metrics = {}
    for key, value in result.items():
        if key in ("per_example", "per_document"):
            continue
        try:
            metrics[key] = float(value)
        except (TypeError, ValueError):
            return Outcome(error=f"fitness metric {key!r} is not a number: {value!r}")
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        return Outcome(metrics=metrics, error=f"fitness metric {bad[0]!r} is {metrics[bad[0]]}")
    if per_example is not None:
        per_example = [float(v) for v in per_example]
    return Outcome(metrics=metrics, per_example=per_example, per_document=per_document)
