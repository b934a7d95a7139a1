"""lm-eval fitness on the live, in-memory model.

Tasks are built once per worker and reused for every candidate through
`lm_eval.evaluator.evaluate` (no per-call environment probing, bootstrap off). lm-eval's HFLM
wraps the live model, with shared contexts run once (a multiple-choice document's for all its
choices, a chat template's prefix once per call: shared_context.py); it is re-wrapped only when
the worker rebuilds the model (a DFS depth change).
Results are flattened to "task: metric,filter" keys (e.g. "arith: acc,none"); the per-document
values of each task's first metric, in document order, are the per-example scores M2N2 uses,
and every per-document value comes back too (`per_document`: task -> document id -> metric),
which racing aggregates over growing document subsets (a call may name the documents).
Relative `data_files` in a task folder's YAML resolve against that folder. Whether tasks may be
downloaded from the hub is the user's choice (the run config's `offline`, or the environment).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

from evomerge.errors import EvomergeError

SKIP_KEYS = {"alias", "name", "sample_len", "samples"}


def task_manager(include_path: Optional[str], tasks: Iterable[str] = ()) -> Any:
    """lm-eval's task index for `tasks`: the task folder's own when every one of them is a
    plain task of that folder (lm-eval's built-in index of ~15,000 tasks takes 9 s to build
    here, in the driver and in every worker), else lm-eval's whole index with the folder
    (a group or tag may name built-in tasks). Built once per process and folder."""
    tasks = list(tasks)
    if include_path and tasks:
        local = _task_index(include_path, False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    return _task_index(include_path, True)


@functools.lru_cache(maxsize=16)
def _task_index(include_path: Optional[str], with_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager  # lm-eval is heavy: imported when tasks are used

    return TaskManager(include_path=include_path, include_defaults=with_defaults)


@contextlib.contextmanager
def working_dir(folder: Optional[Path]):
    if folder is None:
        yield
        return
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def load_tasks(
    tasks: list[str],
    include_path: Optional[str] = None,
    num_fewshot: Union[int, dict[str, int], None] = None,
    gen_kwargs: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """lm-eval's task dict for `tasks`, set up as the fitness scores them: the few-shot count
    (one for every task, or {task: count}) and the generation settings applied."""
    folder = Path(include_path).resolve() if include_path else None
    if folder is not None and not folder.is_dir():
        raise EvomergeError(f"field 'fitness.include_path': {include_path} is not a folder")
    manager = task_manager(str(folder) if folder else None, tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvomergeError(
            f"field 'fitness.tasks': lm-eval knows no task {unknown[0]!r}"
            + (f" (looked in {folder} too)" if folder else "; set fitness.include_path")
        )
    with working_dir(folder):
        task_dict = manager.load(list(tasks))
    shots = num_fewshot if isinstance(num_fewshot, dict) else {}
    stray = [name for name in shots if name not in tasks]
    if stray:
        raise EvomergeError(
            f"field 'fitness.num_fewshot': {stray[0]!r} is not one of the fitness tasks"
        )
    for name, task in task_dict["tasks"].items():
        if not hasattr(task, "set_config"):
            continue
        shot = shots.get(name) if isinstance(num_fewshot, dict) else num_fewshot
        if shot is not None:
            task.set_config(key="num_fewshot", value=shot)
        if gen_kwargs and task.config.output_type == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
    return task_dict


class LmEvalFitness:
    """`fitness(model, tokenizer) -> {"task: metric": value, ..., "per_example": [...]}`."""

    def __init__(
        self,
        tasks: list[str],
        include_path: Optional[str] = None,
        limit: Optional[int] = None,
        samples: Optional[dict[str, list[int]]] = None,
        batch_size: Union[int, str] = 8,
        num_fewshot: Union[int, dict[str, int], None] = None,
        apply_chat_template: bool = False,
        system_instruction: Optional[str] = None,
        fewshot_as_multiturn: bool = False,
        gen_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        self.task_dict = load_tasks(tasks, include_path, num_fewshot, gen_kwargs)
        self.tasks = list(tasks)
        self.limit = limit
        self.samples = samples
        self.batch_size = batch_size
        self.apply_chat_template = apply_chat_template
        self.system_instruction = system_instruction
        self.fewshot_as_multiturn = fewshot_as_multiturn
        self._lm: Any = None
        self._wrapped: Any = None

    def release(self) -> None:
        """Let go of the wrapped model (the evaluator is replacing it): one live model at a time."""
        self._lm = self._wrapped = None

    def _harness(self, model: Any, tokenizer: Any) -> Any:
        from evomerge.workers.shared_context import SharedContextHFLM

        if self._wrapped is not model:
            device = str(next(model.parameters()).device)
            self._lm = SharedContextHFLM(
                pretrained=model, tokenizer=tokenizer, device=device, batch_size=self.batch_size
            )
            self._wrapped = model
        return self._lm

    def __call__(
        self, model: Any, tokenizer: Any, samples: Optional[dict[str, list[int]]] = None
    ) -> dict[str, Any]:
        """Score the model on every task (its `limit` or `samples`), or on `samples`: the
        document ids of each task to score now."""
        from lm_eval.evaluator import evaluate

        samples = samples if samples is not None else self.samples
        results = evaluate(
            lm=self._harness(model, tokenizer),
            task_dict=self.task_dict,
            limit=None if samples else self.limit,
            samples=samples,
            bootstrap_iters=0,
            apply_chat_template=self.apply_chat_template,
            system_instruction=self.system_instruction,
            fewshot_as_multiturn=self.fewshot_as_multiturn,
            log_samples=True,
            verbosity="ERROR",
        )
        out: dict[str, Any] = {}
        per_example: list[float] = []
        per_document: dict[str, dict[str, dict[str, float]]] = {}
        for task, logged in results.get("samples", {}).items():
            docs = per_document.setdefault(task, {})
            for sample in logged:
                row = docs.setdefault(str(sample["doc_id"]), {})
                for metric in sample.get("metrics", []):
                    value = sample.get(metric)
                    if isinstance(value, (int, float)):
                        row[f"{metric},{sample['filter']}"] = float(value)
        for task, values in results["results"].items():
            first_metric = None
            for key, value in values.items():
                if key in SKIP_KEYS or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                out[f"{task}: {key}"] = float(value)
                first_metric = first_metric or key.split(",")[0]
            docs = sorted(results.get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
            if first_metric is not None:
                per_example += [float(d[first_metric]) for d in docs if first_metric in d]
        if per_example:
            out["per_example"] = per_example
        if per_document:
            out["per_document"] = per_document
        return out
