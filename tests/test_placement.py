"""Placing workers on a cluster: how many fit, and runs whose workers cannot be placed end in one
line naming what was asked and what the cluster has, instead of waiting for ever."""

from __future__ import annotations

import time

from evomerge.workers.ray_pool import default_workers, unplaceable

from .test_run import expect_error, run_config, write

GPU_NODES = [{"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 4}]


def test_default_workers_divide_the_gpus_by_what_each_worker_asks():
    assert default_workers(GPU_NODES, True, 2) == 12
    assert default_workers(GPU_NODES, True, 2, gpus_per_worker=0.5) == 24  # two per GPU
    assert default_workers(GPU_NODES, True, 2, gpus_per_worker=0.3) == 39  # 26 + 13, per node
    assert default_workers([{"CPU": 7}, {"CPU": 3}], False, 2) == 4  # 3 + 1: no actor spans nodes


def test_unplaceable_asks_are_named_before_any_actor_starts():
    assert unplaceable({"GPU": 0.5}, 24, GPU_NODES) == ""
    problem = unplaceable({"GPU": 1.0}, 13, GPU_NODES)
    assert "13 workers asking 1 GPU each cannot be placed" in problem and "room for 12" in problem
    problem = unplaceable({"CPU": 64.0}, 1, [{"CPU": 2}])
    assert "64 CPU" in problem and "2 CPU" in problem and "room for 0" in problem


def test_a_worker_bigger_than_any_node_ends_the_run_at_once(llama, tmp_path, capsys):
    config = run_config(llama, pool="ray", workers=1, threads_per_worker=64, budget=2)
    start = time.monotonic()
    line = expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "run")],
        capsys,
        "1 worker asking 64 CPU each cannot be placed",
        "threads_per_worker",
    )
    assert "room for 0" in line
    assert time.monotonic() - start < 120  # Ray would have kept it pending for ever


def test_workers_not_placed_within_the_timeout_end_the_run_in_one_line(llama, tmp_path, capsys):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Holder:  # another job's actor holds half the cluster
            def ping(self) -> bool:
                return True

        holder = Holder.remote()
        ray.get(holder.ping.remote())
        config = run_config(
            llama, pool="ray", workers=2, threads_per_worker=1, placement_timeout=5, budget=2
        )
        expect_error(
            ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "run")],
            capsys,
            "was not placed and ready within placement_timeout (5 s)",
            "1 CPU",
        )
    finally:
        ray.shutdown()
