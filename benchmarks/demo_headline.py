"""The demo's headline: on the real zoo (SmolLM2-135M-Instruct and its add / read experts), do
evolved merges beat their sources and the plain baseline merges on held-out data, and reach
the target (cy_add) that neither expert was trained on?

Runs the demo config's three searches, the same fitness, seed and budget rule each: PS only
(its TIES half), DFS only (a layer path over the experts) and PS+DFS (the config as
written). Each run scores the source models and the baselines on the fitness and the held-out
splits, and its Pareto set on the held-out splits. The table: per held-out task and their mean,
each source, each baseline, and each search's best merge (the Pareto member with the best
fitness; the held-out data is never searched on).

    python benchmarks/demo_headline.py [--runs results/demo] [--out results/bench]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

CONFIG = ROOT / "search_spaces" / "examples" / "demo_run.yaml"
# the earlier add and decode pair, on which the racing, data-aware and learned-merge
# comparisons were measured
DECODE_CONFIG = ROOT / "search_spaces" / "examples" / "decode_run.yaml"


def load_config(path: Path = CONFIG) -> dict:
    """A shipped run config, its task folder made absolute (the runs live elsewhere)."""
    config = yaml.safe_load(path.read_text())
    config["fitness"]["include_path"] = str(
        (path.parent / config["fitness"]["include_path"]).resolve()
    )
    return config


def target_key(split: str = "heldout") -> str:
    """The held-out metric the composition is judged on: the target's exact match (on the
    held-out split, or on `split`: "test", the larger one)."""
    from evomerge.zoo.real import TARGET

    return f"sm2_{TARGET}_gen_{split}: exact_match,none"


def variants(config: dict, budgets: dict[str, int]) -> dict[str, dict]:
    """The demo config's PS half, DFS half and itself."""
    space = config["search_space"]
    ps = {"kind": "parameter", **space["parameter"]}
    dataflow = {k: v for k, v in space["dataflow"].items() if k != "models"}
    experts = [m for m in space["dataflow"]["models"] if m != "merged"]
    if isinstance(
        dataflow.get("embed_from"), list
    ):  # searched: over every expert's, the first's first
        dataflow["embed_from"] = experts
    elif dataflow.get("embed_from") == "merged":
        del dataflow["embed_from"]
    dfs = {"kind": "dataflow", "models": experts, **dataflow}
    out = {}
    for kind, spec in (("ps", ps), ("dfs", dfs), ("ps_dfs", space)):
        variant = copy.deepcopy(config)
        variant.update(search_space=spec, budget=budgets[kind], name=f"demo_{kind}")
        out[kind] = variant
    return out


def budgets_of(
    config: dict, budget: int | None = None, ps: int | None = None, dfs: int | None = None
) -> dict[str, int]:
    """Evaluations per search: the config's budget for PS, half of it for DFS and for PS+DFS
    (whose PS half starts where the PS search's own start is)."""
    budget = budget or config["budget"]
    half = max(6, budget // 2)
    return {"ps": ps or budget, "dfs": dfs or half, "ps_dfs": dfs or half}


def run_search(config: dict, folder: Path, progress: bool) -> float:
    """Create or resume one search and drive it to its budget; its seconds over every call."""
    from evomerge.config import RunConfig
    from evomerge.search.loop import drive
    from evomerge.search.run import create_run, open_run
    from evomerge.workers.pool import make_pool

    start = time.perf_counter()
    spent = folder.parent / f"{folder.name}.seconds"
    if (folder / "run.json").exists():
        written = folder.parent / f"{folder.name}.yaml"  # the config the run was made from
        made = yaml.safe_load(written.read_text()) if written.exists() else config
        for key, mine, theirs in (
            ("search_space", config["search_space"], made["search_space"]),
            ("held_out", config["fitness"].get("held_out"), made["fitness"].get("held_out")),
        ):
            if mine != theirs:
                raise SystemExit(f"{folder} was made with another {key}: remove it, or pass "
                                 "another --runs folder")  # fmt: skip
        run = open_run(folder)
    else:
        path = folder.parent / f"{folder.name}.yaml"
        folder.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        spent.unlink(missing_ok=True)  # a removed run's seconds are not this one's
        run = create_run(RunConfig.load(path), folder)
    drive(run, make_pool(run.config), progress=progress)
    # seconds over every invocation: reopening a finished run must not report its reopening
    total = (float(spent.read_text()) if spent.exists() else 0.0) + time.perf_counter() - start
    partial = spent.with_name(f".{spent.name}.partial")  # a kill mid-write leaves the old total
    partial.write_text(f"{total:.1f}\n")
    os.replace(partial, spent)
    return total


def held_columns(held: dict) -> dict[str, float]:
    """'task: metric,filter' -> value, numbers only, and their mean."""
    values = {k: float(v) for k, v in (held or {}).items() if isinstance(v, (int, float))}
    if values:
        values["mean"] = sum(values.values()) / len(values)
    return values


def table(runs: dict[str, Path]) -> list[dict]:
    from evomerge.results.status import status_data

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
        label = {"ps": "best PS merge", "dfs": "best DFS merge", "ps_dfs": "best PS+DFS merge"}
        seeded = (
            f": the seeded {best['origin']} {best['seeded_from']}" if "seeded_from" in best else ""
        )
        rows.append(
            {"model": f"{label[kind]} (#{best['index']}{seeded})", "kind": "search",
             "fitness": best["values"]["mean"], **held_columns(best["held_out"])}
        )  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("model", "kind", "fitness", "mean")]
    short = [k.split(":")[0].removeprefix("sm2_").removesuffix("_heldout") for k in keys]
    metric = ["EM" if "exact_match" in k else "acc" for k in keys]
    head = [
        "model",
        "fitness mean",
        *(f"{s} ({m})" for s, m in zip(short, metric)),
        "held-out mean",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['fitness']:.3f}" if r["fitness"] is not None else "-"]
        cells += [f"{r.get(k, float('nan')):.3f}" for k in keys]
        cells.append(f"**{r['mean']:.3f}**" if r["kind"] == "search" else f"{r['mean']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict:
    refs = [r for r in rows if r["kind"] in ("source", "baseline")]
    searched = [r for r in rows if r["kind"] == "search"]
    best = max(searched, key=lambda r: r["mean"])
    from evomerge.zoo.real import TARGET

    targets = [k for k in best if k.startswith((f"sm2_{TARGET}_heldout", f"sm2_{TARGET}_gen_"))]

    def on_target(row: dict) -> float:
        return sum(row[k] for k in targets) / len(targets)

    sources = [r for r in refs if r["kind"] == "source"]
    return {
        "best": best["model"],
        "beats_every_source_and_baseline_on_mean": all(best["mean"] > r["mean"] for r in refs),
        "best_reference_mean": max(r["mean"] for r in refs),
        "target_columns": targets,
        "beats_every_source_on_target": all(
            max(on_target(s) for s in searched) > on_target(r) for r in sources
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--budget", type=int, default=None, help="default: the config's")
    parser.add_argument("--ps-budget", type=int, default=None, help="default: --budget")
    parser.add_argument(
        "--dfs-budget", type=int, default=None, help="DFS and PS+DFS; default: half the config's"
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--table-only", action="store_true", help="tabulate the finished runs, run nothing"
    )
    args = parser.parse_args()

    config = load_config()
    budgets = budgets_of(config, args.budget, args.ps_budget, args.dfs_budget)
    runs, seconds = {}, {}
    if args.table_only:
        previous = json.loads((args.out / "demo_headline.json").read_text())
        budgets, seconds = previous["budgets"], previous["seconds"]
        runs = {kind: args.runs / kind for kind in budgets}
    for kind, variant in variants(config, budgets).items():
        if args.table_only:
            break
        if runs:  # the sources and baselines are scored once, by the first run
            variant["references_from"] = str(next(iter(runs.values())).resolve())
        runs[kind] = args.runs / kind
        seconds[kind] = round(run_search(variant, runs[kind], not args.quiet), 1)
        print(f"{kind}: {budgets[kind]} evaluations in {seconds[kind]} s", flush=True)
    rows = table(runs)
    text = markdown(rows)
    result = {
        "budgets": budgets,
        "seconds": seconds,
        "target": target_key(),
        "rows": rows,
        "verdict": verdict(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_headline.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.runs / "headline.md").write_text(text + "\n")
    print(text)
    print(json.dumps(result["verdict"], indent=1))


if __name__ == "__main__":
    main()
