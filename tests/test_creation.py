"""A run killed at any instant of its start (creating the folder and its store, computing
calibration statistics, learning a baseline, scoring sources and baselines, the first
commits) leaves a folder that is absent, so `evomerge run` starts afresh, or a run that
`evomerge resume` finishes: never the dead end of a folder neither command takes. The kills
are real process deaths (os._exit before each durable step, no cleanup runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from evomerge.cli import main
from evomerge.results.store import RunStore

from .test_run import REPO, run_config, write

pytestmark = pytest.mark.slow

DIED = 99


def test_a_run_killed_at_any_step_of_its_start_is_absent_or_resumable(llama, tmp_path):
    texts = tmp_path / "calibration.txt"
    texts.write_text("".join(f"the number {n} is here\n" for n in range(6)))
    config = run_config(
        llama,
        budget=2,
        optimizer={"name": "random"},
        search_space={
            "kind": "parameter",
            "method": "fisher",
            "models": ["a", "b"],
            "parameters": {"weight": {"low": 0.1, "high": 1.0}},
        },
        calibration={"file": str(texts), "limit": 6},
        baselines=["average", "dam"],
        learning={"steps": 1, "batch_size": 2},
    )
    path = write(tmp_path, config)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run_until(k: int, out):
        return subprocess.run(
            [sys.executable, "-m", "tests.crash_points", str(k), str(path), str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )

    whole = run_until(0, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    names = json.loads(whole.stdout.strip().splitlines()[-1])
    renamed = names.index("replace", names.index("create_study"))  # run.json's write
    renamed = names.index("replace", renamed + 1)  # run.yaml written: the folder renamed in
    # every step of creation, and the first of each kind after it (statistics, learning,
    # sources, baselines, commits, checkpoints)
    points = list(range(1, renamed + 3))
    points += sorted({names.index(n, renamed + 2) + 1 for n in set(names[renamed + 2 :])})
    outcomes = []
    for k in points:
        out = tmp_path / f"run{k}"
        died = run_until(k, out)
        assert died.returncode == DIED, (k, died.stderr[-2000:])
        if out.exists():
            outcomes.append("resumable")
            assert main(["resume", str(out), "--quiet"]) == 0, k
        else:
            outcomes.append("absent")
            assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0, k
            assert not list(tmp_path.glob(f".run{k}.*")), k  # the dead one's leftovers went
        records = RunStore.open(out).records()
        assert sorted(r.index for r in records) == [0, 1], k  # each evaluation once
        assert (out / "learned" / "dam" / "coefficients.safetensors").is_file()
    # kills fell both before the folder existed and after it
    before = renamed + 1  # kills up to the rename itself
    assert outcomes[:before] == ["absent"] * before and "resumable" in outcomes, outcomes
