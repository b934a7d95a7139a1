"""A run on a multi-node Ray cluster (real raylets on this machine, the head running no
workers): a fitness module and a task folder next to the run config reach workers on the other
nodes, which import and read the shipped copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.results.store import RunStore
from tests.test_run import run_config
from tests.test_workers import make_tasks

pytestmark = pytest.mark.cluster

FITNESS = '''
"""A fitness that says where it runs: the node, and whether this file is the driver's copy."""
import os

import ray
import torch


def score(model, tokenizer, original=""):
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    nll = float(model(input_ids=ids, labels=ids).loss)
    node = ray.get_runtime_context().get_node_id()
    return {
        "nll": nll,
        "node": float(int(node[:6], 16)),
        "shipped": float(not os.path.abspath(__file__).startswith(original)),
    }
'''


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def write_config(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_fitness_module_beside_the_config_reaches_every_node(llama, tmp_path, cluster):
    ray_cluster, _ = cluster
    job = tmp_path / "job"  # not the current folder, not on any Python path
    (job / "nodefit").mkdir(parents=True)
    (job / "nodefit" / "__init__.py").write_text(FITNESS)
    data = run_config(
        llama,
        budget=6,
        pool="ray",
        workers=2,
        threads_per_worker=1,
        ray_address=ray_cluster.address,
        fitness={"function": "nodefit:score", "options": {"original": str(job)}},
        optimizer={"name": "random"},
    )
    out = tmp_path / "run"
    assert main(["run", str(write_config(job, data)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 6 and not any(r.failed for r in records)
    assert all(r.metrics["shipped"] == 1.0 for r in records)  # imported from the shipped copy
    assert len({r.metrics["node"] for r in records}) == 2  # both worker nodes scored


def test_a_task_folder_beside_the_config_reaches_every_node(llama, tmp_path, cluster):
    import ray

    ray_cluster, _ = cluster
    job = tmp_path / "job"
    make_tasks(job / "tasks")
    data = run_config(
        llama,
        budget=2,
        pool="ray",
        workers=2,
        threads_per_worker=1,
        ray_address=ray_cluster.address,
        optimizer={"name": "random"},
        objectives=[{"name": "parity", "metric": "parity_fit: acc,none"}],
        fitness={"kind": "lm_eval", "tasks": ["parity_fit"], "include_path": "tasks"},
        score_sources=False,
    )
    from evomerge.config import RunConfig
    from evomerge.search.prepare import prepare
    from evomerge.workers.pool import make_pool

    resolved, _ = prepare(RunConfig.load(write_config(job, data)))
    pool = make_pool(resolved)
    try:
        folders = ray.get(
            [
                actor.__ray_call__.remote(
                    lambda self: str(Path(self.fitness_spec["include_path"]).resolve())
                )
                for actor in pool.actors
            ]
        )
        assert len(folders) == 2
        for folder in folders:  # each actor reads its node's copy, not the driver's folder
            assert not folder.startswith(str(job)) and Path(folder).name == "tasks"
    finally:
        pool.close()
    out = tmp_path / "run"
    assert main(["run", str(job / "run.yml"), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 2 and not any(r.failed for r in records)
