"""A run's learned merges: the `dam` / `adamerging` baselines and the merge a search over a
learned method tunes are learned once, before the first candidate, into the run folder
(`learned/<method>/`), where a resume and an export find them again; a `references_from` run
that learned the same merge on the same data lends its file instead."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from evomerge.baselines import LEARNED, learned_file
from evomerge.config import LearningSpec, LmEvalFitnessSpec, RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.calibration import parameter_part
from evomerge.learn.command import (
    check_method,
    experts,
    learn_coefficients,
    learning_data,
    load_tokenizer,
    loading,
    store_coefficients,
    summary_line,
    train_on,
)
from evomerge.learn.data import source_texts, task_inputs
from evomerge.learn.train import TrainSettings, training_bytes
from evomerge.merge.io import ModelSource
from evomerge.merge.learned import LOG, Coefficients, learned_method
from evomerge.spaces.base import SearchSpace

if TYPE_CHECKING:
    from evomerge.workers.pool import Pool

log = logging.getLogger("evomerge")


def space_file(folder: Path, config: RunConfig, space: SearchSpace) -> Optional[Path]:
    """The run's coefficient file a search over a learned method tunes (None: the space is not
    over one, or names its own file)."""
    part = parameter_part(space)
    method = getattr(part, "method", None)
    if method is None or not method.learned or part.spec.coefficients is not None:
        return None
    name = (
        method.name if part.models == experts(config) else f"{method.name}-{'-'.join(part.models)}"
    )
    return learned_file(Path(folder).resolve() / LEARNED, name)  # workers may run elsewhere


def name_learned(space: SearchSpace, folder: Path, config: RunConfig) -> None:
    """Make every recipe a search over a learned method decodes name the run's file."""
    path = space_file(folder, config, space)
    if path is not None:
        parameter_part(space).coefficients = str(path)


def needed(
    config: RunConfig, baselines: dict[str, str], space: SearchSpace, folder: Path
) -> dict[Path, tuple[str, list[str]]]:
    """Coefficient file -> (method, model names) for each learned merge the run reads from its
    own folder."""
    out: dict[Path, tuple[str, list[str]]] = {}
    learned_dir = (Path(folder) / LEARNED).resolve()
    for recipe in baselines.values():
        method = learned_method(recipe)
        path = Path(yaml.safe_load(recipe).get("coefficients") or "")
        if method is not None and learned_dir in path.parents:
            out[path] = (method, experts(config))
    path = space_file(folder, config, space)
    if path is not None:
        part = parameter_part(space)
        out[path.resolve()] = (part.method.name, list(part.models))
    return out


def check_learning(config: RunConfig, wanted: dict[Path, tuple[str, list[str]]]) -> None:
    """Fail before the run is created when a learned merge cannot be trained: no text for a
    source, text or a fitness prompt that holds a held-out document, no base, no prompts."""
    for method, names in wanted.values():
        check_method(config, method)
        if method == "dam":
            source_texts(config, names)
        elif not isinstance(config.fitness, LmEvalFitnessSpec):
            raise EvomergeError(
                "field 'fitness': adamerging trains on the inputs of lm-eval fitness tasks; "
                "a Python fitness has none (use dam)"
            )
        else:
            task_inputs(config, load_tokenizer(config, names[0]))


def settings_of(config: RunConfig, progress: bool) -> TrainSettings:
    spec = config.learning
    if spec is None:
        return TrainSettings(progress=progress)
    return TrainSettings(
        steps=spec.steps,
        lr=spec.lr,
        batch_size=spec.batch_size,
        seed=spec.seed,
        granularity=spec.granularity,
        embeddings_and_norms=spec.embeddings_and_norms,
        progress=progress,
    )


def borrowed(config: RunConfig, folder: Path, path: Path) -> Optional[Path]:
    """The same learned file in the `references_from` run (same place in its folder, same
    models), when that run learned on the same data with the same settings."""
    if not config.references_from:
        return None
    other = Path(config.references_from) / "run.yaml"
    if not other.is_file() or not learns_alike(config, RunConfig.load(other)):
        return None
    theirs = Path(config.references_from) / path.relative_to(Path(folder).resolve())
    if not theirs.is_file():
        return None
    mine = Coefficients(theirs)
    return theirs if mine.models == [config.models[n] for n in experts(config)] else None


def ensure_learned(
    folder: Path,
    config: RunConfig,
    baselines: dict[str, str],
    space: SearchSpace,
    progress: bool = True,
    pool: Optional[Pool] = None,
) -> None:
    """Learn (or borrow) every learned merge the run reads and has not stored yet, on one of
    `pool`'s workers (here without one); a kill mid-way leaves no half file, and the next
    resume learns it again."""
    for path, (method, names) in needed(config, baselines, space, folder).items():
        if path.is_file():
            continue
        source = borrowed(config, folder, path)
        if source is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            trail = source.with_name(LOG)
            if trail.is_file():
                shutil.copy2(trail, path.with_name(LOG))
            partial = path.with_name(path.name + ".partial")
            shutil.copy2(source, partial)  # a kill mid-copy leaves no file under the name
            os.replace(partial, path)
            log.info("learned %s: borrowed from %s", method, source)
            continue
        settings = settings_of(config, progress)
        if pool is None:
            _, learned = learn_coefficients(config, method, path, settings, names)
        else:  # read and checked here, trained on a worker's device
            data = learning_data(config, method, settings, names)
            log.info("learning %s on a worker (%s steps)", method, settings.steps or "one pass")
            learned = pool.run_on_worker(f"learning {method}", train_on, config, data, settings)
            store_coefficients(config, method, path, data.names, learned)
        log.info("learned %s", summary_line(learned, path))


def learning_bytes(
    folder: Path, config: RunConfig, baselines: dict[str, str], space: SearchSpace
) -> int:
    """What training the run's not yet stored learned merges adds on the worker that trains
    them (the largest of them; 0 when there is none to learn), from the checkpoints' headers
    and the data: the training formula at the configured batch, every text as long as the
    longest one training keeps (a batch pads to its longest)."""
    settings = settings_of(config, progress=False)  # learning_data sets its max_length
    most = 0
    for path, (method, names) in needed(config, baselines, space, folder).items():
        if path.is_file():
            continue
        held = [config.models[n] for n in loading(config, names)]
        source = ModelSource(held[0], allow_pickle=config.allow_pickle)
        try:
            shapes = {name: info.shape for name, info in source.index.items()}
            model = dict(source.config)
        finally:
            source.close()
        parameters = sum(
            math.prod(shape) for name, shape in shapes.items() if "lm_head" not in name
        )
        linear_inputs = sum(shape[-1] for name, shape in shapes.items() if len(shape) == 2
                            and ".layers." in name)  # fmt: skip
        coefficients = len(names) * (linear_inputs if method == "dam" else 1)
        data = learning_data(config, method, settings, names)
        texts = [t for kept in data.texts.values() for t in kept] or data.prompts
        tokenizer = load_tokenizer(config, names[0])
        longest = max(len(tokenizer(text).input_ids) for text in texts)
        terms = training_bytes(method, parameters, len(held), coefficients, model,
                               settings.batch_size, min(longest, settings.max_length))  # fmt: skip
        most = max(most, terms["total"])
    return most


def learns_alike(mine: RunConfig, theirs: RunConfig) -> bool:
    """Whether two runs learn the same merges: the same data and the same training settings.
    AdaMerging's data, the fitness prompts, is the same in any run `references_from` accepts:
    it refuses a run that scores with another fitness (`references_config`)."""

    def learning(c: RunConfig) -> dict:
        data = c.model_dump(include={"calibration", "learning"})
        data["learning"] = data.get("learning") or LearningSpec().model_dump()
        calibration = data.get("calibration") or {}
        for key, path in [("file", calibration.get("file")), *calibration.get("files", {}).items()]:
            if path is not None:  # the text itself, wherever its file lives
                text = Path(path).read_bytes() if Path(path).is_file() else path.encode()
                calibration.setdefault("texts", {})[key] = hashlib.sha256(text).hexdigest()
        calibration.pop("file", None)
        calibration.pop("files", None)
        return data

    return learning(mine) == learning(theirs)


def is_learned(recipe: str) -> bool:
    return learned_method(recipe) is not None


def same_merge(theirs: Optional[str], mine: str, their_folder: Path, my_folder: Path) -> bool:
    """The same recipe, a learned one naming each run's own coefficient file."""
    if theirs is None:
        return False
    if theirs == mine:
        return True
    if not is_learned(mine):
        return False
    here, there = str(Path(my_folder).resolve() / LEARNED), str(Path(their_folder) / LEARNED)
    return theirs.replace(there, here) == mine
