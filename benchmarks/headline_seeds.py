"""The demo's headline across seeds: its three searches (layer swap, per-block PS, DFS from the
best source) at each seed, and per arm the held-out mean and the target's exact match as mean
and standard error across seeds. The sources and untuned merges are scored once (the first
seed's run) and lent to the rest: their scores do not depend on the search's seed.

    python benchmarks/headline_seeds.py [--seeds 3] [--runs results/demo_seeds]

Runs are resumable: run it again after an interruption. Raw JSON:
results/bench/headline_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import demo_headline as demo  # noqa: E402


def spread(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return {"mean": round(mean, 4), "se": round(se, 4), "n": len(values)}


def summarize(per_seed: dict[int, list[dict]]) -> dict:
    first = next(iter(per_seed.values()))
    references = {r["model"]: r for r in first if r["kind"] != "search"}
    arms: dict[str, dict] = {}
    above = 0
    for rows in per_seed.values():
        for r in rows:
            if r["kind"] == "search":
                arms.setdefault(r["search"], {"mean": [], "target": [], "fitness": []})
                arms[r["search"]]["mean"].append(r["mean"])
                arms[r["search"]]["target"].append(r[demo.TARGET_KEY])
                arms[r["search"]]["fitness"].append(r["fitness"])
        above += bool(demo.dfs_above_seed(rows))
    summary = {
        "references": {
            name: {key: r[key] for key in ("kind", "mean", "se")} | {"target": r[demo.TARGET_KEY]}
            for name, r in references.items()
        },
        "arms": {
            arm: {key: spread(values) for key, values in data.items()} for arm, data in arms.items()
        },
        "dfs_above_its_seed": f"{above} of {len(per_seed)}",
    }
    best_arm = max(summary["arms"], key=lambda a: summary["arms"][a]["mean"]["mean"])
    best = summary["arms"][best_arm]
    sources = [r for r in references.values() if r["kind"] == "source"]
    baselines = [r for r in references.values() if r["kind"] == "baseline"]
    best_source = max(r[demo.TARGET_KEY] for r in sources)
    best_untuned = max(r[demo.TARGET_KEY] for r in baselines)
    margins = {
        name: round(
            (best["mean"]["mean"] - r["mean"]) / (best["mean"]["se"] ** 2 + r["se"] ** 2) ** 0.5, 2
        )
        for name, r in references.items()
    }
    summary["targets"] = {
        "best_arm": best_arm,
        "target_vs_best_source": [best["target"]["mean"], best_source],
        "target_at_least_twice_best_source": best["target"]["mean"] >= 2 * best_source
        and best["target"]["mean"] > 0,
        "target_vs_best_untuned": [best["target"]["mean"], best_untuned],
        "target_at_least_0.15_above_best_untuned": best["target"]["mean"] >= best_untuned + 0.15,
        "mean_margin_in_standard_errors": margins,
        "beats_every_reference_by_3_se": min(margins.values()) >= 3,
    }
    return summary


def markdown(summary: dict) -> str:
    lines = [
        "| model | held-out mean | cy_add EM (target) |",
        "|---|---|---|",
    ]
    for name, r in summary["references"].items():
        mean = f"{r['mean']:.3f} ± {r['se']:.3f}"
        lines.append(f"| {name} ({r['kind']}) | {mean} | {r['target']:.3f} |")
    for arm, data in summary["arms"].items():
        m, t = data["mean"], data["target"]
        lines.append(
            f"| {demo.LABELS[arm]} ({m['n']} seeds) | **{m['mean']:.3f} ± {m['se']:.3f}** | "
            f"**{t['mean']:.3f} ± {t['se']:.3f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "demo_seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--budget", type=int, default=None, help="default: the demo config's")
    parser.add_argument(
        "--first", type=Path, default=None, help="an existing demo runs folder to use as seed 0"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    per_seed: dict[int, list[dict]] = {}
    seconds: dict[int, dict] = {}
    lender = None
    for seed in range(args.seeds):
        config = demo.load_config(seed)
        budget = args.budget or config["budget"]
        budgets = {"swap": budget, "blocks": budget, "dfs": budget}
        folder = args.first if (seed == 0 and args.first) else args.runs / f"seed_{seed}"
        runs, seconds[seed] = demo.run_all(config, folder, budgets, not args.quiet, lender)
        lender = lender or runs["swap"]
        per_seed[seed] = demo.table(runs)
        print(f"seed {seed}: {json.dumps(demo.verdict(per_seed[seed]))}", flush=True)
    summary = summarize(per_seed)
    result = {"seconds": seconds, "summary": summary, "rows": per_seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headline_seeds.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(summary))
    print(json.dumps(summary["targets"], indent=1))


if __name__ == "__main__":
    main()
