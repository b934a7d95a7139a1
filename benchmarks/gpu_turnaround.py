"""A GPU worker on a ~1B Llama family (a random base and two perturbed experts, bf16, made
locally): DARE-TIES merged in place with the sources on the device against sources in pinned
host memory, turnaround per candidate, the peak device memory against the memory formula
(evomerge/workers/footprint.py), and evaluations per hour with lm-eval on the device.

    python benchmarks/gpu_turnaround.py [--size 1b|tiny] [--device cuda] [--repeats 3]
                                        [--docs 200] [--out results/bench]

`--size tiny --device cpu` runs the same steps on a small model (a check of the script; the
figures that matter are the GPU's).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.turnaround import write_task  # noqa: E402

SIZES = {  # TinyLlama-1.1B's shape; tiny: a smoke check of the script on a CPU
    "1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=4000),
}
GIB = 2**30


def run_config(models: dict[str, Path], tasks: Path, device: str, sources: str) -> dict:
    return {
        "models": {"base": str(models["base"]), "a": str(models["ft0"]), "b": str(models["ft1"])},
        "base_model": "base",
        "search_space": {
            "kind": "parameter",
            "method": "dare_ties",
            "parameters": {
                "weight": {"low": 0.0, "high": 1.0, "init": 0.5},
                "density": {"low": 0.1, "high": 1.0, "init": 0.6},
            },
        },
        "fitness": {
            "kind": "lm_eval",
            "tasks": ["bench_mc"],
            "include_path": str(tasks),
            "batch_size": 32,
        },
        "objectives": [{"name": "acc", "metric": "bench_mc: acc,none"}],
        "optimizer": {"name": "cma"},
        "score_dtype": "bfloat16",
        "device": device,
        "sources": sources,
        "pool": "local",
        "budget": 1,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: dict, repeats: int) -> dict:
    """One worker: its turnaround per candidate, one evaluation, and its device peak."""
    from evomerge.config import RunConfig
    from evomerge.search.prepare import prepare
    from evomerge.workers.footprint import predict
    from evomerge.workers.pool import make_pool

    resolved, space = prepare(RunConfig.from_dict(config))
    footprint = predict(resolved, space)
    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    worker = make_pool(resolved, footprint.reserve).evaluator  # the run's own local worker
    load_s = time.perf_counter() - start
    recipe = space.decode(space.initial())
    merges, evaluations = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        model, tokenizer = worker.materialize(recipe)
        synchronize(device)
        merges.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            worker.fitness(model, tokenizer)
        synchronize(device)
        evaluations.append(time.perf_counter() - start)
        del model
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    predicted = footprint.peak if worker.sources_on == "device" else footprint.reserve
    row = {
        "sources": worker.sources_on,
        "load_s": load_s,
        "merge_s": statistics.median(merges),
        "evaluation_s": statistics.median(evaluations),
        "predicted_device_gib": predicted / GIB,
        "peak_device_gib": None if peak is None else peak / GIB,
        "footprint": footprint.describe(),
    }
    row["evaluations_per_hour"] = 3600 / (row["merge_s"] + row["evaluation_s"])
    del worker
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_turnaround: --device cuda needs a CUDA GPU (use --size tiny --device cpu to")
        print("check the script on a CPU)")
        raise SystemExit(2)

    from tests.family import make_family

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = make_family(
            tmp / "models", "llama", n_finetunes=2, seed=0, dtype=torch.bfloat16, **SIZES[args.size]
        )
        tasks = write_task(tmp / "tasks", args.docs)
        rows = [
            measure(run_config(models, tasks, args.device, sources), args.repeats)
            for sources in ("device", "host")
        ]
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else "cpu"
    )
    result = {"device": device_name, "size": args.size, "docs": args.docs, "rows": rows}
    lines = [
        f"GPU worker: {args.size} Llama family in bf16 (base + 2 experts), dare_ties in place, "
        f"lm-eval on {args.docs} 3-way multiple-choice documents, {device_name}, "
        f"median of {args.repeats}",
        "",
        "| sources | load (s) | merge (s) | evaluation (s) | evaluations/hour | peak device GiB "
        "| formula GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.2f}"
        lines.append(
            f"| {r['sources']} | {r['load_s']:.1f} | {r['merge_s']:.2f} | {r['evaluation_s']:.2f} "
            f"| {r['evaluations_per_hour']:.0f} | {peak} | {r['predicted_device_gib']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_turnaround.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu_turnaround.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
