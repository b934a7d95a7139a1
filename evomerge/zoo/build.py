"""`evomerge zoo build`: the zoo's tasks (into fitness/zoo) and models (into results/zoo),
deterministic and cached: a second build with the same settings reuses what is there."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.zoo import tasks
from evomerge.zoo.models import byte_tokenizer, save_model, tiny_config
from evomerge.zoo.train import train

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@dataclass(frozen=True)
class ZooSettings:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    pretrain_steps: int = 300
    finetune_steps: int = 1000
    train_examples: int = 5000
    fitness_examples: int = 100
    heldout_examples: int = 200
    seed: int = 0
    tokenizer: int = 2  # token id == byte value (what the training loop feeds)

    def key(self) -> str:
        return hashlib.blake2b(
            json.dumps(asdict(self), sort_keys=True).encode(), digest_size=8
        ).hexdigest()


SMALL = ZooSettings(
    hidden=32,
    layers=2,
    heads=2,
    kv_heads=1,
    intermediate=64,
    pretrain_steps=20,
    finetune_steps=20,
    train_examples=200,
    fitness_examples=16,
    heldout_examples=16,
)


def write_tasks(folder: Path, settings: ZooSettings) -> dict[str, dict[str, list]]:
    """fitness/zoo: `<task>_fit` (the search sees it) and `<task>_heldout` (reports quote it)
    for every skill and the cross-skill target; training examples are disjoint from both."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for task in (*tasks.SKILLS, tasks.TARGET):
        sizes = {"fit": settings.fitness_examples, "heldout": settings.heldout_examples}
        if task in tasks.SKILLS:
            sizes["train"] = settings.train_examples
        data[task] = tasks.split(task, settings.seed, sizes)
        rng = random.Random(f"choices:{task}:{settings.seed}")
        for split in ("fit", "heldout"):
            name = f"zoo_{task}_{split}"
            (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name))
            with open(folder / f"{name}.jsonl", "w") as f:
                for ex in data[task][split]:
                    choices = [ex.answer, *ex.distractors]
                    rng.shuffle(choices)
                    doc = {
                        "prompt": ex.prompt,
                        "choices": choices,
                        "answer": choices.index(ex.answer),
                    }
                    f.write(json.dumps(doc) + "\n")
    return data


def build(
    out: Path, fitness: Path, settings: ZooSettings = ZooSettings(), progress: bool = True
) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    out, fitness = Path(out), Path(fitness)
    data = write_tasks(fitness, settings)
    names = ["base", *tasks.SKILLS]
    paths = {name: out / name for name in names}
    stamp = out / "zoo.json"
    if (
        stamp.exists()
        and json.loads(stamp.read_text()).get("key") == settings.key()
        and all((p / "config.json").exists() for p in paths.values())
    ):
        return paths
    torch.manual_seed(settings.seed)
    config = tiny_config(
        "llama",
        hidden=settings.hidden,
        layers=settings.layers,
        heads=settings.heads,
        kv_heads=settings.kv_heads,
        intermediate=settings.intermediate,
        vocab=272,
    )
    tokenizer = byte_tokenizer()
    base = AutoModelForCausalLM.from_config(config)
    rng = random.Random(settings.seed)
    noise = [tasks.noise_line(rng) for _ in range(20000)]
    train(
        base,
        noise,
        settings.pretrain_steps,
        seed=settings.seed,
        desc="pre-training base",
        progress=progress,
    )
    save_model(base, paths["base"], tokenizer)
    for k, skill in enumerate(tasks.SKILLS):
        expert = copy.deepcopy(base)
        lines = [e.prompt + e.answer for e in data[skill]["train"]]
        train(
            expert,
            lines,
            settings.finetune_steps,
            seed=settings.seed + 1 + k,
            desc=f"fine-tuning {skill}",
            answer_weight=4.0,
            progress=progress,
        )
        save_model(expert, paths[skill], tokenizer)
    stamp.write_text(json.dumps({"key": settings.key(), "settings": asdict(settings)}) + "\n")
    return paths
