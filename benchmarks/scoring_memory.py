"""Scoring's memory against the footprint formula's scoring term, on the real zoo.

Each measurement is a fresh process that loads SmolLM2-135M-Instruct as a worker's live model
(score dtype float32, as the demo; its weights read in by a 4-token forward, as a worker's
merged live model is resident before it scores), builds the demo's lm-eval fitness for one
kind of task (multiple choice: loglikelihood requests; generative: generate_until) at one
batch size, and
scores the model twice. Its peak resident memory above what it held before the first score is
scoring's (`max_memory_allocated` on a CUDA device); the formula's figure is computed from the
same config. The shapes the model was actually called with (batch x tokens) are recorded, to
show the formula's request length against the real one.

A last process is a whole worker as the demo runs it (`--only worker`): an in-process evaluator
of the demo's run config (three sources, its PS+DFS space, all six fitness tasks at batch 32),
its resident memory after start-up and at its peak over its first evaluation, against the
footprint's peak (sources + live model + merge temporaries + scoring).

    python benchmarks/scoring_memory.py [--batch-sizes 8 32] [--only scoring|worker]
        [--out results/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DEMO = ROOT / "search_spaces" / "examples" / "demo_run.yaml"
KINDS = {
    "multiple choice": ["sm2_add_fit", "sm2_read_fit", "sm2_cy_add_fit"],
    "generate_until": ["sm2_add_gen_fit", "sm2_read_gen_fit", "sm2_cy_add_gen_fit"],
}
GIB = 2**30


def rss_now_bytes() -> int:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, batch_size: int, device: str, heap_kept: bool = False) -> None:
    """One measurement, printed as JSON on the last line (`heap_kept`: scored in the merge's
    heap-only allocator mode, as workers did before scoring_allocations)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import RunConfig
    from evomerge.merge.io import ModelSource
    from evomerge.merge.memory import keep_freed_memory, scoring_allocations
    from evomerge.workers.footprint import predict_scoring
    from evomerge.workers.scoring import LmEvalFitness

    raw = RunConfig.load(DEMO).model_dump()
    raw["fitness"].update(tasks=KINDS[kind], batch_size=batch_size, fidelity=None, held_out=None)
    raw["device"] = device
    config = RunConfig.from_dict(raw)
    fitness = config.fitness
    base = config.models["base"]
    keep_freed_memory()  # as every worker does once it has merged
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    score = LmEvalFitness(
        tasks=fitness.tasks,
        include_path=fitness.include_path,
        batch_size=fitness.batch_size,
        apply_chat_template=fitness.apply_chat_template,
        system_instruction=fitness.system_instruction,
    )
    shapes: set[tuple[int, int]] = set()

    def watched(module, args, kwargs):  # every forward the scoring makes, whoever makes it
        inputs = args[0] if args else kwargs.get("input_ids")
        if inputs is not None:
            shapes.add(tuple(inputs.shape[:2]))

    predicted = predict_scoring(config, ModelSource(base), 4)  # float32 scores
    with torch.no_grad():  # a loaded model's weights are mapped from its file, and a first
        model(torch.ones(1, 4, dtype=torch.long, device=device))  # forward reads them all in:
    # that is the live model, which a worker holds before it scores, not scoring
    model.register_forward_pre_hook(watched, with_kwargs=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_now_bytes()
    allocations = contextlib.nullcontext() if heap_kept else scoring_allocations()
    with torch.no_grad(), allocations:  # as a worker scores
        score(model, tokenizer)
        first = (
            torch.cuda.max_memory_allocated()
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        score(model, tokenizer)
    second = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(
        json.dumps(
            {
                "kind": kind,
                "batch_size": batch_size,
                "heap_kept": heap_kept,
                "device": device,
                "measured_gib": (first - before) / GIB,
                "after_second_gib": (second - before) / GIB,
                "formula_gib": predicted.total / GIB,
                "formula_parts_gib": {k: v / GIB for k, v in predicted.parts().items()},
                "formula_tokens": predicted.tokens,
                "largest_call": max(shapes, key=lambda s: s[0] * s[1]),
            }
        )
    )


def worker_child(device: str) -> None:
    """A whole worker against the footprint's peak, printed as JSON on the last line."""
    import lm_eval.evaluator  # noqa: F401  (imports count before the worker, not in it)
    import transformers  # noqa: F401

    from evomerge.config import RunConfig
    from evomerge.search.prepare import prepare
    from evomerge.workers.evaluator import Evaluator
    from evomerge.workers.footprint import predict

    raw = RunConfig.load(DEMO).model_dump()
    raw["device"] = device
    config, space = prepare(RunConfig.from_dict(raw))
    footprint = predict(config, space)
    before = rss_now_bytes()
    worker = Evaluator(
        list(dict.fromkeys(config.models.values())),
        config.fitness.model_dump(mode="json"),
        device=device,
        score_dtype=config.score_dtype,
        threads=config.threads_per_worker,
    )
    started = rss_now_bytes() - before
    outcome = worker.evaluate(space.decode(space.initial()).to_yaml())
    if outcome.error:
        raise RuntimeError(outcome.error)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(
        json.dumps(
            {
                "device": device,
                "started_gib": started / GIB,
                "peak_gib": peak / GIB,
                "formula_gib": footprint.peak / GIB,
                "formula_line": footprint.describe(),
                "ratio": peak / footprint.peak,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--only", choices=["scoring", "worker", "heap"])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "worker":
            worker_child(args.device)
        else:
            child(args.child[0], int(args.child[1]), args.device, "heap" in args.child[2:])
        return 0
    out = args.out / "scoring_memory.json"
    earlier = json.loads(out.read_text()) if args.only and out.exists() else {}
    rows = [] if args.only in (None, "scoring") else earlier.get("scoring", [])
    for kind in KINDS if args.only in (None, "scoring") else []:
        for batch in args.batch_sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(batch), "--device", args.device],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["ratio"] = row["measured_gib"] / row["formula_gib"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    heap = earlier.get("heap_kept")
    if args.only in (None, "heap"):  # the allocator before: multiple choice, largest batch
        batch = str(max(args.batch_sizes))
        cmd = [sys.executable, __file__, "--child", "multiple choice", batch, "heap"]
        proc = subprocess.run([*cmd, "--device", args.device], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        heap = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(heap), flush=True)
    worker = earlier.get("worker")
    if args.only in (None, "worker"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "worker", "0", "--device", args.device],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        worker = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(worker), flush=True)
    lines = [
        "| fitness | batch | model called with (batch x tokens) | formula tokens | "
        "measured GiB | formula GiB | measured/formula |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, t = r["largest_call"]
        lines.append(
            f"| {r['kind']} | {r['batch_size']} | {b} x {t} | {r['formula_tokens']} | "
            f"{r['measured_gib']:.2f} | {r['formula_gib']:.2f} | {r['ratio']:.2f} |"
        )
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"scoring": rows, "heap_kept": heap, "worker": worker}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
