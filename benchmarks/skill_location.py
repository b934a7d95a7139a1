"""Where each real-zoo expert's skill lives: per-block swaps of its task vector.

For each expert and each block of layers (30 layers in 6 blocks of 5), its own skill's exact
match (greedy, the chat-templated prompts lm-eval scores, the task's test split) with the
expert's task vector kept only in that block ("only"), and with it removed from that block only
("without"). A skill that survives "without" a block does not need it; one that "only" a block
restores lives there. Experts must hold a skill in layers another expert leaves alone before a
layer-wise merge can compose them.

    python benchmarks/skill_location.py [--experts add,read,decode] [--examples 96]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_vector(factors: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = load_file(str(factors))
    names = sorted({k.rsplit(".lora_", 1)[0] for k in f if ".lora_" in k})
    out = {n: f[f"{n}.lora_B"].float() @ f[f"{n}.lora_A"].float() for n in names}
    for key in (k for k in f if k.endswith(".rows")):  # new words: embedding rows
        name = key.removesuffix(".rows")
        out[name] = (f[key].float(), f[f"{name}.row_ids"])
    return out


def layer_of(name: str) -> int:
    """The layer a weight belongs to; -1 for the embeddings (kept in every swap but "base")."""
    return int(name.split(".")[2]) if ".layers." in name else -1


@torch.no_grad()
def exact_match(model, tokenizer, examples, batch: int = 32) -> float:
    from evomerge.zoo.real import chat_text

    right = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        encoded = tokenizer(
            [chat_text(tokenizer, e.prompt) for e in chunk],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        out = model.generate(
            **encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :])
        for text, e in zip(texts, chunk):
            answer = text.split("<|im_end|>")[0].split("\n")[0].replace(" ", "")
            right += answer == e.answer.strip()
    return right / len(examples)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo.real import EXPERTS, RealZooSettings, splits
    from evomerge.zoo.smollm import build_smollm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="add,read,decode")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()

    base = build_smollm(ROOT / "results" / "zoo" / "smollm2" / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    weights = dict(model.named_parameters())
    original = {n: w.detach().clone() for n, w in weights.items()}
    depth = len(model.model.layers)
    data = splits(RealZooSettings())
    saved = args.out / "skill_location.json"
    kept = json.loads(saved.read_text()) if saved.is_file() else {}
    same = kept.get("blocks") == args.blocks and kept.get("examples") == args.examples
    # the experts not run this time keep their rows from the last run at the same settings
    results: dict = {k: v for k, v in kept.items() if isinstance(v, dict)} if same else {}
    results.update(blocks=args.blocks, depth=depth, examples=args.examples)
    start = time.perf_counter()
    for expert in args.experts.split(","):
        delta = task_vector(EXPERTS / f"{expert}.safetensors")
        examples = data[expert]["test"][: args.examples]

        def score(keep, delta=delta, examples=examples) -> float:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(original[name])
                for name, d in delta.items():
                    if isinstance(d, tuple):
                        if keep(-1):
                            weights[name][d[1]] += d[0]
                    elif keep(layer_of(name)):
                        weights[name].add_(d)
            return round(exact_match(model, tokenizer, examples), 4)

        blocks = [
            range(b * depth // args.blocks, (b + 1) * depth // args.blocks)
            for b in range(args.blocks)
        ]
        row = {"full": score(lambda layer: True), "base": score(lambda layer: False)}
        row["only"] = [score(lambda layer, b=b: layer in b or layer < 0) for b in blocks]
        row["without"] = [score(lambda layer, b=b: layer not in b) for b in blocks]
        row["blocks"] = [[b.start, b.stop - 1] for b in blocks]
        results[expert] = row
        print(expert, json.dumps(row), flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    experts = [k for k, v in results.items() if isinstance(v, dict)]
    blocks = results[experts[0]]["blocks"]
    head = ["expert (own skill, EM)", "full", "base", *(f"L{a}-{b}" for a, b in blocks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for expert in experts:
        row = results[expert]
        for kind in ("only", "without"):
            cells = [f"{expert}: {kind} this block", f"{row['full']:.2f}", f"{row['base']:.2f}"]
            lines.append("| " + " | ".join(cells + [f"{v:.2f}" for v in row[kind]]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
