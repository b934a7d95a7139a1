"""Chaos: SIGKILL a run's driver at random moments many times, resume after each, and compare
the result with an uninterrupted run of the same seed.

Kills land during evaluations, store commits and optimizer checkpoints (the moment is random
within a window after the run has made progress). Figures: kills survived, committed evaluations
lost (must be 0), evaluations repeated (scored more than once: only those in flight at a kill),
and whether the final store equals the uninterrupted run's.

    python benchmarks/chaos.py [--kills 20] [--budget 60] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def records(folder: Path) -> list[tuple]:
    from evomerge.results.store import RunStore

    rows = sorted(RunStore.open(folder).records(), key=lambda r: r.index)
    return [(r.index, tuple(r.genome), r.values) for r in rows]


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def export_chaos(run: Path, tmp: Path, kills: int, rng: random.Random) -> dict:
    """SIGKILL `evomerge export` while it writes (a staging folder exists), `kills` times, then
    let it finish: the folder must hold the uninterrupted export's bytes, nothing else."""
    from tests.test_run import cli

    clean, target = tmp / "export_clean", tmp / "export_killed"
    assert cli("export", str(run), "--best", "nll", "--to", str(clean)).wait() == 0
    mid_write = 0
    for _ in range(kills):
        proc = cli("export", str(run), "--best", "nll", "--to", str(target))
        while proc.poll() is None and not (
            target.exists() and any(p.name.endswith(f"-{proc.pid}") for p in target.iterdir())
        ):
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.01))
        if proc.poll() is None:
            writing = any(p.name.endswith(f"-{proc.pid}") for p in target.iterdir())
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            mid_write += writing
            for done in target.glob("eval-*"):  # a finished one would be kept: start over
                shutil.rmtree(done)
    assert cli("export", str(run), "--best", "nll", "--to", str(target)).wait() == 0
    names = sorted(p.name for p in clean.iterdir())
    equal = names == sorted(p.name for p in target.glob("eval-*")) and all(
        f.read_bytes() == (target / f.relative_to(clean)).read_bytes()
        for f in clean.rglob("*.safetensors")
    )
    leftovers = len([p for p in target.iterdir() if p.name.startswith(".")])
    return {
        "export_kills": kills,
        "export_kills_mid_write": mid_write,
        "export_equal": bool(equal),
        "export_leftovers": leftovers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--export-kills", type=int, default=10)
    parser.add_argument("--optimizer", default="cma")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    from tests.family import make_family
    from tests.test_run import cli  # the CLI in a child process, output quiet

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = make_family(tmp / "models", "llama", n_finetunes=2, seed=0)

        def config(log: Path) -> Path:
            data = {
                "models": {
                    "base": str(models["base"]),
                    "a": str(models["ft0"]),
                    "b": str(models["ft1"]),
                },
                "base_model": "base",
                "search_space": str(ROOT / "search_spaces/ps_ties.yaml"),
                "objectives": [{"name": "nll", "metric": "nll", "direction": "minimize"}],
                "optimizer": {"name": args.optimizer, "options": {"population_size": 6}},
                "budget": args.budget,
                "seed": 1,
                "pool": "local",
                "device": "cpu",
                "fitness": {
                    "function": "tests.fitness_fns:logged",
                    "options": {"log": str(log), "sleep": 0.05},
                },
            }
            path = tmp / f"{log.stem}.yaml"
            path.write_text(yaml.safe_dump(data))
            return path

        reference = tmp / "reference"
        proc = cli("run", str(config(tmp / "reference_calls.log")), "--out", str(reference))
        assert proc.wait() == 0, proc.stderr.read().decode()
        chaos, log = tmp / "chaos", tmp / "chaos_calls.log"
        command = ["run", str(config(log)), "--out", str(chaos)]
        kills, lost, start = 0, 0, time.perf_counter()
        committed_before = 0
        while True:
            proc = cli(*command)
            command = ["resume", str(chaos)]
            if kills < args.kills:
                target = calls(log) + rng.randint(1, 4)
                while proc.poll() is None and calls(log) < target:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.1))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    now = len(records(chaos)) if (chaos / "run.json").exists() else 0
                    lost += max(0, committed_before - now)
                    committed_before = now
                    continue
            if proc.wait() != 0:
                raise SystemExit(proc.stderr.read().decode()[-2000:])
            break
        got, want = records(chaos), records(reference)
        export = export_chaos(chaos, tmp, args.export_kills, rng)
        result = {
            "kills": kills,
            "budget": args.budget,
            "optimizer": args.optimizer,
            "committed": len(got),
            "lost": lost + max(0, args.budget - len(got)),
            "repeated": calls(log) - len(got),
            "equal_to_uninterrupted": got == want,
            "seconds": time.perf_counter() - start,
            **export,
        }
    lines = [
        f"Chaos: {result['kills']} SIGKILLs of the driver during a {args.optimizer} run of "
        f"{args.budget} evaluations, resumed after each",
        "",
        "| kills | committed | lost | repeated (in flight at a kill) | equal to uninterrupted |",
        "|---|---|---|---|---|",
        f"| {result['kills']} | {result['committed']} | {result['lost']} | "
        f"{result['repeated']} | {'yes' if result['equal_to_uninterrupted'] else 'NO'} |",
    ]
    lines += [
        "",
        f"Export: {result['export_kills']} SIGKILLs of `evomerge export --best`, "
        f"{result['export_kills_mid_write']} of them while the model was half-written; the "
        f"re-run exported weights equal to an uninterrupted export: "
        f"{'yes' if result['export_equal'] else 'NO'}; leftover staging folders: "
        f"{result['export_leftovers']}",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.md").write_text("\n".join(lines) + "\n")
    (args.out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
