"""Runs: start, status and exports, resume after SIGKILL, and bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from evomerge.cli import main
from evomerge.results.store import RunStore

REPO = Path(__file__).resolve().parent.parent


def run_config(m, **changes) -> dict:
    config = {
        "models": {"base": str(m["base"]), "a": str(m["ft0"]), "b": str(m["ft1"])},
        "base_model": "base",
        "search_space": {
            "kind": "parameter",
            "method": "dare_ties",
            "parameters": {
                "weight": {"low": 0.0, "high": 1.0, "init": 0.5},
                "density": {"low": 0.1, "high": 1.0, "init": 0.6},
            },
        },
        "objectives": [{"name": "nll", "metric": "nll", "direction": "minimize"}],
        "optimizer": {"name": "cma", "options": {"population_size": 4}},
        "budget": 8,
        "seed": 3,
        "fitness": {"function": "tests.fitness_fns:score"},
        "device": "cpu",
        "pool": "local",
    }
    config.update(changes)
    return config


TWO_OBJECTIVES = [
    {"name": "nll", "metric": "nll", "direction": "minimize"},
    {"name": "spread", "metric": "logit_std", "direction": "maximize"},
]


def pareto_config(m, **changes) -> dict:
    """Two objectives under NSGA-II: a run whose Pareto set holds several models."""
    nsga2 = {"name": "nsga2", "options": {"population_size": 4}}
    return run_config(m, objectives=TWO_OBJECTIVES, optimizer=nsga2, **changes)


def write(tmp_path, config, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stored(folder: Path) -> list[tuple]:
    records = sorted(RunStore.open(folder).records(), key=lambda r: r.index)
    return [(r.index, tuple(r.genome), r.values, r.error) for r in records]


def test_run_status_and_exports(llama, tmp_path, capsys):
    config = pareto_config(llama)
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 8 and not any(r.failed for r in records)
    recipe = yaml.safe_load(records[3].recipe)
    assert (
        recipe["merge_method"] == "dare_ties"
        and recipe["seed"] != yaml.safe_load(records[2].recipe)["seed"]
    )
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "evaluations: 8 / 8 (0 failed)" in text and "Pareto set" in text
    assert "hypervolume:" in text
    assert (
        main(
            [
                "status",
                str(out),
                "--csv",
                str(tmp_path / "r.csv"),
                "--parquet",
                str(tmp_path / "r.parquet"),
            ]
        )
        == 0
    )
    csv, parquet = pd.read_csv(tmp_path / "r.csv"), pd.read_parquet(tmp_path / "r.parquet")
    assert len(csv) == len(parquet) == 8
    assert {"nll", "spread", "metric:logit_std", "gene:a.weight", "pareto"} <= set(parquet.columns)
    assert parquet["pareto"].any()


def test_failures_are_recorded_and_the_run_goes_on(llama, tmp_path):
    config = run_config(
        llama,
        fitness={"function": "tests.fitness_fns:explode"},
        budget=3,
        optimizer={"name": "random"},
    )
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 3 and all("always fails" in r.error for r in records)


def cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *args, "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def checkpoints(folder: Path) -> int:
    found = sorted((folder / "checkpoints").glob("optimizer-*.npz"))
    return int(found[-1].stem.split("-")[1]) if found else 0


def kill_and_resume(
    config: Path, out: Path, rng: random.Random, kills: int, most_evals: int, pause: float
) -> int:
    """`evomerge run`, SIGKILLed up to `kills` times after 1..`most_evals` more checkpoints
    (mid-evaluation, mid-commit or mid-checkpoint) and resumed each time, to the end; returns
    how many kills landed."""
    killed, command = 0, ["run", str(config), "--out", str(out)]
    while True:
        proc = cli(*command)
        command = ["resume", str(out)]
        if killed < kills:
            start = checkpoints(out) if out.exists() else 0
            target = start + rng.randint(1, most_evals)
            while proc.poll() is None and (not out.exists() or checkpoints(out) < target):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, pause))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return killed


@pytest.mark.parametrize(
    "search",
    [
        {},  # CMA-ES, one objective
        {  # pymoo's NSGA-II over two objectives, generations overlapping
            "optimizer": {"name": "pymoo_nsga2", "options": {"population_size": 4}},
            "objectives": TWO_OBJECTIVES,
        },
    ],
    ids=["cma", "pymoo_nsga2"],
)
def test_sigkill_and_resume_equals_an_uninterrupted_run(llama, tmp_path, search):
    config = run_config(
        llama,
        budget=14,
        fitness={"function": "tests.fitness_fns:score", "options": {"sleep": 0.05}},
        **search,
    )
    path = write(tmp_path, config)
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference), "--quiet"]) == 0

    chaos = tmp_path / "chaos"
    kills = kill_and_resume(path, chaos, random.Random(7), kills=4, most_evals=5, pause=0.08)
    assert kills >= 3
    got, want = stored(chaos), stored(reference)
    assert len(got) == 14  # nothing committed was lost, nothing was committed twice
    assert got == want  # same candidates, same scores, in the same order


def expect_error(args, capsys, *needles) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("evomerge: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_run_configs(llama, tmp_path, capsys):
    base = run_config(llama)
    space = base["search_space"]
    cases = [
        (
            {"search_space": {**space, "parameters": {"weight": {"low": 1, "high": 0}}}},
            ["search_space", "low < high"],
        ),
        ({"optimizer": {"name": "cmaa"}}, ["optimizer.name", "did you mean 'cma'"]),
        ({"optimizer": {"name": "cma", "options": {"sigmaa": 1}}}, ["optimizer.options.sigmaa"]),
        ({"budget": 0}, ["budget", "greater than 0"]),
        ({"objectives": []}, ["objectives"]),
        (
            {
                "search_space": {
                    **space,
                    "method": "ties",
                    "parameters": {"t": {"low": 0, "high": 1}},
                }
            },
            ["search_space.parameters.t", "ties has no parameter"],
        ),
        ({"budgett": 3}, ["budgett", "did you mean 'budget'"]),
        ({"fitness": {"function": "tests.nothere:score"}}, ["fitness.function"]),
    ]
    for i, (change, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        expect_error(
            ["run", str(write(tmp_path, {**base, **change})), "--out", str(out)], capsys, *needles
        )
        assert not out.exists()


def test_missing_objective_stops_cleanly_and_keeps_the_record(llama, tmp_path, capsys):
    config = run_config(llama, objectives=[{"name": "acc", "metric": "accuracy"}])
    out = tmp_path / "run"
    expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"],
        capsys,
        "objectives",
        "'accuracy'",
        "nll",
    )
    assert len(RunStore.open(out).records()) == 1


def test_bad_run_folders(llama, tmp_path, capsys):
    expect_error(["resume", str(tmp_path)], capsys, "not an evomerge run folder")
    out = tmp_path / "run"
    config = write(tmp_path, run_config(llama, budget=2))
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    before = stored(out)
    expect_error(["run", str(config), "--out", str(out)], capsys, "not empty", "resume")
    meta = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**meta, "format": 99}))
    expect_error(["resume", str(out)], capsys, "format 99")
    (out / "run.json").write_text(json.dumps(meta))
    assert stored(out) == before


def test_ps_dfs_search_runs_end_to_end(llama, tmp_path):
    space = yaml.safe_load((REPO / "search_spaces" / "ps_dfs.yaml").read_text())
    space["dataflow"]["max_layers"] = 64  # no cap in reach: random paths keep their own depths
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config = run_config(
        llama,
        search_space=str(tmp_path / "space.yaml"),
        optimizer={"name": "random"},
        budget=8,
    )
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 8 and not any(r.failed for r in records), [r.error for r in records]
    searched = [r for r in records if r.origin == "optimizer"]  # the first 3 are the sources
    assert [r.origin for r in records[:3]] == ["source"] * 3 and len(searched) == 5
    depths = {len(yaml.safe_load(r.recipe)["path"]) for r in searched}
    assert len(depths) > 1  # the live model was rebuilt for other depths
