"""Multi-fidelity racing on the real zoo: how much scoring compute does it take to reach the
full-fidelity search's final front?

Three arms, the same CMA-ES and search space (decode_run.yaml's PS half: task arithmetic over
the add and decode experts of SmolLM2-135M-Instruct) and the same fitness (six tasks, 48
documents each), three seeds each:
- full: every candidate scored on every document;
- racing: stages of 8, 16 and all 48 documents per task, the best half of the latest 6 at a
  stage promoted, early stops told their corrected stage mean;
- racing_irt: the same, early stops told the item-response estimate of their full score.
The racing arms get twice the candidates; compute is the scoring seconds the workers spent
(merges included). For each racing run: the compute at which its best full-fidelity fitness
first reaches the full run's final best (same seed), as a fraction of the full run's compute;
and the best merge's held-out mean. The estimator check: on the full arm's candidates (every
document known), how well the first stage's 8 documents per task rank candidates by their full
score, as a plain mean and as the cross-fitted item-response estimate (Spearman).

    python benchmarks/racing.py [--runs results/racing] [--out results/bench]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from benchmarks.demo_headline import DECODE_CONFIG, load_config, run_search  # noqa: E402

STAGES = [8, 16, "full"]
ARMS = {
    "full": None,
    "racing": {"stages": STAGES, "promote": 0.5, "window": 6, "estimator": "mean"},
    "racing_irt": {"stages": STAGES, "promote": 0.5, "window": 6, "estimator": "irt"},
}


def arm_config(arm: str, seed: int, budget: int, references: Path | None) -> dict:
    config = load_config(DECODE_CONFIG)
    space = config["search_space"]
    config["search_space"] = {"kind": "parameter", **space["parameter"]}
    config.update(name=f"racing_{arm}_{seed}", seed=seed, budget=budget)
    config["fitness"].pop("fidelity", None)  # the demo's own racing settings are not an arm
    if ARMS[arm] is not None:
        config["fitness"]["fidelity"] = copy.deepcopy(ARMS[arm])
        config["budget"] = 2 * budget
    if references is not None:
        config["references_from"] = str(references.resolve())
    return config


def curve(folder: Path) -> list[tuple[float, float]]:
    """(scoring seconds so far, best full-fidelity fitness so far), in commit order."""
    from evomerge.results.store import RunStore

    points, spent, best = [], 0.0, -np.inf
    for r in RunStore.open(folder).records():
        spent += r.seconds
        if r.values is not None and r.final:
            best = max(best, r.values["mean"])
        points.append((spent, best))
    return points


def best_held_out(folder: Path) -> tuple[float, float]:
    from evomerge.results.status import status_data

    data = status_data(folder)
    best = max(data["pareto"], key=lambda p: p["values"]["mean"])
    held = [v for v in (best["held_out"] or {}).values() if isinstance(v, (int, float))]
    return best["values"]["mean"], float(np.mean(held)) if held else float("nan")


def reach_fraction(racing: list, full: list) -> float:
    """Compute at which `racing` first reaches `full`'s final best, over `full`'s compute."""
    target, total = full[-1][1], full[-1][0]
    for spent, best in racing:
        if best >= target - 1e-9:
            return spent / total
    return float("inf")


def rank_check(folders: list[Path]) -> dict:
    """Spearman of first-stage scores against full scores, plain mean vs item-response
    estimate (items fit on the other folds' full rows and this fold's first-stage rows)."""
    import pandas as pd

    from evomerge.config import Fidelity, RunConfig
    from evomerge.results.store import RunStore
    from evomerge.search import irt
    from evomerge.search.prepare import task_documents
    from evomerge.search.racing import DocumentPlan, aggregate

    rows = []
    for folder in folders:
        config = RunConfig.load(folder / "run.yaml")
        plan = DocumentPlan(Fidelity(stages=STAGES), task_documents(config.fitness), config.seed)
        objective = config.objectives[0]
        for r in RunStore.open(folder).records():
            if r.per_document and r.values is not None:
                rows.append((plan, objective, r))
    if len(rows) < 10:
        return {}
    folds = np.arange(len(rows)) % 5
    plain, estimated, truth = [], [], []
    for i, (plan, objective, r) in enumerate(rows):
        first = plan.stage_docs(0)
        plain.append(objective.value(aggregate(r.per_document, first)))
        truth.append(r.values[objective.name])
        metrics = aggregate(r.per_document, first)
        for task, order in plan.order.items():
            keys = list(next(iter(r.per_document[task].values())))
            for key in keys:
                matrix = []
                for j, (_, _, other) in enumerate(rows):
                    docs = other.per_document[task]
                    row = [docs.get(str(d), {}).get(key, np.nan) for d in order]
                    if folds[j] == folds[i]:
                        row = [v if d in first[task] else np.nan for v, d in zip(row, order)]
                    matrix.append(row)
                matrix = np.array(matrix, dtype=float)
                if irt.is_binary(matrix):
                    items = irt.fit_items(matrix)
                    metrics[f"{task}: {key}"] = irt.estimate_mean(matrix[i], items)
        estimated.append(objective.value(metrics))
    frame = pd.DataFrame({"plain": plain, "irt": estimated, "full": truth})
    return {
        "candidates": len(rows),
        "spearman_plain": round(float(frame["plain"].corr(frame["full"], "spearman")), 3),
        "spearman_irt": round(float(frame["irt"].corr(frame["full"], "spearman")), 3),
        "mae_plain": round(float((frame["plain"] - frame["full"]).abs().mean()), 4),
        "mae_irt": round(float((frame["irt"] - frame["full"]).abs().mean()), 4),
    }


def plot(curves: dict[str, dict[int, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "racing": "tab:blue", "racing_irt": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, by_seed in curves.items():
        for n, (seed, points) in enumerate(sorted(by_seed.items())):
            xs = [p[0] for p in points if np.isfinite(p[1])]
            ys = [p[1] for p in points if np.isfinite(p[1])]
            ax.step(
                xs,
                ys,
                where="post",
                color=colors[arm],
                alpha=0.8,
                label=arm if n == 0 else None,
                linestyle=["-", "--", ":"][seed % 3],
            )
    ax.set_xlabel("scoring compute (worker seconds)")
    ax.set_ylabel("best full-fidelity fitness (mean of 6 metrics)")
    ax.set_title("Racing vs full fidelity, real zoo, CMA-ES, 3 seeds (line style)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "racing")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--budget", type=int, default=18, help="full arm's evaluations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--references",
        type=Path,
        default=ROOT / "results" / "demo" / "ps",
        help="a run whose source and baseline scores to reuse",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    references = args.references if (args.references / "run.json").exists() else None
    curves: dict[str, dict[int, list]] = {arm: {} for arm in ARMS}
    runs: list[dict] = []
    for seed in range(args.seeds):
        for arm in ARMS:
            folder = args.runs / f"{arm}_{seed}"
            config = arm_config(arm, seed, args.budget, references)
            wall = run_search(config, folder, not args.quiet)
            references = references or folder
            curves[arm][seed] = curve(folder)
            fitness, held = best_held_out(folder)
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "wall_s": round(wall, 1),
                    "evaluations": len(curves[arm][seed]),
                    "compute_s": round(curves[arm][seed][-1][0], 1),
                    "best_fitness": round(fitness, 4),
                    "best_held_out": round(held, 4),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    for row in runs:
        if row["arm"] != "full":
            frac = reach_fraction(curves[row["arm"]][row["seed"]], curves["full"][row["seed"]])
            row["reach_full_front_at"] = round(frac, 3) if np.isfinite(frac) else None
    estimator = rank_check([args.runs / f"full_{seed}" for seed in range(args.seeds)])
    summary = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {
            "compute_s": round(float(np.mean([r["compute_s"] for r in mine])), 1),
            "best_fitness": round(float(np.mean([r["best_fitness"] for r in mine])), 4),
            "best_held_out": round(float(np.mean([r["best_held_out"] for r in mine])), 4),
        }
        if arm != "full":
            reached = [r["reach_full_front_at"] for r in mine]
            summary[arm]["reached"] = sum(x is not None for x in reached)
            summary[arm]["reach_median"] = float(
                np.median([x if x is not None else np.inf for x in reached])
            )
    result = {
        "stages": STAGES,
        "budget": args.budget,
        "runs": runs,
        "summary": summary,
        "estimator": estimator,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "racing.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(curves, ROOT / "docs" / "assets" / "racing.png")  # the figure the docs show
    print(json.dumps({"summary": summary, "estimator": estimator}, indent=1))


if __name__ == "__main__":
    main()
