"""Recipe parsing and mergekit's parameter semantics."""

import pytest

from evomerge.errors import EvomergeError
from evomerge.recipe import FilteredValue, Recipe, resolve_setting


def test_gradient_interpolates_like_mergekit():
    assert resolve_setting([0.0, 1.0], "x", 0.25, float) == pytest.approx(0.25)
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.75, float) == pytest.approx(0.5)
    assert resolve_setting([0.2, 0.4], "x", 1.0, float) == pytest.approx(0.4)
    assert resolve_setting([True, False, True], "x", 0.6, bool) is False


def test_filters_take_first_substring_match_else_none():
    setting = [FilteredValue(filter="mlp", value=0.1), FilteredValue(filter="attn", value=[0, 1])]
    assert resolve_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.5, float) == 0.1
    assert resolve_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5, float) == 0.5
    assert resolve_setting(setting, "model.norm.weight", 0.0, float) is None


def test_yaml_round_trip_keeps_everything():
    text = """
merge_method: ties
base_model: a
seed: 5
models:
  - model: b
    parameters:
      weight: [0.1, 0.9]
      density: [{filter: mlp, value: 0.5}, {value: 0.9}]
parameters: {normalize: false}
dtype: bfloat16
"""
    recipe = Recipe.from_yaml_text(text)
    assert Recipe.from_yaml_text(recipe.to_yaml()) == recipe
    assert "seed" not in recipe.to_mergekit_yaml()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"merge_method": "ties"}, "exactly one of 'models' or 'slices'"),
        ({"merge_method": "ties", "models": [{"modl": "x"}]}, "field 'models.0.modl'"),
        ({"merge_method": "ties", "modules": {}}, "'modules' is not supported"),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}],
            },
            "layer_range",
        ),
    ],
)
def test_invalid_recipes_name_the_field(data, expected):
    with pytest.raises(EvomergeError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        Recipe.from_dict(data)
