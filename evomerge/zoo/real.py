"""The real zoo: experts fine-tuned from SmolLM2-135M-Instruct on skills it lacks, and a
cross-skill target none of them is trained on.

- add:     "47+18=" -> "65"        (two-digit addition; the base is below chance on it)
- decode:  "dec rqup=" -> "4071"   (numbers written in a letter cipher, read back as digits)
- dec_add: "add ru+qi=" -> "65"    (the target: a sum of two numbers written in the cipher,
                                     i.e. skill A through skill B, like math in another script)

Both skills answer in digits: what tells them apart is the prompt's script, not the answer's.

`evomerge zoo train --real` fine-tunes low-rank adapters of the MLP on a frozen base
(deterministic, logged) and writes their factors under evomerge/zoo/experts (a few MB each);
`evomerge zoo build --real` makes the base from the pinned GGUF and folds the factors into it,
giving ordinary checkpoints, and writes the lm-eval tasks (chat-templated prompts, a fitness
and a disjoint held-out split per task, multiple choice plus generative exact match; training
examples are disjoint from both).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from evomerge.errors import EvomergeError
from evomerge.zoo import lora, tasks
from evomerge.zoo.smollm import build_smollm, sha256_of

SKILLS = ("add", "decode")
TARGET = "dec_add"
SYSTEM = "Answer with the result only."
EXPERTS = Path(__file__).resolve().parent / "experts"
PREFIX = "sm2"  # task names: sm2_<task>_<split>


@dataclass(frozen=True)
class RealZooSettings:
    steps: int = 120
    batch: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    train_examples: int = 4000
    fitness_examples: int = 48
    heldout_examples: int = 64
    seed: int = 0


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the instruct model sees it (what lm-eval's chat template gives too)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


MC_YAML = """task: {name}
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

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["<|im_end|>", "\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: false
    ignore_punctuation: false
    regexes_to_ignore: [" "]
"""


def splits(settings: RealZooSettings) -> dict[str, dict[str, list[tasks.Example]]]:
    """Disjoint fit / heldout (/ train for the skills) examples of every task."""
    out = {}
    for task in (*SKILLS, TARGET):
        sizes = {"fit": settings.fitness_examples, "heldout": settings.heldout_examples}
        if task in SKILLS:
            sizes["train"] = settings.train_examples
        out[task] = tasks.split(task, settings.seed, sizes)
    return out


def write_tasks(folder: Path, settings: RealZooSettings) -> list[str]:
    """`sm2_<task>_<fit|heldout>` (multiple choice) and `sm2_<task>_gen_<fit|heldout>`
    (generative, exact match) for the skills and the target; returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task, data in splits(settings).items():
        rng = random.Random(f"choices:{task}:{settings.seed}")
        for split in ("fit", "heldout"):
            mc, gen = f"{PREFIX}_{task}_{split}", f"{PREFIX}_{task}_gen_{split}"
            (folder / f"{mc}.yaml").write_text(MC_YAML.format(name=mc))
            (folder / f"{gen}.yaml").write_text(GEN_YAML.format(name=gen))
            with (
                open(folder / f"{mc}.jsonl", "w") as f_mc,
                open(folder / f"{gen}.jsonl", "w") as f_gen,
            ):
                for ex in data[split]:
                    choices = [ex.answer.strip(), *(d.strip() for d in ex.distractors)]
                    answer = choices[0]
                    rng.shuffle(choices)
                    doc = {"prompt": ex.prompt, "choices": choices, "answer": choices.index(answer)}
                    f_mc.write(json.dumps(doc) + "\n")
                    f_gen.write(json.dumps({"prompt": ex.prompt, "target": answer}) + "\n")
            names += [mc, gen]
    return names


def _batch(tokenizer: Any, examples: list[tasks.Example]) -> dict[str, torch.Tensor]:
    """Chat-templated prompts with their answers; the loss sees only the answer tokens."""
    contexts = [chat_text(tokenizer, e.prompt) for e in examples]
    texts = [c + e.answer.strip() + "<|im_end|>" for c, e in zip(contexts, examples)]
    encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].clone()
    for i, context in enumerate(contexts):
        labels[i, : len(tokenizer(context, add_special_tokens=False)["input_ids"])] = -100
    labels[encoded["attention_mask"] == 0] = -100
    return {**encoded, "labels": labels}


def train_expert(
    base: Path, skill: str, settings: RealZooSettings, progress: bool = True
) -> tuple[dict[str, torch.Tensor], list[tuple[int, float, float]]]:
    """LoRA on the MLP of a frozen base, AdamW at a constant rate; returns the factors and the
    loss log (step, loss, seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    offset = SKILLS.index(skill) + 1
    trainable = lora.attach(model, settings.rank, settings.alpha, settings.seed + offset)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    examples = splits(settings)[skill]["train"]
    rng = random.Random(f"batches:{skill}:{settings.seed}")
    log, start = [], time.perf_counter()
    model.train()
    for step in tqdm(range(settings.steps), desc=f"training {skill}", disable=not progress):
        batch = _batch(
            tokenizer, [examples[rng.randrange(len(examples))] for _ in range(settings.batch)]
        )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == settings.steps - 1:
            log.append(
                (step, round(float(loss.detach()), 4), round(time.perf_counter() - start, 1))
            )
    return lora.detach(model), log


def train_experts(
    base: Path,
    out: Path = EXPERTS,
    settings: RealZooSettings = RealZooSettings(),
    progress: bool = True,
    skills: tuple[str, ...] = SKILLS,
) -> dict[str, Path]:
    """Train the experts of `skills` and write `<skill>.safetensors` (fp16 factors) and their
    entries in train_log.json (other experts' entries are kept)."""
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise EvomergeError(f"--skills: no skill {unknown[0]!r}; the zoo has {', '.join(SKILLS)}")
    out.mkdir(parents=True, exist_ok=True)
    stamp = json.loads((Path(base) / "evomerge_source.json").read_text())
    log_file = out / "train_log.json"
    previous = json.loads(log_file.read_text()) if log_file.is_file() else {}
    kept = {k: v for k, v in previous.get("experts", {}).items() if k in SKILLS}
    report: dict[str, Any] = {"settings": asdict(settings), "base": stamp, "experts": kept}
    paths = {}
    for skill in skills:
        factors, log = train_expert(Path(base), skill, settings, progress)
        path = out / f"{skill}.safetensors"
        meta = {
            "skill": skill,
            "base_gguf_sha256": stamp["gguf_sha256"],
            "settings": json.dumps(asdict(settings)),
        }
        lora.save_factors(factors, path, meta)
        report["experts"][skill] = {"file": path.name, "sha256": sha256_of(path), "loss": log}
        paths[skill] = path
    log_file.write_text(json.dumps(report, indent=1) + "\n")
    return paths


def build_real_zoo(
    out: Path,
    fitness: Path,
    experts: Path = EXPERTS,
    settings: RealZooSettings = RealZooSettings(),
    base: Optional[Path] = None,
) -> dict[str, Path]:
    """results/zoo/smollm2/{base, <skill>...} and the tasks; kept when already built from the
    same factors. `base`: an already built SmolLM2 folder to use instead of out/base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tasks(Path(fitness), settings)
    out = Path(out)
    base = Path(base) if base is not None else build_smollm(out / "base")
    paths = {"base": base}
    for skill in SKILLS:
        factors = experts / f"{skill}.safetensors"
        if not factors.is_file():
            raise EvomergeError(
                f"{factors}: no factors for expert {skill!r}; run `evomerge zoo train --real`"
            )
        digest = sha256_of(factors)
        target = out / skill
        stamp = target / "evomerge_source.json"
        paths[skill] = target
        if stamp.is_file() and json.loads(stamp.read_text()).get("factors_sha256") == digest:
            continue
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        lora.apply_factors(model, factors)
        staging = out / f".{skill}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            model.save_pretrained(staging, safe_serialization=True)
            AutoTokenizer.from_pretrained(base).save_pretrained(staging)
            key = hashlib.sha256(digest.encode()).hexdigest()[:16]
            (staging / stamp.name).write_text(
                json.dumps(
                    {
                        "base": str(base),
                        "factors": factors.name,
                        "factors_sha256": digest,
                        "key": key,
                    }
                )
                + "\n"
            )
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return paths
