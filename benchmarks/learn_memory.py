"""Memory of learning DAM and AdaMerging coefficients against the formula in
evomerge/learn/train.py, on the real zoo (SmolLM2-135M-Instruct and its two experts, fp32 on
the CPU): each method trains a few steps in a fresh process, whose peak resident memory above
what it held after its imports is the training's; `max_memory_allocated` on a CUDA device.

    python benchmarks/learn_memory.py [--steps 3] [--batch-size 8] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def child(method: str, config_path: str, steps: int, batch_size: int) -> None:
    """One measurement, printed as JSON."""
    import torch

    from evomerge.config import RunConfig
    from evomerge.learn import command
    from evomerge.learn.train import TrainSettings, training_bytes
    from evomerge.merge.io import ModelSource

    config = RunConfig.load(config_path)
    import lm_eval.tasks  # noqa: F401  (AdaMerging reads the fitness prompts through it)
    import transformers  # noqa: F401

    before = rss_now_bytes()
    settings = TrainSettings(steps=steps, batch_size=batch_size, progress=False)
    learned = command.learn(config, method, settings)
    peak = rss_peak_bytes() - before
    source = ModelSource(next(iter(config.models.values())))
    parameters = sum(
        int(torch.Size(i.shape).numel()) for n, i in source.index.items() if "lm_head" not in n
    )
    held = len(config.models)  # base + experts: the base is DAM's fallback, AdaMerging's theta_0
    per_step = len(command.experts(config)) if method == "dam" else 1  # batches per step
    tokens = learned.summary["tokens_backward"] // (steps * batch_size * per_step)
    formula = training_bytes(
        method, parameters, held, learned.summary["coefficients"], source.config, batch_size,
        tokens,
    )  # fmt: skip
    print(json.dumps({"method": method, "measured": peak, "formula": formula, "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "results" / "learned" / "ps_s0.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.steps, args.batch_size)
        return
    rows = []
    for method in ("dam", "adamerging"):
        command = [sys.executable, __file__, "--child", method, "--config", args.config]
        command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["ratio"] = round(row["measured"] / row["formula"]["total"], 3)
        rows.append(row)
        gib = 2**30
        terms = ", ".join(f"{k} {v / gib:.2f}" for k, v in row["formula"].items() if k != "total")
        print(
            f"{method}: measured {row['measured'] / gib:.2f} GiB, formula "
            f"{row['formula']['total'] / gib:.2f} GiB ({terms}), ratio {row['ratio']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu", "steps": args.steps, "batch_size": args.batch_size, "rows": rows}
    (args.out / "learn_memory.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
