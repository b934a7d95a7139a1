"""MAP, Bayesian MAP, NSGA-II and random search on a multi-task merge with a known front.

A 64-32-10 MLP is trained on all 8x8 digits (the base), then fine-tuned separately on N disjoint
groups of digits (the experts; each forgets the other groups). A merge is
theta = base + sum_k c_k tau_k with c in [0, 1]^N, and objective k is the test accuracy on
group k. A dense grid over c gives the true Pareto front. Each method gets the same budget of
evaluations; we report the hypervolume gap (1 - HV/HV_grid, reference: the grid's worst value
per objective) and IGD (mean distance from the grid front to the found set, objectives scaled
to the front's range), averaged over seeds.

    python benchmarks/map_digits.py [--seeds 3] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = {
    2: [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)],
    3: [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)],
    4: [(0, 1), (2, 3, 4), (5, 6, 7), (8, 9)],
}
GRID_STEPS = {2: 41, 3: 17, 4: 9}


def data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(net, x, y, steps, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def flat(net) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).numpy().astype(np.float64)


class Problem:
    """Merge coefficients -> per-group test accuracies, vectorised over many coefficients."""

    def __init__(self, n: int) -> None:
        (xtr, ytr), (xte, yte) = data()
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        train(net, xtr, ytr, 300, 3e-3, 0)
        self.base = flat(net)
        self.taus = []
        for k, group in enumerate(GROUPS[n]):
            expert = torch.nn.Sequential(
                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
            )
            expert.load_state_dict(net.state_dict())
            mask = torch.isin(ytr, torch.tensor(group))
            train(expert, xtr[mask], ytr[mask], 400, 3e-3, 1 + k)
            self.taus.append(flat(expert) - self.base)
        self.taus = np.stack(self.taus)
        self.x, self.y = xte.numpy().astype(np.float64), yte.numpy()
        self.groups = [np.isin(self.y, g) for g in GROUPS[n]]

    def accuracies(self, c: np.ndarray) -> np.ndarray:
        theta = self.base + c @ self.taus
        w1, b1 = theta[:2048].reshape(32, 64), theta[2048:2080]
        w2, b2 = theta[2080:2400].reshape(10, 32), theta[2400:2410]
        pred = (np.maximum(self.x @ w1.T + b1, 0) @ w2.T + b2).argmax(axis=1)
        hit = pred == self.y
        return np.array([hit[g].mean() for g in self.groups])


def run_method(name: str, problem: Problem, n: int, budget: int, seed: int) -> np.ndarray:
    from evomerge.optim.registry import Evaluation, make_optimizer

    options = {
        "map": {},
        "bayesian MAP": {"bayesian": True},
        "nsga2": {"population_size": 8},
        "random": {},
    }[name]
    optimizer_name = "map" if "MAP" in name or name == "map" else name
    opt = make_optimizer(optimizer_name, options, np.zeros(n), np.ones(n), np.full(n, 0.5), n, seed)
    found = []
    while len(found) < budget:
        batch = opt.ask(min(4, budget - len(found)))
        if not batch:
            raise RuntimeError(f"{name} stalled")
        for c in batch:
            acc = problem.accuracies(c.genome)
            found.append(acc)
            opt.tell(Evaluation(c.index, c.genome, -acc))
    return np.array(found)


def main() -> None:
    from evomerge.results.pareto import hypervolume, non_dominated

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    methods = ["map", "bayesian MAP", "nsga2", "random"]
    rows = []
    for n in (2, 3, 4):
        problem = Problem(n)
        steps = GRID_STEPS[n]
        grid = np.array(list(product(np.linspace(0, 1, steps), repeat=n)))
        truth = -np.array([problem.accuracies(c) for c in grid])  # losses
        front = truth[non_dominated(truth)]
        reference = truth.max(axis=0)
        hv_true = hypervolume(front, reference)
        scale = np.maximum(np.ptp(front, axis=0), 1e-9)
        budget = (n + 1) * (n + 2) + 24
        experts = -np.array([problem.accuracies(np.eye(n)[k]) for k in range(n)])
        for name in methods:
            gaps, igds, seconds = [], [], []
            for seed in range(args.seeds):
                start = time.perf_counter()
                found = -run_method(name, problem, n, budget, seed)
                seconds.append(time.perf_counter() - start)
                mine = found[non_dominated(found)]
                gaps.append(1 - hypervolume(mine, reference) / hv_true)
                distance = np.linalg.norm((front[:, None, :] - mine[None]) / scale, axis=2)
                igds.append(float(distance.min(axis=1).mean()))
            rows.append(
                {
                    "tasks": n,
                    "method": name,
                    "budget": budget,
                    "grid_points": len(grid),
                    "hv_gap": statistics.mean(gaps),
                    "hv_gap_sd": statistics.pstdev(gaps),
                    "igd": statistics.mean(igds),
                    "seconds": statistics.mean(seconds),
                    "expert_accuracies": (-experts.diagonal()).tolist(),
                }
            )
            print(rows[-1], flush=True)
    lines = [
        f"MAP on digits: base + N task vectors, objectives = per-group test accuracy, "
        f"{args.seeds} seeds, {platform.processor() or 'cpu'}",
        "",
        "| tasks | budget | grid points | method | hypervolume gap | IGD |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tasks']} | {r['budget']} | {r['grid_points']} | {r['method']} | "
            f"{r['hv_gap']:.3f} ± {r['hv_gap_sd']:.3f} | {r['igd']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "map_digits.md").write_text("\n".join(lines) + "\n")
    (args.out / "map_digits.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
