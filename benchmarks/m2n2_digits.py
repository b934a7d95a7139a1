"""M2N2 from scratch on sklearn's 8x8 digits, with its ablations and CMA-ES, in one run.

As in the M2N2 paper's repository: a 64-H-10 ReLU MLP whose weights are the genome, the first
80% of the digits to train on and the last 20% to test, an archive of 20, alpha 1, mutation
sigma 0.01, slerp split-point crossover, a budget of forward passes (one pass = one candidate
scored on the whole training split), and the test accuracy of the member with the best training
accuracy. Arms: M2N2, no crossover, no attraction (second parent by fitness), GA (alpha 0:
no competition for resources), CMA-ES (full covariance; x0 ~ N(0, 0.01), sigma 0.01) and
Sep-CMA-ES. Full-covariance CMA-ES costs O(n^2) memory and an O(n^3) eigendecomposition per
generation, so the table states the hidden size every arm used.

    python benchmarks/m2n2_digits.py [--hidden 16] [--evals 50000] [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per run; runs go in parallel (--jobs)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "m2n2": {},
    "no crossover": {"crossover": False},
    "no attraction": {"attraction": False},
    "GA (alpha 0)": {"alpha": 0.0},
    "CMA-ES": None,
    "Sep-CMA-ES": None,
}


def load_digits_split():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


class MLP:
    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.size = (64 + 1) * hidden + (hidden + 1) * 10

    def predict(self, genome: np.ndarray, x: np.ndarray) -> np.ndarray:
        h = self.hidden
        p = genome.astype(np.float32, copy=False)
        w1, p = p[: 64 * h].reshape(64, h), p[64 * h :]
        b1, p = p[:h], p[h:]
        w2, b2 = p[: h * 10].reshape(h, 10), p[h * 10 :]
        return (np.maximum(x @ w1 + b1, 0) @ w2 + b2).argmax(axis=1)


def run_arm(arm: str, seed: int, hidden: int, evals: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from evomerge.optim.base import Evaluation
    from evomerge.optim.cma import CMAES, SepCMAES
    from evomerge.optim.m2n2 import M2N2

    (xtr, ytr), (xte, yte) = load_digits_split()
    net = MLP(hidden)
    x0 = np.random.default_rng(seed).normal(0, 0.01, net.size)
    inf = np.full(net.size, np.inf)
    start = time.perf_counter()
    best_train, best_genome = -1.0, x0
    if ARMS[arm] is None:
        cls = CMAES if arm == "CMA-ES" else SepCMAES
        opt = cls(-inf, inf, x0, 1, seed, sigma=0.01)
        batch = opt.population_size
    else:
        options = {"archive_size": 20, "alpha": 1.0, "slerp": True, "mutation_sigma": 0.01}
        opt = M2N2(-inf, inf, x0, 1, seed, **{**options, **ARMS[arm]})
        batch = 1
    done = 0
    while done < evals:
        for c in opt.ask(batch):
            hits = (net.predict(c.genome, xtr) == ytr).astype(float)
            acc = hits.mean()
            if acc > best_train:
                best_train, best_genome = acc, c.genome
            opt.tell(Evaluation(c.index, c.genome, np.array([-acc]), hits))
            done += 1
    if ARMS[arm] is not None:  # M2N2: the archive member with the best training accuracy
        best_genome = opt.members[opt.best()]
        best_train = float(opt.scores[opt.best()].mean())
    test = float((net.predict(best_genome, xte) == yte).mean())
    return {
        "arm": arm,
        "seed": seed,
        "hidden": hidden,
        "evals": done,
        "train": best_train,
        "test": test,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--evals", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    jobs = [(a, s, args.hidden, args.evals) for a in arms for s in range(args.seeds)]
    jobs.sort(key=lambda job: ARMS[job[0]] is not None)  # the slow CMA-ES runs start first
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(run_arm, *zip(*jobs)):
            results.append(result)
            print(
                f"{result['arm']:>14} seed {result['seed']}: test {result['test']:.3f} "
                f"train {result['train']:.3f} ({result['seconds']:.0f} s)",
                flush=True,
            )
    lines = [
        f"M2N2 on 8x8 digits: 64-{args.hidden}-10 MLP ({MLP(args.hidden).size} weights), "
        f"{args.evals} forward passes, {args.seeds} seeds, {platform.processor() or 'cpu'}",
        "",
        "| arm | test accuracy (mean ± sd) | best-member train accuracy | s per run |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        tests = [r["test"] for r in rows]
        sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
        lines.append(
            f"| {arm} | {statistics.mean(tests):.3f} ± {sd:.3f} | "
            f"{statistics.mean(r['train'] for r in rows):.3f} | "
            f"{statistics.mean(r['seconds'] for r in rows):.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"m2n2_digits_h{args.hidden}"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
