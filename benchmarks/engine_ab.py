"""Engine speed, before and after a change, in one run: the merge engine of two evomerge source
trees (say a worktree of an older commit, and this one), timed alternately in fresh processes
on the same models, so that machine drift falls on both alike.

    git worktree add /tmp/before <commit>
    python benchmarks/engine_ab.py --before /tmp/before [--rounds 5] [--out results/bench]

For each method, each round times `merge_to_disk` (the engine) and `merge_into_model` (the
worker's in-memory path) once per tree, the order of the trees alternating between rounds; the
table gives medians and the after/before ratio. Uses the 58M-parameter models of
benchmarks/merge_speed.py (built there if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# one timing in a fresh process: the tree on PYTHONPATH is the evomerge that runs
_TIMER = r"""
import json, shutil, sys, time
import evomerge
from evomerge.merge.engine import load_source_tensors, merge_into_model, merge_to_disk, plan_for
from evomerge.merge.io import ModelSource
from evomerge.recipe import Recipe
from transformers import AutoModelForCausalLM
recipe, out = json.loads(sys.argv[1]), sys.argv[2]
parsed = Recipe.from_dict(recipe)
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
merge_to_disk(parsed, out, device="cpu", progress=False)
engine = time.perf_counter() - t
sources = {ref: ModelSource(ref) for ref in parsed.referenced_models()}
tensors = load_source_tensors(sources, "cpu")
live = AutoModelForCausalLM.from_pretrained(recipe["base_model"])
merge_into_model(plan_for(parsed, sources), tensors, live)  # warm
t = time.perf_counter()
merge_into_model(plan_for(parsed, sources), tensors, live)
memory = time.perf_counter() - t
print(json.dumps({"engine": engine, "in_memory": memory, "from": evomerge.__file__}))
"""


def time_once(tree: Path, recipe: dict, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", _TIMER, json.dumps(recipe), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr.strip().splitlines()[-1]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["from"].startswith(str(tree)):
        raise SystemExit(f"{tree}: imported evomerge from {result['from']}")
    return result


def main() -> None:
    from benchmarks.merge_speed import CONFIGS, build_models, recipe_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the older source tree")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    models = build_models(args.out / "models_58m")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rows = []
    for name in CONFIGS:
        recipe = recipe_for(name, models)  # the recipes of benchmarks/merge_speed.py
        times: dict[str, list[dict]] = {"before": [], "after": []}
        for k in range(args.rounds):
            for label in ("before", "after") if k % 2 == 0 else ("after", "before"):
                times[label].append(time_once(trees[label], recipe, args.out / "ab_merge"))
        row = {"method": name}
        for path in ("engine", "in_memory"):
            for label in ("before", "after"):
                row[f"{path}_{label}_s"] = statistics.median(t[path] for t in times[label])
            row[f"{path}_ratio"] = row[f"{path}_after_s"] / row[f"{path}_before_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        f"Engine before/after, alternating fresh processes, median of {args.rounds}, cpu",
        "",
        "| method | engine before s | engine after s | after/before | in-memory before s "
        "| in-memory after s | after/before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['engine_before_s']:.2f} | {r['engine_after_s']:.2f} | "
            f"{r['engine_ratio']:.2f} | {r['in_memory_before_s']:.2f} | "
            f"{r['in_memory_after_s']:.2f} | {r['in_memory_ratio']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_ab.md").write_text("\n".join(lines) + "\n")
    (args.out / "engine_ab.json").write_text(
        json.dumps({"before": str(trees["before"]), "rounds": args.rounds, "rows": rows}, indent=2)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
