"""The real zoo: experts fine-tuned from SmolLM2-135M-Instruct on skills it lacks, and
cross-skill targets none of them is trained on.

- add:     "47+18=" -> "65"        (two-digit addition, the math expert; the base cannot add)
- read:    "rev мбд=" -> "207"     (the language expert: numbers written in Cyrillic letters,
                                     one letter a digit, read by five tasks, none of them a sum)
- cy_add:  "кд+мб=" -> "122"       (the composition target: math posed in read's language)
- decode:  "dec rqup=" -> "4071"   (the first cipher expert: Latin letters read back as digits)
- dec_add: "add ru+qi=" -> "65"    (its target; no merge of add and decode reaches it: decode
                                     learned to write digits, not to read the cipher as input)

Every skill answers in digits: what tells them apart is the prompt's script, not the answer's.

`evomerge zoo train --real` fine-tunes low-rank adapters of the MLP on a frozen base
(deterministic, logged; read learns its tasks in digits, then its letters as new words: their
embedding rows alone, trained so the frozen base reads them as it reads digits) and writes
their factors under evomerge/zoo/experts (a few MB each);
`evomerge zoo build --real` makes the base from the pinned GGUF and folds the factors into it,
giving ordinary checkpoints, and writes the lm-eval tasks (chat-templated prompts, a fitness
a disjoint held-out split and a larger test split per task, multiple choice plus generative
exact match; training examples are disjoint from all three).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from evomerge.errors import EvomergeError
from evomerge.zoo import letters, lora, tasks
from evomerge.zoo.smollm import build_smollm, sha256_of

SKILLS = ("add", "decode", "read")
TARGETS = ("dec_add", "cy_add")
TARGET = "cy_add"  # the composition the demo is about
# a skill whose training examples come from other generators: split name -> generator
TRAINED_ON = {"read": {"train": "read_digits", "train_letters": "read"}}
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
    # generated after the others, so adding it changed no earlier split; one standard error of
    # a task's score is at most 0.5 / sqrt(288) = 0.029
    test_examples: int = 288
    seed: int = 0
    modules: str = "mlp"  # mlp, or mlp+attention
    letter_steps: int = 0  # then train the letters' embedding rows alone for this many steps
    letter_lr: float = 1e-2  # rows move far from where they start: ten times the adapters' rate


# what an expert needs to be strong at its own skill, where the defaults do not do
EXPERT_SETTINGS: dict[str, dict[str, Any]] = {
    "read": {"steps": 150, "letter_steps": 150},
}


def expert_settings(skill: str, settings: RealZooSettings) -> RealZooSettings:
    return replace(settings, **EXPERT_SETTINGS.get(skill, {}))


def adapter_targets(modules: str) -> tuple[str, ...]:
    parts = {"mlp": lora.MLP, "attention": lora.ATTENTION}
    unknown = [p for p in modules.split("+") if p not in parts]
    if unknown:
        raise EvomergeError(f"modules: unknown part {unknown[0]!r}; use mlp, attention or both")
    return tuple(t for p in modules.split("+") for t in parts[p])


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
    """Disjoint fit / heldout / test (/ train for the skills) examples of every task."""
    out = {}
    for task in (*SKILLS, *TARGETS):
        sizes = {"fit": settings.fitness_examples, "heldout": settings.heldout_examples}
        if task in SKILLS and task not in TRAINED_ON:
            sizes["train"] = settings.train_examples
        sizes["test"] = settings.test_examples
        out[task] = tasks.split(task, settings.seed, sizes)
        for split, generator in TRAINED_ON.get(task, {}).items():
            scored = {e.key for part in out[task].values() for e in part}
            sizes = {split: settings.train_examples}
            out[task][split] = tasks.split(generator, settings.seed, sizes, scored)[split]
    return out


def write_tasks(folder: Path, settings: RealZooSettings) -> list[str]:
    """`sm2_<task>_<fit|heldout|test>` (multiple choice) and
    `sm2_<task>_gen_<fit|heldout|test>` (generative, exact match) for the skills and the
    targets; returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task, data in splits(settings).items():
        rng = random.Random(f"choices:{task}:{settings.seed}")
        for split in ("fit", "heldout", "test"):
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
    """LoRA on the expert's modules of a frozen base, AdamW at a constant rate; then, for an
    expert with `letter_steps`, the embedding rows of the letters' tokens alone, aligned to
    the base's reading of digits on the same tasks written in letters (evomerge.zoo.letters).
    Returns the factors (and the rows' deltas) and the loss log (step, loss, seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    offset = SKILLS.index(skill) + 1
    trainable = lora.attach(
        model,
        settings.rank,
        settings.alpha,
        settings.seed + offset,
        targets=adapter_targets(settings.modules),
    )
    data = splits(settings)[skill]
    letter_ids = letter_token_ids(tokenizer) if settings.letter_steps else []
    rng = random.Random(f"batches:{skill}:{settings.seed}")
    log: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    model.train()

    def record(step: int, loss: float) -> None:
        log.append((step, round(loss, 4), round(time.perf_counter() - start, 1)))

    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    examples = data["train"]
    for step in tqdm(range(settings.steps), desc=f"training {skill}", disable=not progress):
        batch = _batch(
            tokenizer, [examples[rng.randrange(len(examples))] for _ in range(settings.batch)]
        )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == settings.steps - 1:
            record(step, float(loss.detach()))
    rows: dict[str, torch.Tensor] = {}
    if settings.letter_steps:
        for p in trainable:
            p.requires_grad_(False)
        delta = letters.train_rows(
            model,
            tokenizer,
            data["train_letters"],
            letter_ids,
            settings.letter_steps,
            settings.batch,
            settings.letter_lr,
            rng,
            chat_text,
            lambda step, loss: record(settings.steps + step, loss),
            progress,
        )
        rows = lora.row_delta("model.embed_tokens.weight", letter_ids, delta)
    return {**lora.detach(model), **rows}, log


def letter_token_ids(tokenizer: Any) -> list[int]:
    """The tokens a number in letters is made of: each letter alone and, where the tokenizer
    merges them, a space and the letter."""
    ids = set()
    for letter in tasks.LETTERS:
        alone = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(alone) != 1:
            raise EvomergeError(f"letter {letter!r} is {len(alone)} tokens, not one")
        ids.add(alone[0])
        spaced = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(spaced) == 1:
            ids.add(spaced[0])
    return sorted(ids)


def train_experts(
    base: Path,
    out: Path = EXPERTS,
    settings: RealZooSettings = RealZooSettings(),
    progress: bool = True,
    skills: tuple[str, ...] = SKILLS,
    steps: Optional[int] = None,
) -> dict[str, Path]:
    """Train the experts of `skills` and write `<skill>.safetensors` (fp16 factors) and their
    entries in train_log.json (other experts' entries are kept). `steps` replaces every
    expert's own number of steps."""
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
        own = expert_settings(skill, settings)
        own = own if steps is None else replace(own, steps=steps)
        factors, log = train_expert(Path(base), skill, own, progress)
        path = out / f"{skill}.safetensors"
        meta = {
            "skill": skill,
            "base_gguf_sha256": stamp["gguf_sha256"],
            "settings": json.dumps(_recorded(own)),
        }
        lora.save_factors(factors, path, meta)
        report["experts"][skill] = {
            "file": path.name,
            "sha256": sha256_of(path),
            "settings": _recorded(own),
            "loss": log,
        }
        paths[skill] = path
    log_file.write_text(json.dumps(report, indent=1) + "\n")
    return paths


def _recorded(settings: RealZooSettings) -> dict[str, Any]:
    """The settings as an expert's metadata records them (`modules` only where not the MLP, so
    the MLP experts' files are the bytes they were before it existed)."""
    out = asdict(settings)
    for key, plain in (("modules", "mlp"), ("letter_steps", 0)):
        if out[key] == plain:
            out.pop(key)
    if not settings.letter_steps:
        out.pop("letter_lr")
    out.pop("test_examples")  # scoring only: no expert's training depends on it
    return out


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
