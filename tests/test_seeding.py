"""Runs start from their sources: each space says which genomes are the source models, every
optimizer asks them first (their scores reused), so no run ends below a model the user had."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.cli import main
from evomerge.merge.engine import merge_to_disk
from evomerge.results.store import RunStore
from evomerge.spaces import build_space, read_space_spec

from .helpers import load_folder
from .test_run import run_config, write

TASK_ARITHMETIC = {
    "kind": "parameter",
    "method": "task_arithmetic",
    "parameters": {"weight": {"low": 0.0, "high": 1.0, "init": 0.5}},
}


def space_of(llama, spec: dict):
    models = {"base": str(llama["base"]), "a": str(llama["ft0"]), "b": str(llama["ft1"])}
    return build_space(read_space_spec(spec), models, "base", lambda name: 4), models


@pytest.mark.parametrize(
    "spec, expected",
    [
        (TASK_ARITHMETIC, ["a", "b", "base"]),
        (
            {
                "kind": "parameter",
                "method": "dare_ties",
                "parameters": {
                    "weight": {"low": 0.0, "high": 1.2},
                    "density": {"low": 0.2, "high": 1.0},
                },
                "layer_groups": 2,
                "filters": ["mlp"],
            },
            ["a", "b", "base"],
        ),
        (
            {
                "kind": "parameter",
                "method": "slerp",
                "models": ["a"],
                "parameters": {"t": {"low": 0.0, "high": 1.0}},
            },
            ["base", "a"],
        ),
        (
            {
                "kind": "parameter",
                "method": "multislerp",
                "parameters": {"weight": {"low": 0.0, "high": 1.0}},
            },
            ["a", "b"],
        ),
        ({"kind": "dataflow", "models": ["b", "a"], "repetitions": 2}, ["b"]),
    ],
)
def test_source_genomes_merge_to_the_sources(llama, tmp_path, spec, expected):
    """Each source genome's recipe, merged, gives back that model's weights."""
    space, models = space_of(llama, spec)
    found = space.source_genomes()
    assert [name for name, _ in found] == expected
    for name, genome in found:
        merged = load_folder(
            merge_to_disk(space.decode(genome, seed=5), tmp_path / name, progress=False)
        )
        source = load_folder(models[name])
        for key, want in source.items():
            assert torch.allclose(merged[key], want, atol=1e-6, rtol=0), (name, key)


def test_ps_dfs_sources_are_the_ps_sources_on_their_own_path(llama):
    spec = {
        "kind": "ps_dfs",
        "parameter": TASK_ARITHMETIC,
        "dataflow": {"models": ["merged", "a"], "repetitions": 1, "scaling": "per_layer"},
    }
    space, models = space_of(llama, spec)
    found = dict(space.source_genomes())
    assert sorted(found) == ["a", "b", "base"]
    recipe = space.decode(found["a"])
    assert [(s.model, s.layer, s.scale) for s in recipe.path] == [
        ("merged", k, 1.0) for k in range(4)
    ]
    weights = {m.model: m.parameters["weight"] for m in recipe.models["merged"].models}
    assert weights == {models["a"]: 1.0, models["b"]: 0.0}


def test_a_space_that_cannot_express_a_source_says_so(llama, tmp_path, capsys):
    narrow = {**TASK_ARITHMETIC, "parameters": {"weight": {"low": 0.2, "high": 1.0}}}
    space, _ = space_of(llama, narrow)
    assert space.source_genomes() == []
    config = run_config(llama, search_space=narrow, budget=2)
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out)]) == 0
    assert "expresses none of the source models" in capsys.readouterr().err
    assert all(r.origin == "optimizer" for r in RunStore.open(out).records())


OPTIMIZERS = [
    {"name": "cma", "options": {"population_size": 4}},
    {"name": "sep_cma", "options": {"population_size": 4}},
    {"name": "m2n2"},
    {"name": "nsga2", "options": {"population_size": 4}},
    {"name": "tpe"},
    {"name": "random"},
    {"name": "map"},
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=[o["name"] for o in OPTIMIZERS])
def test_every_optimizer_starts_from_the_sources(llama, tmp_path, optimizer):
    """The sources and the baseline the space expresses are the first asks, told from their
    stored scores (not re-scored), and the run's best is at least the best of them."""
    config = run_config(llama, search_space=TASK_ARITHMETIC, optimizer=optimizer, budget=8)
    config["baselines"] = ["task_arithmetic"]
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    store = RunStore.open(out)
    records = store.records()
    assert len(records) == 8
    scored = {**store.sources(), **store.baselines()}
    seeded = records[:4]
    assert [r.origin for r in seeded] == ["source"] * 3 + ["baseline"]
    assert [r.worker for r in seeded] == [
        "source a", "source b", "source base", "baseline task_arithmetic"
    ]  # fmt: skip
    for record in seeded:
        name = record.worker.split(" ", 1)[1]
        assert record.values == scored[name].values and record.seconds == 0.0
    best_reference = min(v.values["nll"] for v in scored.values())
    assert min(r.values["nll"] for r in records if not r.failed) <= best_reference


def test_cma_starts_its_mean_at_the_best_seed(llama, tmp_path):
    from evomerge.optim.cma import CMAES

    lower, upper = np.zeros(2), np.ones(2)
    cma = CMAES(lower, upper, np.full(2, 0.5), 1, seed=0, population_size=4)
    cma.seed_with([np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    from evomerge.optim.base import Evaluation

    asked = cma.ask(10)
    assert len(asked) == 3  # two seeds and the configured start; then it waits for them
    for candidate, loss in zip(asked, [0.7, 0.2, 0.5]):
        cma.tell(Evaluation(candidate.index, candidate.genome, np.array([loss])))
    assert np.allclose(cma.es.mean, [0.0, 1.0])
    assert len(cma.ask(10)) == 4  # then a whole generation


def test_seeding_can_be_turned_off(llama, tmp_path):
    config = run_config(llama, search_space=TASK_ARITHMETIC, budget=3)
    config["seed_with_sources"] = False
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    assert all(r.origin == "optimizer" for r in RunStore.open(out).records())


def test_baselines_the_space_expresses_are_seeds_too(llama, tmp_path, capsys):
    """A task_arithmetic space starts from the task_arithmetic baseline (weight 1 each) as well
    as the sources, told from its stored score; a ties baseline it cannot express is not a seed,
    nor is a baseline outside the bounds."""
    wide = {**TASK_ARITHMETIC, "parameters": {"weight": {"low": 0.0, "high": 1.5}}}
    config = run_config(llama, search_space=wide, budget=6)
    config["baselines"] = ["task_arithmetic", "ties"]
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out)]) == 0
    assert "base, baseline:task_arithmetic" in capsys.readouterr().err
    store = RunStore.open(out)
    seeded = store.records()[3]
    assert seeded.origin == "baseline" and seeded.worker == "baseline task_arithmetic"
    scored = store.baselines()["task_arithmetic"]
    assert seeded.values == scored.values and seeded.recipe == scored.recipe
    space, _ = space_of(llama, wide)
    assert np.allclose(seeded.genome, np.ones(space.size))
    narrow, _ = space_of(llama, TASK_ARITHMETIC)  # weight at most 1.0 ...
    from evomerge.recipe import Recipe

    half = Recipe.from_yaml_text(scored.recipe.replace("weight: 1.0", "weight: 1.2"))
    assert narrow.genome_of(half) is None  # ... so 1.2 is out of reach
    assert narrow.genome_of(Recipe.from_yaml_text(scored.recipe)) is not None
