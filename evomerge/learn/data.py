"""What the learned merges train on, taken from the run config: DAM each source's own text
(`calibration.files`, or the shared `calibration.file`), AdaMerging the inputs of the fitness
tasks (prompts as the model sees them, never their targets). Both are refused when they hold a
held-out document, as the data-aware methods' calibration text is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.config import LmEvalFitnessSpec, RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.calibration import check_no_held_out, held_out_of
from evomerge.merge.statistics import read_calibration
from evomerge.workers.scoring import task_manager, working_dir


def source_texts(config: RunConfig, sources: list[str]) -> dict[str, list[str]]:
    """Per source name, its own texts (DAM distils the merge from each source on them)."""
    calibration = config.calibration
    if calibration is None:
        raise EvomergeError(
            "field 'calibration': DAM distils each source on its own text; add calibration: "
            "{files: {NAME: PATH, ...}} (or one shared calibration.file)"
        )
    held_out = held_out_of(config)
    texts = {}
    for name in sources:
        path = calibration.file_for(name)
        if path is None:
            raise EvomergeError(
                f"field 'calibration.files': no text for source {name!r}; add "
                f"calibration.files.{name}: PATH"
            )
        field = f"calibration.files.{name}" if name in calibration.files else "calibration.file"
        found = read_calibration(Path(path), calibration.limit)
        check_no_held_out(found, held_out, field, what="learn")
        texts[name] = found
    return texts


def task_inputs(config: RunConfig, tokenizer: Any) -> list[str]:
    """The fitness tasks' prompts, chat-templated when the fitness is (AdaMerging minimises the
    merged model's uncertainty where it answers them); no target is ever read."""
    fitness = config.fitness
    if not isinstance(fitness, LmEvalFitnessSpec):
        raise EvomergeError(
            "field 'fitness': AdaMerging trains on the inputs of lm-eval fitness tasks; a "
            "Python fitness has none to read (use --method dam)"
        )
    folder = Path(fitness.include_path) if fitness.include_path else None
    manager = task_manager(fitness.include_path, fitness.tasks)
    with working_dir(folder):
        loaded = manager.load(list(fitness.tasks))["tasks"]
    prompts: dict[str, None] = {}  # a prompt shared by an MC and a generative task counts once
    for task in loaded.values():
        docs = list(task.eval_docs)[: fitness.limit] if fitness.limit else task.eval_docs
        for doc in docs:
            prompt = task.doc_to_text(doc)
            if isinstance(prompt, str) and prompt.strip():
                prompts[prompt] = None
    if not prompts:
        raise EvomergeError("field 'fitness.tasks': the fitness tasks hold no text prompts")
    found = list(prompts)
    held_out = held_out_of(config)
    check_no_held_out(found, held_out, "fitness.tasks", what="learn")
    if not fitness.apply_chat_template:
        return found
    system = fitness.system_instruction
    return [
        tokenizer.apply_chat_template(
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for prompt in found
    ]
