"""The demo's headline: on the real zoo (SmolLM2-135M-Instruct, its add expert and its read
expert), does a searched merge do what no source and no untuned merge can: math posed in the
language only the read expert knows (cy_add)?

Runs the demo config's three searches, the same fitness and seed each: the layer swap (the
config as written), a per-block task-arithmetic PS search (a weight per expert per block of
layers, sharp at the block boundaries) and a DFS search that starts from the best source's own
layers and moves locally. The first run scores the source models and the baselines on the
fitness and the held-out splits; the others borrow those scores. The table: per held-out task
and their mean, each source, each baseline, and each search's best merge (the Pareto member
with the best fitness; the held-out data is never searched on).

    python benchmarks/demo_headline.py [--runs results/demo] [--out results/bench] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

CONFIG = ROOT / "search_spaces" / "examples" / "demo_run.yaml"
TEST_DOCUMENTS = 288  # RealZooSettings.test_examples
TARGET_KEY = "sm2_cy_add_gen_test: exact_match,none"
DFS_FIRST: list[str] = []  # the expert whose own layers the DFS search starts from


LABELS = {"swap": "best layer swap", "blocks": "best per-block PS merge", "dfs": "best DFS merge"}


def variants(config: dict, budgets: dict[str, int], dfs_first: str) -> dict[str, dict]:
    """The demo config (the layer swap), its per-block PS counterpart over the same experts,
    and a DFS search whose path starts as `dfs_first`'s own layers."""
    experts = config["search_space"]["models"]
    blocks = {
        "kind": "parameter",
        "method": "task_arithmetic",
        "models": experts,
        "parameters": {"weight": {"low": 0.0, "high": 1.5, "init": 1.0}},
        "layer_groups": 3,
        "layer_shape": "blocks",
    }
    dfs = {
        "kind": "dataflow",
        "models": [dfs_first, *(m for m in experts if m != dfs_first)],
        "layout": "interleaved",
        "repetitions": 1,
        "scaling": "per_layer",
        "scale_bounds": [0.8, 1.25],
        "sigma": 0.1,
    }
    out = {}
    for kind, spec in (("swap", config["search_space"]), ("blocks", blocks), ("dfs", dfs)):
        variant = copy.deepcopy(config)
        variant.update(search_space=spec, budget=budgets[kind], name=f"demo_{kind}")
        out[kind] = variant
    return out


def run_search(config: dict, folder: Path, progress: bool) -> float:
    from evomerge.config import RunConfig
    from evomerge.pool import make_pool
    from evomerge.run import create_run, drive, open_run

    start = time.perf_counter()
    if (folder / "run.json").exists():
        run = open_run(folder)
    else:
        path = folder.parent / f"{folder.name}.yaml"
        folder.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run = create_run(RunConfig.load(path), folder)
    drive(run, make_pool(run.config), progress=progress)
    return time.perf_counter() - start


def held_columns(held: dict) -> dict[str, float]:
    """'task: metric,filter' -> value, numbers only, their mean, and the mean's standard error
    (binomial, over the test split's documents)."""
    values = {k: float(v) for k, v in (held or {}).items() if isinstance(v, (int, float))}
    if values:
        n = len(values)
        values["mean"] = sum(values.values()) / n
        variance = sum(v * (1 - v) for k, v in values.items() if k != "mean") / TEST_DOCUMENTS
        values["se"] = variance**0.5 / n
    return values


def table(runs: dict[str, Path]) -> list[dict]:
    from evomerge.status import status_data

    rows: list[dict] = []
    first = status_data(next(iter(runs.values())))
    for kind in ("sources", "baselines"):
        for name, scored in first[kind].items():
            rows.append(
                {"model": name, "kind": kind[:-1], "fitness": (scored["values"] or {}).get("mean"),
                 **held_columns(scored["held_out"])}
            )  # fmt: skip
    for kind, folder in runs.items():
        data = status_data(folder)
        best = max(data["pareto"], key=lambda p: p["values"]["mean"])
        seeded = (
            f": the seeded {best['origin']} {best['seeded_from']}" if "seeded_from" in best else ""
        )
        rows.append(
            {"model": f"{LABELS[kind]} (#{best['index']}{seeded})", "kind": "search",
             "search": kind, "fitness": best["values"]["mean"], **held_columns(best["held_out"])}
        )  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("model", "kind", "search", "fitness", "mean", "se")]
    short = [k.split(":")[0].removeprefix("sm2_").removesuffix("_test") for k in keys]
    head = ["model", "fitness", *(s.replace("_gen", " EM") for s in short), "held-out mean ± SE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['fitness']:.3f}" if r["fitness"] is not None else "-"]
        cells += [f"{r.get(k, float('nan')):.3f}" for k in keys]
        mean = f"{r['mean']:.3f} ± {r['se']:.3f}"
        cells.append(f"**{mean}**" if r["kind"] == "search" else mean)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict:
    """The issue's targets, read off one run's table."""
    refs = [r for r in rows if r["kind"] in ("source", "baseline")]
    sources = [r for r in refs if r["kind"] == "source"]
    baselines = [r for r in refs if r["kind"] == "baseline"]
    searched = [r for r in rows if r["kind"] == "search"]
    best = max(searched, key=lambda r: r["fitness"])  # chosen by fitness, never by held-out
    best_source = max(r[TARGET_KEY] for r in sources)
    best_baseline = max(r[TARGET_KEY] for r in baselines)
    margins = [(best["mean"] - r["mean"]) / (best["se"] ** 2 + r["se"] ** 2) ** 0.5 for r in refs]
    return {
        "best": best["model"],
        "target": TARGET_KEY,
        "best_target": best[TARGET_KEY],
        "best_source_target": best_source,
        "best_untuned_target": best_baseline,
        "target_at_least_twice_best_source": best[TARGET_KEY] >= 2 * best_source
        and best[TARGET_KEY] > 0,
        "target_at_least_0.15_above_best_untuned": best[TARGET_KEY] >= best_baseline + 0.15,
        "best_reference_mean": max(r["mean"] for r in refs),
        "smallest_mean_margin_in_standard_errors": round(min(margins), 2),
        "dfs_above_its_seed": dfs_above_seed(rows),
    }


def dfs_above_seed(rows: list[dict]) -> Optional[bool]:
    """Whether the DFS search's best merge has a better fitness than the source it started
    from (its own layers in order)."""
    dfs = [r for r in rows if r.get("search") == "dfs"]
    if not dfs:
        return None
    start = next(r for r in rows if r["kind"] == "source" and r["model"] == DFS_FIRST[0])
    return dfs[0]["fitness"] > start["fitness"]


def best_expert(folder: Path, experts: list[str]) -> str:
    """The expert with the best fitness, as the run scored it."""
    from evomerge.status import status_data

    sources = status_data(folder)["sources"]
    return max(experts, key=lambda name: (sources[name]["values"] or {}).get("mean", -1.0))


def run_all(
    config: dict, runs_dir: Path, budgets: dict[str, int], progress: bool, references=None
) -> tuple[dict[str, Path], dict[str, float]]:
    """The three searches in order; the first scores the sources and baselines (unless
    `references` names a run that already did), the others borrow its scores."""
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    experts = config["search_space"]["models"]
    for kind in ("swap", "blocks", "dfs"):
        lender = references or (runs_dir / "swap" if runs else None)
        if kind == "dfs":
            DFS_FIRST[:] = [best_expert(lender or runs_dir / "swap", experts)]
        variant = variants(config, budgets, DFS_FIRST[0] if DFS_FIRST else experts[0])[kind]
        if lender is not None:
            variant["references_from"] = str(Path(lender).resolve())
        runs[kind] = runs_dir / kind
        seconds[kind] = round(run_search(variant, runs[kind], progress), 1)
        print(f"{kind}: {budgets[kind]} evaluations in {seconds[kind]} s", flush=True)
    return runs, seconds


def load_config(seed: Optional[int] = None) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    config["fitness"]["include_path"] = str(
        (CONFIG.parent / config["fitness"]["include_path"]).resolve()
    )
    if seed is not None:
        config["seed"] = seed
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's")
    parser.add_argument("--budget", type=int, default=None, help="default: the config's")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--table-only", action="store_true", help="tabulate the finished runs, run nothing"
    )
    args = parser.parse_args()

    config = load_config(args.seed)
    budget = args.budget or config["budget"]
    budgets = {"swap": budget, "blocks": budget, "dfs": budget}
    if args.table_only:
        previous = json.loads((args.out / "demo_headline.json").read_text())
        budgets, seconds = previous["budgets"], previous["seconds"]
        runs = {kind: args.runs / kind for kind in budgets}
        DFS_FIRST[:] = [previous["dfs_first"]]
    else:
        runs, seconds = run_all(config, args.runs, budgets, not args.quiet)
    rows = table(runs)
    result = {
        "budgets": budgets,
        "seconds": seconds,
        "dfs_first": DFS_FIRST[0],
        "target": TARGET_KEY,
        "rows": rows,
        "verdict": verdict(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_headline.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(rows)
    (args.runs / "headline.md").write_text(text + "\n")
    print(text)
    print(json.dumps(result["verdict"], indent=1))


if __name__ == "__main__":
    main()
