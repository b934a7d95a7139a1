"""The data-flow genome <-> path mapping of the evolutionary-merge paper."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import EvomergeError
from evomerge.recipe import PathStep
from evomerge.spaces.dataflow_genome import DataflowGenome

MODELS = (("a", 3), ("b", 2))


def steps(path):
    return [(s.model, s.layer, round(s.scale, 9)) for s in path]


def test_layout_sizes_per_scaling_form():
    m, r = 5, 3
    sizes = {"full": m * m, "per_layer": m, "low_rank": 2 * m * 2, "none": 0}
    for form, extra in sizes.items():
        g = DataflowGenome(MODELS, repetitions=r, scaling=form, rank=2)
        assert g.slots == m * r and g.size == m * r + extra
        assert len(g.gene_names()) == g.size
        lo, hi = g.bounds()
        assert lo.shape == hi.shape == (g.size,) and np.all(lo < hi)


def test_paper_initialisation_is_model_a_in_order_unscaled():
    g = DataflowGenome(MODELS, repetitions=2, sigma=0.2)
    x = g.initial()
    assert np.allclose(x[:3], 0.4) and np.allclose(x[3:10], -0.4)  # off: as far as on
    assert not np.any(x[10:])  # every scale 1
    assert steps(g.decode(x)) == [("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)]


def test_scale_of_a_step_depends_on_previous_layer_in_full_form():
    g = DataflowGenome(MODELS, repetitions=2, scaling="full")
    x = np.full(g.size, -0.5)
    x[g.slots :] = 0.0
    m = g.num_layers
    on = [0, 4, 5 + 1]  # a0, b1, then a1 in the second repetition
    x[on] = 0.5
    x[g.slots + 0 * m + 4] = 1.0  # a0 -> b1: scale 2
    x[g.slots + 4 * m + 1] = -1.0  # b1 -> a1: scale 0.5
    assert steps(g.decode(x)) == [("a", 0, 1.0), ("b", 1, 2.0), ("a", 1, 0.5)]
    per_layer = DataflowGenome(MODELS, repetitions=2, scaling="per_layer")
    y = np.concatenate([x[: g.slots], np.zeros(m)])
    y[per_layer.slots + 1] = 0.5
    assert steps(per_layer.decode(y))[2] == ("a", 1, round(2**0.5, 9))


def test_scales_are_clipped_and_empty_genomes_keep_their_strongest_slot():
    g = DataflowGenome(MODELS, repetitions=1, scaling="low_rank", rank=1, scale_bounds=(0.5, 2))
    x = np.full(g.size, -0.3)
    x[3] = -0.1  # strongest "off" slot: b0
    assert steps(g.decode(x)) == [("b", 0, 1.0)]
    x[g.slots :] = 5.0  # U V^T = 25 -> 2 ** 25, clipped
    x[[0, 1]] = 1.0
    assert steps(g.decode(x))[1][2] == 2.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_encode_then_decode_gives_the_path_back(data):
    form = data.draw(st.sampled_from(["full", "per_layer", "none"]))
    g = DataflowGenome(MODELS, repetitions=3, scaling=form)
    slots = sorted(data.draw(st.sets(st.integers(0, g.slots - 1), min_size=1, max_size=8)))
    layers = g.layers
    scale_of: dict = {}
    path = []
    for k, t in enumerate(slots):
        j = t % g.num_layers
        key = (slots[k - 1] % g.num_layers if k else None, j) if form == "full" else j
        scale = 1.0
        if k and form != "none":
            scale = scale_of.setdefault(key, data.draw(st.sampled_from([0.5, 0.8, 1.0, 1.25, 2.0])))
        path.append(PathStep(model=layers[j][0], layer=layers[j][1], scale=scale))
    x = g.encode(path)
    assert steps(g.decode(x)) == steps(path)
    assert steps(g.decode(x.copy())) == steps(g.decode(x))  # pure: same genome, same path


def test_bad_genomes_and_layouts():
    g = DataflowGenome(MODELS)
    with pytest.raises(EvomergeError, match="shape"):
        g.decode(np.zeros(3))
    with pytest.raises(EvomergeError, match="non-finite"):
        g.decode(np.full(g.size, np.nan))
    with pytest.raises(EvomergeError, match="scale_bounds"):
        DataflowGenome(MODELS, scale_bounds=(0.0, 2.0))
    with pytest.raises(EvomergeError, match="repetitions"):
        g.encode([PathStep(model="a", layer=2), PathStep(model="a", layer=0)] * 2)
