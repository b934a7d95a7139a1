"""Does read compose with add? The shipped read expert's own skill, add's, and the target
(cy_add: a sum with its numbers in read's letters) in the merges a user would try first: each
expert, task arithmetic at weight 1, the average, read's letter embeddings with all of add, and
read's embeddings and lowest layers below add's upper ones.

Greedy exact match on the test splits (the chat-templated prompts lm-eval scores), float32.

    python benchmarks/composition_probe.py [--examples 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from skill_location import exact_match, layer_of, task_vector  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo.real import EXPERTS, RealZooSettings, splits
    from evomerge.zoo.smollm import build_smollm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()

    base = build_smollm(ROOT / "results" / "zoo" / "smollm2" / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    weights = dict(model.named_parameters())
    original = {n: w.detach().clone() for n, w in weights.items()}
    deltas = {e: task_vector(EXPERTS / f"{e}.safetensors") for e in ("add", "read")}
    data = splits(RealZooSettings())
    tasks = {t: data[t]["test"][: args.examples] for t in ("add", "read", "cy_add")}

    def merged(weight) -> dict[str, float]:
        """Scores with each expert's task vector at `weight(expert, layer)` (layer -1: the
        embeddings)."""
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(original[name])
            for expert, delta in deltas.items():
                for name, d in delta.items():
                    if isinstance(d, tuple):
                        weights[name][d[1]] += weight(expert, -1) * d[0]
                    else:
                        weights[name].add_(weight(expert, layer_of(name)) * d)
        return {t: round(exact_match(model, tokenizer, ex), 4) for t, ex in tasks.items()}

    merges = {
        "read": lambda e, layer: float(e == "read"),
        "add": lambda e, layer: float(e == "add"),
        "task arithmetic, weight 1": lambda e, layer: 1.0,
        "average": lambda e, layer: 0.5,
        "read's letter embeddings + all of add": lambda e, layer: (
            float(layer < 0) if e == "read" else 1.0
        ),
        "read's embeddings and layers 0-3, add's 4-29": lambda e, layer: (
            float(layer < 4) if e == "read" else float(layer >= 4)
        ),
    }
    results = {"examples": args.examples, "merges": {}}
    for label, weight in merges.items():
        results["merges"][label] = merged(weight)
        print(label, results["merges"][label], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "composition_probe.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
