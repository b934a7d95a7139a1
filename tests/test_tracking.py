"""MLflow tracking against real local MLflow stores: every committed evaluation is one step of
one MLflow run, a killed and resumed run keeps logging into the same run with no step lost or
doubled, and a tracker that stops answering does not stop the search."""

from __future__ import annotations

import random
import sys

import pytest

from evomerge.cli import main

from .test_run import expect_error, kill_and_resume, run_config, write

pytest.importorskip("mlflow")


def mlflow_run(uri: str, experiment: str = "evomerge"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} at {uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_every_evaluation_is_a_step_in_a_file_store(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = str(tmp_path / "mlruns")
    config = run_config(llama, budget=6, tracking={"mlflow": uri, "experiment": "merges"})
    assert main(["run", str(write(tmp_path, config)), "--out", str(tmp_path / "run")]) == 0

    client, run = mlflow_run(uri, "merges")
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer"] == "cma" and run.data.params["budget"] == "6"
    nll = history(client, run, "nll")
    assert [step for step, _ in nll] == list(range(6))
    best = [value for _, value in history(client, run, "best/nll")]
    assert best == [min(v for _, v in nll[: k + 1]) for k in range(6)]  # running best
    assert {"source/a/nll", "source/b/nll", "source/base/nll"} <= set(run.data.metrics)
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    assert (
        f"tracking: MLflow {uri}, experiment merges, run {run.info.run_id}"
        in capsys.readouterr().out
    )


def test_a_killed_run_resumes_into_the_same_mlflow_run(llama, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fitness = {"function": "tests.fitness_fns:score", "options": {"sleep": 0.2}}
    config = run_config(llama, budget=8, fitness=fitness, tracking={"mlflow": uri})
    kills = kill_and_resume(
        write(tmp_path, config),
        tmp_path / "run",
        random.Random(1),
        kills=1,
        most_evals=3,
        pause=0.1,
    )
    assert kills == 1
    client, run = mlflow_run(uri)  # one MLflow run, not one per start
    assert run.info.status == "FINISHED"
    steps = [step for step, _ in history(client, run, "evaluation")]
    assert steps == list(range(8))  # every committed evaluation once, none lost to the kill


def test_a_tracker_that_stops_answering_does_not_stop_the_search(
    llama, tmp_path, monkeypatch, caplog
):
    from mlflow.tracking import MlflowClient

    real, calls = MlflowClient.log_batch, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionError("tracking server went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = run_config(llama, budget=6, tracking={"mlflow": uri})
    assert main(["run", str(write(tmp_path, config)), "--out", str(tmp_path / "run")]) == 0
    assert "MLflow stopped answering" in caplog.text
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    client, run = mlflow_run(uri)
    assert len(history(client, run, "evaluation")) < 6  # what was missed ...
    assert main(["resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert [s for s, _ in history(client, run, "evaluation")] == list(range(6))  # ... caught up


def test_tracking_without_mlflow_installed_says_how_to_install_it(
    llama, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    config = run_config(llama, tracking={"mlflow": str(tmp_path / "mlruns")})
    line = expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "run")],
        capsys,
        "tracking.mlflow",
    )
    assert "pip install 'evomerge[mlflow]'" in line
    assert not (tmp_path / "run").exists()  # nothing half-made
