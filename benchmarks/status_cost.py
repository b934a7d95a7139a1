"""What `evomerge status` costs as a run grows, and what the store holds per evaluation.

Three runs of 100, 5,000 and 50,000 evaluations (two objectives, so the Pareto set is a real
one; 16 genes) are made through the search loop with a fitness that scores at once, then
`evomerge status` is timed on each, as a command (interpreter start-up included) and as the
call inside one process, against a full read of every evaluation (what status did before the
kept summary). A fourth run of 5,000 evaluations over 2,024 genes (a data-flow space over two
22-layer models) gives the store's size, against the bytes its genomes would take written as
JSON numbers (the earlier format), computed from the same genomes.

    python benchmarks/status_cost.py [--sizes 100 5000 50000] [--out results/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.config import RunConfig  # noqa: E402
from evomerge.results.status import summary  # noqa: E402
from evomerge.results.store import RunStore, encode_genome  # noqa: E402
from evomerge.results.summary import RunSummary  # noqa: E402
from evomerge.search.loop import SearchLoop  # noqa: E402
from evomerge.search.run import create_run  # noqa: E402
from evomerge.workers.evaluator import Outcome  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from instant_pool import InstantPool  # noqa: E402
from soak import LARGE, SMALL  # noqa: E402  (16 and 2,024 genes)

REPEATS = 5


def two_distances(genome: np.ndarray) -> Outcome:
    """Scores at once: distance to one point and to another (a trade-off between them)."""
    near = float(np.mean((genome - 0.3) ** 2))
    far = float(np.mean((genome - 0.7) ** 2))
    return Outcome(metrics={"near": near, "far": far})


def config(models: dict, space: dict, budget: int) -> dict:
    return {
        "models": {"base": str(models["base"]), "a": str(models["ft0"]), "b": str(models["ft1"])},
        "base_model": "base",
        "search_space": space,
        "objectives": [
            {"name": "near", "metric": "near", "direction": "minimize"},
            {"name": "far", "metric": "far", "direction": "minimize"},
        ],
        "optimizer": {"name": "random"},
        "budget": budget,
        "seed": 0,
        "fitness": {"function": "tests.fitness_fns:score"},
        "device": "cpu",
        "pool": "local",
        "score_sources": False,
    }


def make_run(models: dict, space: dict, budget: int, folder: Path) -> float:
    start = time.perf_counter()
    run = create_run(RunConfig.from_dict(config(models, space, budget)), folder)
    SearchLoop(run, InstantPool(two_distances), progress=False).run_to_budget()
    run.store.close()
    return time.perf_counter() - start


def status_command_s(folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "evomerge"), "status", str(folder)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def in_process_s(folder: Path) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary(folder)
    return time.perf_counter() - start


def full_read_s(folder: Path) -> float:
    """Every evaluation read and summed up: the cost status had before the kept summary."""
    start = time.perf_counter()
    store = RunStore.open(folder)
    RunSummary.of(store.records(), store.objectives, store.directions)
    return time.perf_counter() - start


def store_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("store.sqlite*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 5000, 50000])
    parser.add_argument("--large-evals", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    from tests.family import make_family

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        kw = {"n_finetunes": 2, "seed": 0, "hidden": 16, "heads": 2, "kv_heads": 1}
        small = make_family(tmp / "small", "llama", **kw)
        large = make_family(tmp / "large", "llama", layers=22, **kw)
        runs = {}
        for size in args.sizes:
            runs[size] = tmp / f"run-{size}"
            wall = make_run(small, SMALL, size, runs[size])
            print(f"{size} evaluations made in {wall:.0f} s", flush=True)
        rows = {
            size: {"evaluations": size, "command": [], "in_process": [], "full_read": []}
            for size in args.sizes
        }
        for _ in range(REPEATS):  # interleaved, so a slow moment of the machine hits all sizes
            for size, folder in runs.items():
                rows[size]["command"].append(status_command_s(folder))
                rows[size]["in_process"].append(in_process_s(folder))
                rows[size]["full_read"].append(full_read_s(folder))
        table = []
        for size, row in rows.items():
            store = RunStore.open(runs[size])
            table.append(
                {
                    "evaluations": size,
                    "pareto_size": len(store.summary().pareto),
                    "status_command_s": statistics.median(row["command"]),
                    "status_in_process_s": statistics.median(row["in_process"]),
                    "full_read_s": statistics.median(row["full_read"]),
                    "store_mb": store_bytes(runs[size]) / 2**20,
                }
            )
            print(json.dumps(table[-1]), flush=True)
        big = tmp / "large-run"
        make_run(large, LARGE, args.large_evals, big)
        records = RunStore.open(big).records()
        as_json = sum(len(json.dumps([float(v) for v in r.genome])) for r in records)
        compact = sum(len(encode_genome(r.genome)) for r in records)
        genomes = {
            "genes": len(records[0].genome),
            "evaluations": len(records),
            "store_mb": store_bytes(big) / 2**20,
            "genomes_compact_mb": compact / 2**20,
            "genomes_as_json_mb": as_json / 2**20,
        }
        genomes["store_as_json_mb"] = genomes["store_mb"] + (as_json - compact) / 2**20
        print(json.dumps(genomes), flush=True)
    lines = [
        "| evaluations | Pareto set | `evomerge status` (s) | status in-process (s) | "
        "full read (s) | store (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['evaluations']:,} | {r['pareto_size']} | {r['status_command_s']:.2f} | "
            f"{r['status_in_process_s']:.3f} | {r['full_read_s']:.2f} | {r['store_mb']:.1f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "status_cost.json").write_text(
        json.dumps({"status": table, "genomes": genomes, "repeats": REPEATS}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
