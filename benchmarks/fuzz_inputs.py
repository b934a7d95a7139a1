"""Fuzz evomerge's front door: every one-fault mutant of valid run configs, search-space files and
mergekit recipes (each path x each mutation in tests/mutations.py), plus random two-fault mutants.
Each must be accepted and work (a config prepares; a space's genomes all decode to plans that
build; a merge writes a complete folder) or be refused with one error line and nothing written.
Anything else (a traceback, a second line, a leftover folder) is counted as a bug and shown.

    python benchmarks/fuzz_inputs.py [--pairs 1000] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def double_mutations(seeds: dict[str, Any], count: int, rng: random.Random) -> Iterator[Any]:
    from tests.mutations import MUTATIONS, mutate, paths

    names = sorted(seeds)
    for _ in range(count):
        data = seeds[rng.choice(names)]
        for _ in range(2):
            where = list(paths(data))
            if not where:
                break
            data = mutate(data, rng.choice(where), rng.choice(MUTATIONS))
        yield data


def tally(cases: Iterator[Any], check: Callable[[Any], str], bugs: list[str], label: str) -> dict:
    counts = {"cases": 0, "valid": 0, "error": 0, "bug": 0}
    for case in cases:
        counts["cases"] += 1
        try:
            counts[check(case)] += 1
        except Exception:  # any escape is the finding this script exists to report
            counts["bug"] += 1
            bugs.append(
                f"[{label}] {json.dumps(case, default=str)[:300]}\n{traceback.format_exc()}"
            )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="random two-fault mutants per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()

    from evomerge.merge.io import ModelSource
    from tests.family import make_family
    from tests.mutations import (
        check_merge,
        check_run_config,
        check_search_space,
        recipe_seeds,
        single_mutations,
        space_seeds,
    )
    from tests.test_run import run_config

    # a mutant that asks for absurd memory must show up as a counted bug, not an OOM-killed run
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="evomerge-fuzz-"))
    family = make_family(work / "models", "llama", n_finetunes=2, seed=1)
    config = run_config(family, optimizer={"name": "random"})
    sources = {str(p.resolve()): ModelSource(str(p.resolve())) for p in family.values()}
    spaces = space_seeds(ROOT / "search_spaces")
    recipes = recipe_seeds(family)
    case_dir = work / "case"
    case_dir.mkdir()
    targets: dict[str, tuple[dict[str, Any], Callable[[Any], str]]] = {
        "run config": ({"run": config}, check_run_config),
        "search-space file": (
            spaces,
            lambda space: check_search_space(space, config, case_dir, sources),
        ),
        "merge recipe (evomerge merge)": (recipes, lambda r: check_merge(r, case_dir)),
    }
    rows, bugs = [], []
    for kind, (seeds, check) in targets.items():
        start = time.perf_counter()
        singles = (m for seed in seeds.values() for _, m in single_mutations(seed))
        one = tally(singles, check, bugs, kind)
        two = tally(double_mutations(seeds, args.pairs, rng), check, bugs, kind)
        rows.append(
            {
                "input": kind,
                "seed files": len(seeds),
                "one-fault cases": one["cases"],
                "two-fault cases": two["cases"],
                "accepted": one["valid"] + two["valid"],
                "refused in one line": one["error"] + two["error"],
                "bugs": one["bug"] + two["bug"],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(rows[-1], flush=True)
    for bug in bugs[:10]:
        print(bug)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz_inputs.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    print("\n".join(lines))
    print(f"total cases: {sum(r['one-fault cases'] + r['two-fault cases'] for r in rows)}")


if __name__ == "__main__":
    main()
