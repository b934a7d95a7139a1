"""The zoo results table: held-out accuracy per task and averaged, for the base, each expert,
untuned merges, the evolved PS merge, the evolved PS+DFS merge and the Pareto set's extremes.

Builds the zoo if absent, runs two searches with the same budget and seed (PS only, and the
demo's PS+DFS space), picks from each Pareto set the member with the best mean fitness-split
accuracy, and scores everything on the held-out splits (which the searches never see).

    python benchmarks/zoo_results.py [--budget 96] [--workers 2] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

TASKS = ("add", "cipher", "reverse", "cipher_add")


def run_search(config: dict, folder: Path, budget: int, workers: int) -> Path:
    from evomerge.config import RunConfig
    from evomerge.search.loop import drive
    from evomerge.search.run import create_run, open_run
    from evomerge.workers.pool import make_pool

    config = {**config, "budget": budget, "workers": workers}
    if (folder / "run.json").exists():
        run = open_run(folder)
    else:
        path = folder.parent / f"{folder.name}.yaml"
        folder.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run = create_run(RunConfig.load(path), folder)
    drive(run, make_pool(run.config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "zoo_runs")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()

    from evomerge.config import RunConfig
    from evomerge.recipe import Recipe
    from evomerge.results.pareto import pareto_records
    from evomerge.results.store import RunStore
    from evomerge.search.references import source_recipe
    from evomerge.workers.evaluator import Evaluator
    from evomerge.zoo.build import build

    paths = build(ROOT / "results" / "zoo", ROOT / "fitness" / "zoo")
    demo = yaml.safe_load((ROOT / "search_spaces" / "examples" / "tiny_zoo_run.yaml").read_text())
    demo["search_space"]["dataflow"]["models"] = ["merged", "add", "cipher"]
    demo["fitness"]["include_path"] = str(ROOT / "fitness" / "zoo")
    ps = {
        **demo,
        "name": "zoo_ps",
        "search_space": demo["search_space"]["parameter"] | {"kind": "parameter"},
    }
    ps_dfs = {**demo, "name": "zoo_ps_dfs"}

    refs = {name: str(p) for name, p in paths.items()}
    experts = [refs[k] for k in ("add", "cipher", "reverse")]

    def merge(method: str, **params) -> str:
        return Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": refs["base"],
                "models": [{"model": e, "parameters": {"weight": 1.0, **params}} for e in experts],
            }
        ).to_yaml()

    rows: list[tuple[str, str]] = [(name, source_recipe(ref)) for name, ref in refs.items()]
    rows += [
        ("task_arithmetic (weight 1)", merge("task_arithmetic")),
        ("ties (weight 1, density 1)", merge("ties")),
        ("dare_ties (weight 1, density 1)", merge("dare_ties")),
    ]

    def which(record) -> str:  # a seeded source model is named as such
        seeded = record.origin == "source"
        return f"#{record.index}" + (f", {record.worker}: seeded" if seeded else "")

    def mean(record) -> float:
        return sum(record.values.values()) / len(record.values)

    for label, config in (("PS search", ps), ("PS+DFS search", ps_dfs)):
        folder = run_search(config, args.runs / config["name"], args.budget, args.workers)
        records = RunStore.open(folder).records()
        objectives = RunConfig.load(folder / "run.yaml").objectives
        front = pareto_records(records, objectives)
        best = max(front, key=mean)
        rows.append((f"{label}: Pareto member of best mean ({which(best)})", best.recipe))
        searched = pareto_records([r for r in records if r.origin != "source"], objectives)
        merged = max(searched, key=mean)
        rows.append((f"{label}: best searched merge ({which(merged)})", merged.recipe))
        if label == "PS+DFS search":
            for task in TASKS:
                top = max(front, key=lambda r, t=task: r.values[t])
                rows.append((f"PS+DFS Pareto extreme: best {task} ({which(top)})", top.recipe))

    held = {
        "kind": "lm_eval",
        "include_path": str(ROOT / "fitness" / "zoo"),
        "batch_size": 32,
        "tasks": [f"zoo_{t}_heldout" for t in TASKS],
    }
    worker = Evaluator(list(refs.values()), held, device="cpu")
    table = []
    for label, recipe in rows:
        outcome = worker.evaluate(recipe)
        if outcome.error:
            raise SystemExit(f"{label}: {outcome.error}")
        scores = [outcome.metrics[f"zoo_{t}_heldout: acc,none"] for t in TASKS]
        table.append(
            {"model": label, **dict(zip(TASKS, scores)), "mean": sum(scores) / len(scores)}
        )
        print(table[-1], flush=True)
    lines = [
        f"Zoo, held-out accuracy (4-way multiple choice, chance 0.25), searches of "
        f"{args.budget} evaluations each, NSGA-II, seed 0",
        "",
        "| model | add | cipher | reverse | cipher_add (target) | mean |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | "
            + " | ".join(f"{r[t]:.3f}" for t in TASKS)
            + f" | {r['mean']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_results.md").write_text("\n".join(lines) + "\n")
    (args.out / "zoo_results.json").write_text(json.dumps(table, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
