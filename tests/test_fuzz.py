"""Fuzzed input files: every one-fault mutant (each path x each mutation) of a run config, of the
ready search-space files and of mergekit recipes, then random two-fault mutants with hypothesis.
Each is accepted and works, or is refused in one line with nothing written (tests/mutations.py
holds the checks; benchmarks/fuzz_inputs.py runs more of them and reports the counts)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge.io import ModelSource

from .mutations import (
    MUTATIONS,
    check_merge,
    check_run_config,
    check_search_space,
    mutate,
    paths,
    recipe_seeds,
    single_mutations,
    space_seeds,
)
from .test_run import run_config

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SLOW_OK = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def config(llama) -> dict:
    return run_config(llama, optimizer={"name": "random"})


@pytest.fixture(scope="module")
def sources(llama) -> dict:
    return {str(p.resolve()): ModelSource(str(p.resolve())) for p in llama.values()}


def sweep(seeds: dict, check) -> Counter:
    """Every one-fault mutant of every seed; a failing check names its mutant."""
    outcomes: Counter = Counter()
    for name, seed in seeds.items():
        assert check(seed) == "valid", f"seed {name} itself is refused"
        for label, mutant in single_mutations(seed):
            try:
                outcomes[check(mutant)] += 1
            except Exception as exc:
                raise AssertionError(f"{name} {label}: {type(exc).__name__}: {exc}") from exc
    return outcomes


def two_faults(data, seeds: dict):
    doc = seeds[data.draw(st.sampled_from(sorted(seeds)))]
    for _ in range(2):
        where = list(paths(doc))
        if where:
            doc = mutate(
                doc, data.draw(st.sampled_from(where)), data.draw(st.sampled_from(MUTATIONS))
            )
    return doc


def test_every_one_fault_run_config(config):
    outcomes = sweep({"run": config}, check_run_config)
    assert outcomes["error"] > 100 and outcomes["valid"] > 10, outcomes


def test_every_one_fault_search_space_file(config, sources, tmp_path):
    seeds = space_seeds(SPACES)
    assert len(seeds) >= 8
    outcomes = sweep(seeds, lambda s: check_search_space(s, config, tmp_path, sources))
    assert outcomes["error"] > 300 and outcomes["valid"] > 50, outcomes


def test_every_one_fault_mergekit_recipe(llama, tmp_path):
    outcomes = sweep(recipe_seeds(llama), lambda r: check_merge(r, tmp_path / "case"))
    assert outcomes["error"] > 300 and outcomes["valid"] > 50, outcomes


@SLOW_OK
@given(st.data())
def test_two_fault_run_configs(config, data):
    check_run_config(two_faults(data, {"run": config}))


@SLOW_OK
@given(st.data())
def test_two_fault_search_space_files(config, sources, tmp_path, data):
    check_search_space(two_faults(data, space_seeds(SPACES)), config, tmp_path, sources)


@SLOW_OK
@given(st.data())
def test_two_fault_mergekit_recipes(llama, tmp_path, data):
    check_merge(two_faults(data, recipe_seeds(llama)), tmp_path / "case")


def test_search_space_caps_stop_absurd_sizes_before_allocating(config, sources, tmp_path):
    """Typos like repetitions: 1e9 once built a billion-gene list and took the machine down."""
    from evomerge.config import RunConfig
    from evomerge.errors import EvomergeError
    from evomerge.search.prepare import prepare

    cases = {
        "repetitions": {"kind": "dataflow", "repetitions": 10**12},
        "rank": {"kind": "dataflow", "scaling": "low_rank", "rank": 10**12},
        "layer_groups": {**space_seeds(SPACES)["ps_ties"], "layer_groups": 10**12},
    }
    for field, space in cases.items():
        with pytest.raises(EvomergeError, match=field if field != "repetitions" else "genes"):
            prepare(RunConfig.from_dict({**config, "search_space": space}))


def test_ranges_a_method_cannot_take_fail_before_the_run(config):
    from evomerge.config import RunConfig
    from evomerge.errors import EvomergeError
    from evomerge.search.prepare import prepare

    space = space_seeds(SPACES)["ps_dare_ties"]
    space["parameters"]["density"] = {"low": 0.0, "high": 1.0}
    with pytest.raises(EvomergeError, match="low end of its ranges.*density"):
        prepare(RunConfig.from_dict({**config, "search_space": space}))
