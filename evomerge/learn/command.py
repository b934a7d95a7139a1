"""`evomerge learn`: train a learned merge on a run config's models and data, and write it as an
ordinary Hugging Face folder whose `evomerge_recipe.yaml` re-materializes it from the coefficient
file beside it. A run's `dam` / `adamerging` baselines and the hybrid search use the same
`learn_coefficients` to learn once into the run folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.data import source_texts, task_inputs
from evomerge.learn.train import (
    FrozenSources,
    Learned,
    TrainSettings,
    linear_weights,
    train_adamerging,
    train_dam,
)
from evomerge.merge.engine import merge_to_disk, pick_device
from evomerge.merge.io import ModelSource
from evomerge.merge.learned import LEARNED, LOG, write_coefficients
from evomerge.recipe import Recipe


def experts(config: RunConfig) -> list[str]:
    """The run's models a learned merge combines: every one but the base."""
    names = [name for name in config.models if name != config.base_model]
    if not names:
        raise EvomergeError("field 'models': a learned merge needs models besides base_model")
    return names


def check_method(config: RunConfig, method: str) -> None:
    if method not in LEARNED:
        raise EvomergeError(f"--method {method!r}: choose one of {', '.join(LEARNED)}")
    if method == "adamerging" and config.base_model is None:
        raise EvomergeError(
            "field 'base_model': AdaMerging adds weighted task vectors to a base model; set "
            "base_model (or use --method dam)"
        )


def learned_recipe(config: RunConfig, method: str, coefficients: Path, seed: int = 0) -> Recipe:
    """The recipe of the learned merge: the experts at scale 1, the coefficient file named."""
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": config.models[name]} for name in experts(config)],
        "coefficients": str(coefficients),
        "seed": seed,
    }
    if config.base_model is not None:
        data["base_model"] = config.models[config.base_model]
    return Recipe.from_dict(data, source=f"learned {method} merge")


def load_tokenizer(config: RunConfig, first: str) -> Any:
    from transformers import AutoTokenizer

    name = config.base_model or first
    path = ModelSource(config.models[name]).path
    return AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)


def check_linear_layers(config: RunConfig, name: str) -> None:
    """DAM scales the columns of linear layers: refuse a model with none from its config and
    tensor names alone, before any weight is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = ModelSource(config.models[name])
    remote = config.trust_remote_code
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(source.path, trust_remote_code=remote),
            trust_remote_code=remote,
        )
    linear_weights(skeleton, list(source.index))


def _load(config: RunConfig, names: list[str], device: torch.device) -> tuple[FrozenSources, Any]:
    """The skeleton (the first model, fp32, on `device`) and every named source's tensors there;
    the skeleton's own parameters serve as its source's tensors."""
    from transformers import AutoModelForCausalLM

    sources = {name: ModelSource(config.models[name]) for name in names}
    first = names[0]
    skeleton = AutoModelForCausalLM.from_pretrained(
        sources[first].path,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=config.trust_remote_code,
    ).to(device)
    tensors = {first: dict(skeleton.named_parameters())}
    for name in names[1:]:
        source = sources[name]
        tensors[name] = {
            key: source.get(key).to(device, torch.float32)
            for key in tensors[first]
            if key in source.index
        }
        source.close()
    return FrozenSources(skeleton, tensors), load_tokenizer(config, first)


@dataclass
class LearningData:
    """What a learned merge trains on, read and checked where the run config is: each source's
    own texts (DAM) or the fitness tasks' prompts (AdaMerging)."""

    method: str
    names: list[str]
    texts: dict[str, list[str]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    templated: bool = False


def learning_data(
    config: RunConfig, method: str, settings: TrainSettings, names: Optional[list[str]] = None
) -> LearningData:
    """Check the input and read the data; bad input fails here, before any model is loaded."""
    check_method(config, method)
    names = names or experts(config)
    if config.calibration is not None and settings.max_length == TrainSettings.max_length:
        settings.max_length = config.calibration.max_length
    if method == "dam":
        texts = source_texts(config, names)
        check_linear_layers(config, loading(config, names)[0])  # the model whose skeleton trains
        return LearningData(method, names, texts=texts)
    prompts = task_inputs(config, load_tokenizer(config, names[0]))
    templated = bool(getattr(config.fitness, "apply_chat_template", False))
    return LearningData(method, names, prompts=prompts, templated=templated)


def loading(config: RunConfig, names: list[str]) -> list[str]:
    """The models training loads, the skeleton's first: the base (where there is one), then
    the sources."""
    return [*([config.base_model] if config.base_model else []), *names]


def train_on(
    device: torch.device, config: RunConfig, data: LearningData, settings: TrainSettings
) -> Learned:
    """Train on `device` (a worker's, in a run: where the GPUs are); the coefficients come
    back on the CPU, to travel and be stored."""
    sources, tokenizer = _load(config, loading(config, data.names), device)
    if data.method == "dam":
        learned = train_dam(sources, tokenizer, data.names, data.texts, config.base_model, settings)
    else:
        learned = train_adamerging(
            sources, tokenizer, config.base_model, data.names, data.prompts, settings,
            data.templated,
        )  # fmt: skip
    learned.coefficients = {k: [c.cpu() for c in cs] for k, cs in learned.coefficients.items()}
    learned.summary["device"] = str(device)
    return learned


def learn(
    config: RunConfig, method: str, settings: TrainSettings, names: Optional[list[str]] = None
) -> Learned:
    """Train `method`'s coefficients for the models `names` (default: every one but the base,
    in the config's order) here, on the config's device: DAM on each one's own text,
    AdaMerging on the fitness tasks' inputs; bad input fails before any model is loaded."""
    data = learning_data(config, method, settings, names)
    return train_on(pick_device(config.device), config, data, settings)


def learn_coefficients(
    config: RunConfig,
    method: str,
    path: Path,
    settings: TrainSettings,
    names: Optional[list[str]] = None,
) -> tuple[Path, Learned]:
    """Train and store the coefficient file at `path`, its training log beside it."""
    names = names or experts(config)
    learned = learn(config, method, settings, names)
    return store_coefficients(config, method, path, names, learned), learned


def store_coefficients(
    config: RunConfig, method: str, path: Path, names: list[str], learned: Learned
) -> Path:
    """The coefficient file at `path` (and its training log beside it), for the models `names`."""
    refs = [config.models[name] for name in names]
    base = config.models[config.base_model] if config.base_model else None
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_name(LOG)  # first: a file under the coefficients' name is a finished one
    log.write_text("".join(json.dumps(row) + "\n" for row in learned.log))
    write_coefficients(path, method, refs, base, learned.coefficients, learned.summary)
    return path


def learn_folder(
    config: RunConfig,
    method: str,
    out: Path,
    settings: TrainSettings,
    force: bool = False,
    seed: int = 0,
) -> tuple[Path, Learned]:
    """Train, then write `out` (weights, config, tokenizer, recipe, coefficients, training
    log); nothing lands at `out` unless every step succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise EvomergeError(f"output folder {out} exists; choose another or pass --force")
    learned = learn(config, method, settings)  # bad input ends here, before a byte is written
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.learning-", dir=out.parent))
    try:
        path = store_coefficients(
            config, method, work / "coefficients.safetensors", experts(config), learned
        )
        recipe = learned_recipe(config, method, path, seed)
        merge_to_disk(recipe, out, device=config.device, force=force, progress=settings.progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, learned


def summary_line(learned: Learned, out: Optional[Path] = None) -> str:
    s = learned.summary
    where = f" -> {out}" if out is not None else ""
    return (
        f"{s['method']}: {s['steps']} steps in {s['seconds']:.1f} s, loss {s['loss_first']:.4f} "
        f"-> {s['loss_last']:.4f}, {s['coefficients']:,} coefficients, "
        f"{s['tokens_forward']:,} forward / {s['tokens_backward']:,} backward tokens{where}"
    )
