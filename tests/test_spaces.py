"""Shipped search spaces decode to recipes that plan and merge; layouts are what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.merge.io import ModelSource
from evomerge.merge.plan import build_plan
from evomerge.spaces import build_space, read_space_spec

SPACES = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))


def models_of(m) -> dict[str, str]:
    return {"base": str(m["base"]), "a": str(m["ft0"]), "b": str(m["ft1"])}


def depth(m):
    return lambda name: ModelSource(models_of(m)[name]).num_layers


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_space_decodes_to_mergeable_recipes(llama, path):
    spec = read_space_spec(path)
    if path.stem == "ps_slerp":
        spec.models = ["a"]
    space = build_space(spec, models_of(llama), "base", depth(llama))
    lower, upper = space.bounds()
    assert len(space.gene_names()) == space.size == lower.size
    rng = np.random.default_rng(0)
    for genome in (space.initial(), rng.uniform(lower, upper)):
        recipe = space.decode(genome, seed=11)
        assert recipe.seed == 11
        plan = build_plan(recipe)
        assert plan.ops
        plan.close()


def test_parameter_space_layout_and_decoding(llama):
    spec = read_space_spec(
        {
            "method": "ties",
            "filters": ["mlp"],
            "layer_groups": 2,
            "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.2, "high": 1}},
        }
    )
    space = build_space(spec, models_of(llama), "base", depth(llama))
    assert space.size == 2 * 2 * 2 * 2  # models x params x (mlp, rest) x groups
    genome = np.arange(space.size) / 100
    recipe = space.decode(genome)
    first = recipe.models[0].parameters["weight"]
    assert [f.filter for f in first] == ["mlp", None]
    assert first[0].value == [0.0, 0.01] and first[1].value == [0.02, 0.03]
    assert recipe.base_model == str(llama["base"])


def test_dataflow_space_starts_from_the_first_model(llama):
    spec = read_space_spec(
        {
            "kind": "ps_dfs",
            "parameter": {
                "method": "task_arithmetic",
                "parameters": {"weight": {"low": 0, "high": 1}},
            },
            "dataflow": {"repetitions": 2, "scaling": "none"},
        }
    )
    space = build_space(spec, models_of(llama), "base", depth(llama))
    recipe = space.decode(space.initial())
    assert [(s.model, s.layer) for s in recipe.path] == [("merged", i) for i in range(4)]
    assert recipe.models["merged"].merge_method == "task_arithmetic"


def test_bad_spaces(llama):
    models = models_of(llama)
    bad = [
        ({"kind": "nope"}, "unknown kind"),
        ({"method": "ties", "parameters": {"weight": {"low": 0, "high": 1, "init": 3}}}, "outside"),
        ({"method": "slerp", "parameters": {"t": {"low": 0, "high": 1}}}, "at most 2"),
        (
            {"method": "ties", "models": ["zz"], "parameters": {"weight": {"low": 0, "high": 1}}},
            "'zz' is not a key",
        ),
        ({"kind": "dataflow", "scale_bounds": [2, 3]}, "scale_bounds"),
    ]
    for data, needle in bad:
        with pytest.raises(EvomergeError, match=needle):
            build_space(read_space_spec(data), models, "base", depth(llama))


def test_dataflow_depth_is_capped(llama):
    """A random first population can turn every slot on: the path keeps its max_layers strongest
    slots (default: twice the deepest model), in order, and a longer path cannot be encoded."""
    import numpy as np

    from evomerge.errors import EvomergeError
    from evomerge.recipe import PathStep
    from evomerge.spaces import build_space, read_space_spec

    models = {"a": str(llama["base"]), "b": str(llama["ft0"])}

    def space(**extra):
        spec = {"kind": "dataflow", "models": ["a", "b"], "repetitions": 3, **extra}
        return build_space(read_space_spec(spec), models, None, lambda name: 4)

    default, capped = space(scaling="none"), space(scaling="none", max_layers=5)
    assert default.genome.slots == 24 and default.genome.max_layers == 8
    strength = np.linspace(0.1, 1.0, 24)  # every slot on, later slots stronger
    assert len(default.decode(strength).path) == 8
    path = capped.decode(strength).path
    # slots 19-23, the strongest five: layers 3-7 of the 8 laid end to end (a0-a3, b0-b3)
    assert [(s.model, s.layer) for s in path] == [("a", 3), ("b", 0), ("b", 1), ("b", 2), ("b", 3)]
    assert len(space(scaling="none", max_layers=30).decode(strength).path) == 24
    with pytest.raises(EvomergeError, match="longer than max_layers 5"):
        capped.genome.encode([PathStep(model="a", layer=k % 4) for k in range(6)])
