"""Many experts: how a worker's memory, its in-place turnaround and the manager's cost per
evaluation grow with 2, 4 and 8 sources of one family (TIES, weight and density per expert per
layer group, 8 layer groups), each size measured in a fresh process so peaks do not mix.

    python benchmarks/many_experts.py [--experts 2,4,8] [--hidden 512] [--layers 8]
                                      [--candidates 5] [--asks 60] [--out results/bench]

Per size: the memory formula's prediction (`evomerge run`'s "memory per worker" line) against
the worker process's peak resident memory (less the same process's before the worker started),
the median seconds to write one candidate into the live model (instant fitness), and the
driver's cost per evaluation (CMA-ES ask and tell, decode, recipe text).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(family: Path, experts: int, candidates: int, asks: int) -> dict:
    """One size, in this process (run by main in a fresh one): the family's base and its first
    `experts` fine-tunes."""
    import torch

    from evomerge.config import RunConfig
    from evomerge.optim.base import Evaluation
    from evomerge.search.prepare import optimizer_for, prepare
    from evomerge.workers.footprint import predict
    from evomerge.workers.pool import make_pool

    torch.set_num_threads(2)
    models = {"base": str(family / "llama_base")}
    models |= {f"ft{i}": str(family / f"llama_ft{i}") for i in range(experts)}
    config = RunConfig.from_dict(
        {
            "models": models,
            "base_model": "base",
            "search_space": {
                "kind": "parameter",
                "method": "ties",
                "parameters": {
                    "weight": {"low": 0.0, "high": 1.0, "init": 0.5},
                    "density": {"low": 0.1, "high": 1.0, "init": 0.5},
                },
                "layer_groups": 8,
            },
            "objectives": [{"name": "s", "metric": "score"}],
            "optimizer": {"name": "cma"},
            "budget": asks,
            "fitness": {"kind": "python", "function": "tests.fitness_fns:score"},
            "pool": "local",
            "device": "cpu",
            "score_sources": False,
        }
    )
    resolved, space = prepare(config)
    footprint = predict(resolved, space)
    before = rss_bytes()
    pool = make_pool(resolved, reserve_bytes=footprint.reserve)
    evaluator = pool.evaluator
    rng = np.random.default_rng(0)
    low, high = space.bounds()
    seconds = []
    for _ in range(candidates + 1):  # the first one warms the allocator
        recipe = space.decode(rng.uniform(low, high)).to_yaml()
        outcome = evaluator.evaluate(recipe)
        assert outcome.error is None, outcome.error
        seconds.append(outcome.seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = rss_bytes()
    optimizer = optimizer_for(resolved, space)
    start = time.perf_counter()
    for i in range(asks):
        (candidate,) = optimizer.ask(1)
        space.decode(candidate.genome).to_yaml()
        optimizer.tell(Evaluation(candidate.index, candidate.genome, np.array([i % 7.0])))
    manager = (time.perf_counter() - start) / asks
    return {
        "experts": experts,
        "genes": len(space.gene_names()),
        "source_gib": footprint.sources / GIB,
        "predicted_gib": footprint.peak / GIB,
        "formula": footprint.describe(),
        "measured_peak_gib": (peak - before) / GIB,
        "measured_held_gib": (held - before) / GIB,
        "turnaround_s": statistics.median(seconds[1:]),
        "manager_ms_per_eval": manager * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="2,4,8")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--asks", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single size, as JSON
    parser.add_argument("--family", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.family, args.one, args.candidates, args.asks)))
        return 0
    from tests.family import make_family

    sizes = [int(x) for x in args.experts.split(",")]
    tmp = tempfile.TemporaryDirectory()
    family = Path(tmp.name)
    make_family(family, n_finetunes=max(sizes), hidden=args.hidden, layers=args.layers)
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--family", str(family),
               "--candidates", str(args.candidates), "--asks", str(args.asks)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{n} experts: {r['genes']:4d} genes  predicted {r['predicted_gib']:.2f} GiB  "
            f"measured peak {r['measured_peak_gib']:.2f} GiB  turnaround {r['turnaround_s']:.3f} s"
            f"  manager {r['manager_ms_per_eval']:.2f} ms/eval",
            flush=True,
        )
    tmp.cleanup()
    first = rows[0]
    for r in rows:
        scale = r["experts"] / first["experts"]
        r["growth_vs_smallest"] = {
            "experts": scale,
            "turnaround": r["turnaround_s"] / first["turnaround_s"],
            "manager": r["manager_ms_per_eval"] / first["manager_ms_per_eval"],
            "measured_peak": r["measured_peak_gib"] / first["measured_peak_gib"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, 2 threads",
        "model": f"llama, hidden {args.hidden}, {args.layers} layers",
        "rows": rows,
    }
    (args.out / "many_experts.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out / 'many_experts.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
