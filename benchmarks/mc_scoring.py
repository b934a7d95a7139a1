"""Multiple-choice scoring with each context run once, against lm-eval's stock HFLM, on the real
zoo's three multiple-choice test splits (288 documents, four choices each, chat-templated as
the demo scores them).

Both scorers wrap the same in-memory model (float32, as the demo scores) at the same batch
size, in one process, taking turns (`--repeats` rounds, the order alternating, so a change in
the machine's speed reaches both); seconds are each scorer's median. The log-likelihood of
every choice is compared: the largest difference, and how many documents' accuracy differs.

    python benchmarks/mc_scoring.py [--model add] [--limit 288] [--batch-size 32] [--repeats 2]
        [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = ["sm2_add_test", "sm2_read_test", "sm2_cy_add_test"]
SYSTEM = "Answer with the result only."


def score(lm, tasks: dict, limit: int) -> tuple[float, dict]:
    from lm_eval.evaluator import evaluate

    start = time.perf_counter()
    out = evaluate(lm=lm, task_dict=tasks, limit=limit, bootstrap_iters=0,
                   apply_chat_template=True, system_instruction=SYSTEM, log_samples=True,
                   verbosity="ERROR")  # fmt: skip
    return time.perf_counter() - start, out


def compare(ours: dict, stock: dict) -> dict:
    """The largest log-likelihood difference over every choice, and documents whose accuracy
    differs."""
    worst, flips, documents = 0.0, 0, 0
    for task, samples in stock["samples"].items():
        theirs = {s["doc_id"]: s for s in samples}
        for sample in ours["samples"][task]:
            other = theirs[sample["doc_id"]]
            for mine, want in zip(sample["resps"], other["resps"]):
                worst = max(worst, abs(float(mine[0][0]) - float(want[0][0])))
            flips += sample["acc"] != other["acc"]
            documents += 1
    return {"max_abs_loglikelihood_difference": worst, "accuracy_flips": flips,
            "documents": documents}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="add", help="a model of results/zoo/smollm2")
    parser.add_argument("--limit", type=int, default=288, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.workers.scoring import load_tasks
    from evomerge.workers.shared_context import SharedContextHFLM

    path = ROOT / "results" / "zoo" / "smollm2" / args.model
    if not path.exists():
        sys.exit(f"{path} is missing: build the real zoo first (`evomerge zoo real`)")
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tasks = load_tasks(TASKS, str(ROOT / "fitness" / "smollm2"), None, None)
    scorers = {
        "lm_eval_hflm": HFLM(
            pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size
        ),  # fmt: skip
        "shared_context": SharedContextHFLM(
            pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size
        ),  # fmt: skip
    }
    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    results: dict[str, dict] = {}
    for round_ in range(args.repeats):
        order = list(scorers) if round_ % 2 == 0 else list(reversed(scorers))
        for name in order:
            took, results[name] = score(scorers[name], tasks, args.limit)
            seconds[name].append(round(took, 2))
            print(f"round {round_} {name}: {took:.1f} s", flush=True)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    accuracy = {name: {task: r["results"][task]["acc,none"] for task in TASKS}
                for name, r in results.items()}  # fmt: skip
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": args.model,
        "tasks": TASKS,
        "documents_per_task": args.limit,
        "batch_size": args.batch_size,
        "seconds": seconds,
        "median_seconds": median,
        "speedup": round(median["lm_eval_hflm"] / median["shared_context"], 2),
        "accuracy": accuracy,
        **compare(results["shared_context"], results["lm_eval_hflm"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mc_scoring.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("median_seconds", "speedup", "accuracy_flips",
                                             "max_abs_loglikelihood_difference")}))  # fmt: skip


if __name__ == "__main__":
    main()
