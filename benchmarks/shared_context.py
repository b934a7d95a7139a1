"""Scoring with shared contexts run once, against lm-eval's stock HFLM, on the real zoo's test
splits: the three multiple-choice tasks (four choices each) and the three generative ones (288
documents each, chat-templated as the demo scores them).

Both scorers wrap the same in-memory model (float32, as the demo scores) at the same batch size
and thread count, in one process, taking turns (`--repeats` rounds, the order alternating, so a
change in the machine's speed reaches both); seconds are each scorer's median. The results are
compared: for multiple choice the largest log-likelihood difference over every choice, for
generation how many generations differ, and how many documents' score differs.

    python benchmarks/shared_context.py [--model add] [--limit 288] [--batch-size 32]
        [--threads 2] [--repeats 2] [--out results/bench]
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

KINDS = {
    "multiple_choice": ["sm2_add_test", "sm2_read_test", "sm2_cy_add_test"],
    "generate_until": ["sm2_add_gen_test", "sm2_read_gen_test", "sm2_cy_add_gen_test"],
}
METRIC = {"multiple_choice": "acc", "generate_until": "exact_match"}
SYSTEM = "Answer with the result only."


def score(lm, tasks: dict, limit: int) -> tuple[float, dict]:
    from lm_eval.evaluator import evaluate

    start = time.perf_counter()
    out = evaluate(lm=lm, task_dict=tasks, limit=limit, bootstrap_iters=0,
                   apply_chat_template=True, system_instruction=SYSTEM, log_samples=True,
                   verbosity="ERROR")  # fmt: skip
    return time.perf_counter() - start, out


def compare(kind: str, ours: dict, stock: dict) -> dict:
    """How far the shared-context results are from lm-eval's own."""
    metric = METRIC[kind]
    worst, differ, flips, documents = 0.0, 0, 0, 0
    for task, samples in stock["samples"].items():
        theirs = {s["doc_id"]: s for s in samples}
        for sample in ours["samples"][task]:
            other = theirs[sample["doc_id"]]
            for mine, want in zip(sample["resps"], other["resps"]):
                if kind == "multiple_choice":
                    worst = max(worst, abs(float(mine[0][0]) - float(want[0][0])))
                else:
                    differ += int(mine[0] != want[0])
            flips += int(sample[metric] != other[metric])
            documents += 1
    out = {"documents": documents, "score_flips": flips}
    if kind == "multiple_choice":
        out["max_abs_loglikelihood_difference"] = worst
    else:
        out["generations_differing"] = differ
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="add", help="a model of results/zoo/smollm2")
    parser.add_argument("--limit", type=int, default=288, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
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
        parser.error(
            f"--model {args.model}: {path} is missing; build the real zoo (`evomerge zoo real`)"
        )
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    scorers = {
        "lm_eval_hflm": HFLM(
            pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size
        ),  # fmt: skip
        "shared_context": SharedContextHFLM(
            pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size
        ),  # fmt: skip
    }
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": args.model,
        "documents_per_task": args.limit,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "load_average_at_start": os.getloadavg()[0],  # other jobs on the machine, if any
    }
    for kind, names in KINDS.items():
        tasks = load_tasks(names, str(ROOT / "fitness" / "smollm2"), None, None)
        seconds: dict[str, list[float]] = {name: [] for name in scorers}
        results: dict[str, dict] = {}
        for round_ in range(args.repeats):
            order = list(scorers) if round_ % 2 == 0 else list(reversed(scorers))
            for name in order:
                took, results[name] = score(scorers[name], tasks, args.limit)
                seconds[name].append(round(took, 2))
                print(f"{kind} round {round_} {name}: {took:.1f} s", flush=True)
        median = {name: statistics.median(s) for name, s in seconds.items()}
        report[kind] = {
            "tasks": names,
            "seconds": seconds,
            "median_seconds": median,
            "speedup": round(median["lm_eval_hflm"] / median["shared_context"], 2),
            "scores": {
                name: {t: r["results"][t][f"{METRIC[kind]},none"] for t in names}
                for name, r in results.items()
            },  # fmt: skip
            **compare(kind, results["shared_context"], results["lm_eval_hflm"]),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_context.json").write_text(json.dumps(report, indent=1) + "\n")
    for kind in KINDS:
        print(
            kind,
            json.dumps({k: v for k, v in report[kind].items() if k not in ("tasks", "scores")}),
        )


if __name__ == "__main__":
    main()
