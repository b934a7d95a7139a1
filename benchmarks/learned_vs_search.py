"""The seed paper's question on the real zoo (SmolLM2-135M-Instruct and its add / decode
experts): is an evolutionary search worth its compute against untuned merges and a trained one?

Every arm is measured in this one script, on the add and decode pair's fitness
(search_spaces/examples/decode_run.yaml, racing included) and held-out splits:
- the sources; untuned merges (average, task arithmetic, TIES, DARE-TIES) and data-aware ones
  (Fisher, RegMean) at their defaults;
- DAM (each expert distilled on its own fitness-split texts) and AdaMerging (entropy on the
  fitness prompts), each at two training budgets;
- CMA-ES over task-arithmetic weights at two budgets (a run to the small budget, then resumed
  to the large one: the same trajectory a large run takes);
- the hybrid: CMA-ES over per-source, per-layer-group scales of the learned DAM merge (at the
  large budget), seeded by the learned merge itself.
Three seeds for every trained or searched arm (the seed orders the training texts and seeds
the search); the untuned merges are deterministic and scored once.

Compute: seconds on this machine (training, and each evaluation as the run store records it),
and for the learned arms the tokens through the model forward and backward.

    python benchmarks/learned_vs_search.py [--runs results/learned] [--seeds 3] [--steps 6,20]
        [--extend]

`--extend` keeps the seeds the earlier JSON already holds and runs only the (seed, run) pairs
it lacks; the JSON's `measured` says when, at which commit and on which CPU each pair ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from benchmarks.data_aware import (  # noqa: E402
    ARMS,
    prepare_statistics,
    untuned_recipe,
    write_calibration,
)
from benchmarks.demo_headline import (  # noqa: E402
    DECODE_CONFIG,
    held_columns,
    load_config,
    run_search,
)

EXPERTS = ["add", "decode"]
UNTUNED = ["task_arithmetic", "ties", "fisher", "regmean"]  # besides the presets
FULL_EVALUATION = 6 * 48  # documents of one full-fidelity evaluation: six tasks of 48
LR = 1e-3  # the paper's rate, for DAM and AdaMerging alike


def write_expert_texts(folder: Path) -> dict[str, str]:
    """Each expert's own data: its fitness-split documents, prompt and answer, as the chat
    template gives them (how the experts were trained)."""
    from transformers import AutoTokenizer

    from evomerge.zoo.real import chat_text

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "results" / "zoo" / "smollm2" / "base")
    files = {}
    for name in EXPERTS:
        source = ROOT / "fitness" / "smollm2" / f"sm2_{name}_gen_fit.jsonl"
        docs = [json.loads(line) for line in source.read_text().splitlines()]
        path = folder / f"{name}_texts.jsonl"
        lines = [
            json.dumps({"text": chat_text(tokenizer, d["prompt"]) + d["target"]}) for d in docs
        ]
        path.write_text("".join(line + "\n" for line in lines))
        files[name] = str(path.resolve())
    return files


def ps_space() -> dict:
    return {
        "kind": "parameter",
        "method": "task_arithmetic",
        "parameters": {"weight": {"low": 0.0, "high": 1.5, "init": 0.8}},
    }


def hybrid_space() -> dict:
    return {
        "kind": "parameter",
        "method": "dam",
        "parameters": {"scale": {"low": 0.6, "high": 1.4, "init": 1.0}},
        "layer_groups": 2,
    }


def run_to(config: dict, folder: Path, budget: int, progress: bool) -> None:
    """Run (or resume) `folder` until `budget` evaluations: a larger budget continues the
    same search."""
    stored = folder / "run.yaml"
    if stored.exists():
        data = yaml.safe_load(stored.read_text())
        if data["budget"] != budget:
            data["budget"] = budget
            stored.write_text(yaml.safe_dump(data, sort_keys=False))
    run_search({**config, "budget": budget}, folder, progress)


def documents(record, config: dict) -> int:
    """Fitness documents a search paid to score this evaluation: each racing stage it reached,
    times the tasks (a seed whose score was reused from the sources or baselines paid none)."""
    if record.origin in ("source", "baseline") and not record.stages:
        return 0
    fitness = config["fitness"]
    full = 48  # documents per fitness task of the real zoo
    stages = [full if s == "full" else s for s in fitness["fidelity"]["stages"]]
    reached = len(record.stages) if record.stages else len(stages)
    return sum(stages[:reached]) * len(fitness["tasks"])


def finished(folder: Path, budget: int) -> bool:
    """The run holds `budget` evaluations and its best one's held-out scores."""
    from evomerge.results.store import RunStore

    if not (folder / "run.json").exists():
        return False
    records = RunStore.open(folder).records()
    scored = [r for r in records if r.values]
    if len(records) < budget or not scored:
        return False
    return max(scored, key=lambda r: r.values["mean"]).held_out is not None


def best_of(folder: Path, upto: int, config: dict) -> dict:
    """The best-fitness evaluation among the first `upto`, its held-out scores, and what the
    search spent to get there."""
    from evomerge.results.store import RunStore

    every = [r for r in RunStore.open(folder).records() if r.number < upto]
    best = max((r for r in every if r.values), key=lambda r: r.values["mean"])
    return {
        "index": best.number,
        "fitness": best.values["mean"],
        "held_out": held_columns(best.held_out or {}),
        "evaluation_seconds": round(sum(r.seconds for r in every), 1),
        "documents": sum(documents(r, config) for r in every),
    }


def learned_cost(folder: Path, method: str) -> dict:
    from evomerge.merge.learned import Coefficients

    trained = Coefficients(folder / "learned" / method / "coefficients.safetensors").trained
    keys = ("steps", "seconds", "tokens_forward", "tokens_backward", "loss_first", "loss_last")
    return {k: trained[k] for k in keys}


def scored(result: dict) -> dict:
    return {
        "fitness": (result.get("values") or {}).get("mean"),
        "held_out": held_columns(result.get("held_out") or {}),
    }


def labels(small: int, large: int, hybrid: int, steps: tuple[int, int]) -> dict[str, str]:
    """What each arm is, as the table names it."""
    return {
        "ps small": f"CMA-ES over task-arithmetic weights, {small} evaluations",
        "ps large": f"CMA-ES over task-arithmetic weights, {large} evaluations",
        "dam small": f"DAM, {steps[0]} steps",
        "dam large": f"DAM, {steps[1]} steps",
        "adamerging small": f"AdaMerging, {steps[0]} steps",
        "adamerging large": f"AdaMerging, {steps[1]} steps",
        "hybrid": f"hybrid: CMA-ES over DAM ({steps[1]} steps), {hybrid} evaluations",
    }


def table(references: dict, summary: dict, names: dict[str, str]) -> str:
    """The README's table: references once, each trained or searched arm over its seeds."""
    lines = [
        "| arm | seeds | fitness | held-out mean ± se (range) | held-out per task | documents "
        "scored | training tokens fwd / bwd | seconds, train + score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in references.items():
        held = r["held_out"]
        tasks = " / ".join(f"{v:.2f}" for k, v in held.items() if k != "mean")
        lines.append(f"| {name} | | {r['fitness']:.3f} | {held['mean']:.3f} | {tasks} | 288 | | |")
    for arm, s in summary.items():
        held = s["held_out"]
        tasks = " / ".join(f"{v:.2f}" for v in s["held_out_tasks"].values())
        training = ""
        if s["training_seconds"]["mean"]:
            forward, backward = s["training_tokens"]["mean"], s["training_tokens_backward"]["mean"]
            training = f"{forward / 1000:.1f}k / {backward / 1000:.1f}k"
        spread = ""
        if held["se"] is not None:
            spread = f" ± {held['se']:.3f} ({held['min']:.3f}-{held['max']:.3f})"
        train, score = s["training_seconds"]["mean"], s["scoring_seconds"]["mean"]
        lines.append(
            f"| {names.get(arm, arm)} | {held['n']} | {s['fitness']['mean']:.3f} | "
            f"{held['mean']:.3f}{spread} | "
            f"{tasks} | {s['documents']['mean']:.0f} | {training} | {train:.0f} + {score:.0f} |"
        )
    return "\n".join(lines)


def scoring_seconds(row: dict, arm: str, rate: float) -> float:
    """What an arm spent scoring candidates on fitness: a search's evaluations as its store
    recorded them; a learned merge's one full evaluation at the seed's seconds per document
    (its search's; the learned merge is scored once, before any search, as a reference)."""
    if "evaluation_seconds" in row[arm]:
        return row[arm]["evaluation_seconds"]
    return row[arm]["documents"] * rate


# the arms each run of a seed measures
RUN_ARMS = {
    "ps": ("ps small", "ps large", "dam small", "adamerging small"),
    "hybrid": ("hybrid", "dam large", "adamerging large"),
}


def revision() -> str:
    """The commit this script runs at (read once, at the start: later commits did not run)."""
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def machine(commit: str) -> str:
    """Where a run was measured: the date, the commit and the CPU."""
    import platform

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return f"{day}, commit {commit}, {cpu}, {os.cpu_count()} cores"


def mean_se(values: list[float]) -> dict:
    """Mean, standard error across seeds, and the range."""
    if not values:
        return {"mean": None, "se": None, "n": 0, "min": None, "max": None}
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    mean = statistics.fmean(values)
    return {"mean": mean, "se": se, "n": len(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "learned")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--small", type=int, default=8, help="search budget, small")
    parser.add_argument("--large", type=int, default=16, help="search budget, large")
    parser.add_argument("--hybrid", type=int, default=8, help="hybrid search budget")
    parser.add_argument("--steps", default="8,30", help="training steps: small,large")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--summarize", action="store_true", help="only read the finished runs in --runs again"
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="keep the earlier JSON's seeds and run only the (seed, run) pairs it lacks",
    )
    args = parser.parse_args()
    small_steps, large_steps = (int(x) for x in args.steps.split(","))
    commit = revision()

    from evomerge.results.status import status_data

    args.runs.mkdir(parents=True, exist_ok=True)
    base = load_config(DECODE_CONFIG)
    base["models"] = {k: str(Path(v).resolve()) for k, v in base["models"].items()}
    # fp32 scores: the same on every CPU, and on CPUs without bf16 instructions (AVX-512 BF16,
    # AMX) about 5x faster than the demo's bfloat16 (benchmarks/bf16_matmul.py)
    base["score_dtype"] = "float32"
    shared = write_calibration(args.runs)
    base["calibration"] = {
        "file": str(shared.resolve()),
        "files": write_expert_texts(args.runs),
        "limit": 48,
    }
    statistics_dir = (args.runs / "statistics").resolve()
    t0 = time.perf_counter()
    if not args.summarize:
        prepare_statistics({"calibration": {"limit": 32}, **{"models": base["models"]}}, shared,
                           statistics_dir)  # fmt: skip
    seconds = {"statistics": round(time.perf_counter() - t0, 1)}
    earlier = args.out / "learned_vs_search.json"
    before = json.loads(earlier.read_text()) if earlier.exists() else {}
    settings = {
        "search budgets": [args.small, args.large],
        "hybrid budget": args.hybrid,
        "training steps": [small_steps, large_steps],
        "lr": LR,
    }
    if args.extend and before:
        theirs = {k: before.get("settings", {}).get(k) for k in settings}
        if theirs != settings:
            parser.error(f"--extend: {earlier} was measured with {theirs}, not {settings}; "
                         "pass the same --small/--large/--hybrid/--steps")  # fmt: skip
    if args.summarize:  # nothing was measured now: the earlier figures stand
        seconds = before.get("seconds", {})
    elif args.extend:
        seconds = {**before.get("seconds", {}), **seconds}
    # --extend keeps the earlier seeds; --summarize keeps those whose run folder is gone
    kept = {r["seed"]: r for r in before.get("per_seed", [])} if (
        args.extend or args.summarize) else {}  # fmt: skip
    measured = dict(before.get("measured", {}))
    if "measured" not in before:  # the JSON's first seeds, measured before this was recorded
        measured = {f"{kind}_s{seed}": "2026-12-01, an earlier run of this script, 2-core AMD EPYC"
                    for seed, row in kept.items() for kind, arms in RUN_ARMS.items()
                    if all(a in row for a in arms)}  # fmt: skip
    untuned = [{"name": f"untuned {m}", "recipe": untuned_recipe(m, ARMS[m][0], statistics_dir)}
               for m in UNTUNED]  # fmt: skip

    first = args.runs / "ps_s0"
    # the run whose sources (and, at seed 0, baselines) the others borrow: ps_s0 where it is
    # here, else the first run this invocation makes
    lender = first if (first / "run.json").exists() else None
    per_seed: list[dict] = []
    for seed in range(args.seeds):
        row: dict = dict(kept.get(seed, {"seed": seed}))
        for kind, steps in (("ps", small_steps), ("hybrid", large_steps)):
            folder = args.runs / f"{kind}_s{seed}"
            budget = args.large if kind == "ps" else args.hybrid
            has_all = seed in kept and all(arm in row for arm in RUN_ARMS[kind])
            if has_all and (args.extend or not finished(folder, budget)):
                print(f"{kind} seed {seed}: kept from {earlier}", flush=True)
                continue
            config = copy.deepcopy(base)
            config.update(name=f"learned_{kind}_s{seed}", seed=seed)
            config["optimizer"] = {"name": "cma", "options": {"population_size": 4}}
            config["learning"] = {"steps": steps, "lr": LR, "seed": seed}
            config["baselines"] = ["dam", "adamerging"]
            if kind == "ps":
                config["search_space"] = ps_space()
                if seed == 0:
                    config["baselines"] = ["average", "dare_ties", *untuned, "dam", "adamerging"]
            else:
                config["search_space"] = hybrid_space()
            if lender is not None and folder != lender:
                config["references_from"] = str(lender.resolve())
            start = time.perf_counter()
            go = not args.summarize
            if args.summarize and not finished(folder, budget):
                continue  # a run not finished yet: its arms are left out of this summary
            if kind == "ps":
                if go:
                    run_to(config, folder, args.small, not args.quiet)
                row["ps small"] = best_of(folder, args.small, config)
                if go:
                    run_to(config, folder, args.large, not args.quiet)
                row["ps large"] = best_of(folder, args.large, config)
            else:
                if go:
                    run_to(config, folder, args.hybrid, not args.quiet)
                row["hybrid"] = best_of(folder, args.hybrid, config)
                row["hybrid"]["training"] = learned_cost(folder, "dam")
            if go:
                seconds[f"{kind}_s{seed}"] = round(time.perf_counter() - start, 1)
                measured[f"{kind}_s{seed}"] = machine(commit)
                lender = lender or folder
            data = status_data(folder)
            size = "small" if kind == "ps" else "large"
            for method in ("dam", "adamerging"):
                row[f"{method} {size}"] = {
                    **scored(data["baselines"][method]),
                    "training": learned_cost(folder, method),
                    "documents": FULL_EVALUATION,  # scored once, on every fitness document
                }
            print(f"{kind} seed {seed}: {seconds.get(f'{kind}_s{seed}')} s", flush=True)
        per_seed.append(row)

    if (first / "run.json").exists():
        data = status_data(first)
        references = {f"source {n}": scored(s) for n, s in data["sources"].items()}
        for name, result in data["baselines"].items():
            if name not in ("dam", "adamerging"):
                references[name.removeprefix("untuned ")] = scored(result)
    else:  # the references were scored by the earlier JSON's seed-0 run
        references = before["references"]
    arms = list(dict.fromkeys(k for r in per_seed for k in r if k != "seed"))
    # seconds per fitness document, from each seed's larger search (the learned merges' scoring)
    rates = {r["seed"]: r["ps large"]["evaluation_seconds"] / r["ps large"]["documents"]
             for r in per_seed if "ps large" in r}  # fmt: skip
    mean_rate = statistics.fmean(rates.values()) if rates else 0.0
    summary = {}
    for arm in arms:
        rows = [r for r in per_seed if arm in r]
        held = [r[arm]["held_out"]["mean"] for r in rows if r[arm]["held_out"]]
        fit = [r[arm]["fitness"] for r in rows if r[arm]["fitness"] is not None]
        summary[arm] = {
            "fitness": mean_se(fit),
            "held_out": mean_se(held),
            "search_seconds": mean_se([r[arm].get("evaluation_seconds", 0) for r in rows]),
            "training_seconds": mean_se(
                [r[arm].get("training", {}).get("seconds", 0) for r in rows]
            ),
            "documents": mean_se([r[arm]["documents"] for r in rows]),
            "training_tokens": mean_se(
                [r[arm].get("training", {}).get("tokens_forward", 0) for r in rows]
            ),
            "training_tokens_backward": mean_se(
                [r[arm].get("training", {}).get("tokens_backward", 0) for r in rows]
            ),
            "scoring_seconds": mean_se(
                [scoring_seconds(r, arm, rates.get(r["seed"], mean_rate)) for r in rows]
            ),
        }
        tasks = [k for k in rows[0][arm]["held_out"] if k != "mean"]
        summary[arm]["held_out_tasks"] = {
            t: statistics.fmean(r[arm]["held_out"][t] for r in rows) for t in tasks
        }
    result = {
        "seconds": seconds,
        "settings": {
            "seeds": args.seeds,  # asked for; each arm's summary says how many it has (n)
            "seeds measured": {arm: [r["seed"] for r in per_seed if arm in r] for arm in arms},
            **settings,
        },
        "measured": measured,
        "references": references,
        "per_seed": per_seed,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learned_vs_search.json").write_text(json.dumps(result, indent=1) + "\n")
    steps = (small_steps, large_steps)
    print(table(references, summary, labels(args.small, args.large, args.hybrid, steps)))


if __name__ == "__main__":
    main()
