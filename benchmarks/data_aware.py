"""Data-aware and balancing merges on the real zoo (SmolLM2-135M-Instruct and its add / decode
experts): the held-out mean of each method untuned (one merge at its paper's defaults) and
searched (CMA-ES over its genes, decode_run.yaml's fitness, racing and budget rule), against an
evolved task-arithmetic / TIES merge.

Calibration text is the fitness splits' own documents (prompt and answer of the three tasks;
the held-out splits are other documents, and the run refuses calibration that holds one).
Fisher and RegMean read per-source statistics computed once; RegMean++ measures each merge's
own activations, layer by layer.

    python benchmarks/data_aware.py [--runs results/data_aware] [--budget 12] [--out results/bench]
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

from benchmarks.demo_headline import (  # noqa: E402
    DECODE_CONFIG,
    held_columns,
    load_config,
    run_search,
)

EXPERTS = ["add", "decode"]


def gene(low: float, high: float, init: float) -> dict:
    return {"low": low, "high": high, "init": init}


WEIGHT = gene(0.0, 1.5, 0.8)
# method -> (the untuned merge's parameters, the searched space's genes)
ARMS: dict[str, tuple[dict, dict]] = {
    "task_arithmetic": ({"weight": 0.5}, {"weight": WEIGHT}),
    "ties": ({"weight": 0.5, "density": 0.5}, {"weight": WEIGHT, "density": gene(0.1, 1, 0.5)}),
    "fisher": ({"weight": 1.0}, {"weight": gene(0.05, 1, 0.5)}),
    "regmean": ({"weight": 1.0}, {"weight": gene(0.05, 1, 0.5), "alpha": gene(0.05, 1, 0.9)}),
    "regmean_plus": ({"weight": 1.0}, {}),  # measured untuned only: each merge runs the model
    "pcb": (
        {"pcb_ratio": 0.1, "lambda": 1.0},
        {"pcb_ratio": gene(0.05, 1, 0.1), "lambda": gene(0.2, 1.5, 1.0)},
    ),
    "lines": (
        {"weight": 1.0, "lines": {"alpha": 0.5, "beta": 0.5}},
        {"weight": WEIGHT, "lines.alpha": gene(0, 1, 0.5), "lines.beta": gene(0, 1, 0.5)},
    ),
}
SHARED = {"density": False, "pcb_ratio": True, "lambda": True, "alpha": True, "epsilon": True}


def write_calibration(folder: Path) -> Path:
    """Prompt + answer of every fitness-split document of the generative tasks."""
    texts = []
    for task in ("add", "decode", "dec_add"):
        path = ROOT / "fitness" / "smollm2" / f"sm2_{task}_gen_fit.jsonl"
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            texts.append({"text": doc["prompt"] + doc["target"]})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "calibration.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in texts[::3] + texts[1::3]))
    return path


def untuned_recipe(method: str, settings: dict, statistics: Path) -> dict:
    settings = dict(settings)
    lines = settings.pop("lines", None)
    real = "task_arithmetic" if method == "lines" else method
    shared = {k: v for k, v in settings.items() if k in SHARED}
    per_model = {k: v for k, v in settings.items() if k not in SHARED}
    recipe: dict = {
        "merge_method": real,
        "models": [{"model": m, "parameters": per_model} for m in EXPERTS],
    }
    if shared:
        recipe["parameters"] = shared
    if real in ("task_arithmetic", "ties", "pcb"):
        recipe["base_model"] = "base"
    if lines:
        recipe["lines"] = lines
    if real in ("fisher", "regmean", "regmean_plus"):
        recipe["statistics"] = str(statistics)
    return recipe


def prepare_statistics(config: dict, calibration: Path, folder: Path) -> None:
    """Each expert's Fisher and Gram statistics, and RegMean++'s text, computed once."""
    import torch

    from evomerge.merge.statistics import compute_for_source, read_calibration, save_texts

    texts = read_calibration(calibration, config["calibration"]["limit"])
    for name in EXPERTS:
        ref = config["models"][name]
        compute_for_source(ref, texts, folder, torch.device("cpu"))
    save_texts(folder, texts)


def first_failures(folder: Path, statistics: Path) -> list[dict]:
    """The untuned merges the first run recorded as failed, to score again."""
    from evomerge.results.store import RunStore

    failed = [n for n, s in RunStore.open(folder).baselines().items() if s.failed]
    return [
        {
            "name": n,
            "recipe": untuned_recipe(
                n.removeprefix("untuned "), ARMS[n.removeprefix("untuned ")][0], statistics
            ),
        }
        for n in failed
    ]


def row(model: str, kind: str, scored: dict) -> dict:
    fitness = (scored.get("values") or {}).get("mean")
    return {"model": model, "kind": kind, "fitness": fitness, **held_columns(scored["held_out"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "data_aware")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    from evomerge.results.status import status_data
    from evomerge.results.store import RunStore

    base = load_config(DECODE_CONFIG)
    base["models"] = {k: str(Path(v).resolve()) for k, v in base["models"].items()}
    calibration = write_calibration(args.runs)
    base["calibration"] = {"file": str(calibration), "limit": 32}
    statistics = (args.runs / "statistics").resolve()
    start = time.perf_counter()
    prepare_statistics(base, calibration, statistics)
    seconds = {"statistics": round(time.perf_counter() - start, 1)}

    runs: dict[str, Path] = {}
    for method, (_, genes) in ARMS.items():
        config = copy.deepcopy(base)
        config.update(name=f"data_aware_{method}", budget=args.budget)
        config["optimizer"] = {"name": "cma", "options": {"population_size": 4}}
        real = "task_arithmetic" if method == "lines" else method
        if not genes:
            continue
        space = {"kind": "parameter", "method": real, "parameters": genes}
        if real in ("fisher", "regmean"):
            space["models"] = EXPERTS
        config["search_space"] = space
        if not runs:  # the first run scores the sources and every untuned merge
            config["baselines"] = [
                {"name": f"untuned {m}", "recipe": untuned_recipe(m, u, statistics)}
                for m, (u, _) in ARMS.items()
            ]
        else:  # RegMean++ untuned again here when the first run could not score it
            config["baselines"] = [
                b for b in first_failures(runs["task_arithmetic"], statistics) if method == "fisher"
            ]
            config["references_from"] = str(runs["task_arithmetic"].resolve())
        runs[method] = args.runs / method
        t0 = time.perf_counter()
        run_search(config, runs[method], not args.quiet)
        seconds[method] = round(time.perf_counter() - t0, 1)
        print(f"{method}: {seconds[method]} s", flush=True)

    first = status_data(runs["task_arithmetic"])
    rows = [row(f"source {n}", "source", s) for n, s in first["sources"].items()]
    untuned = {n: s for n, s in first["baselines"].items() if s.get("values")}
    if "fisher" in runs:
        later = status_data(runs["fisher"])["baselines"].items()
        untuned.update({n: s for n, s in later if s.get("values")})
    rows += [row(n, "untuned", s) for n, s in untuned.items()]
    for method, folder in runs.items():  # evaluation seconds from the store (resumes add none)
        seconds[f"{method} evaluations"] = round(
            sum(r.seconds for r in RunStore.open(folder).records()), 1
        )
        best = max(status_data(folder)["pareto"], key=lambda p: p["values"]["mean"])
        budget = yaml.safe_load((args.runs / f"{method}.yaml").read_text())["budget"]
        name = f"searched {method} (#{best['index']} of {budget})"
        rows.append(row(name, "searched", best) | {"budget": budget})
    lines = [
        "| model | fitness mean | held-out mean |",
        "|---|---|---|",
        *(f"| {r['model']} | {r['fitness']:.3f} | {r['mean']:.3f} |" for r in rows),
    ]
    result = {"seconds": seconds, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_aware.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "data_aware.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
