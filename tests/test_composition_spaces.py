"""Spaces that can write a composition: sharp per-block genes, layer swaps with a transition
width, and data-flow moves that stay local to their seed."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.io import ModelSource
from evomerge.optim.registry import make_optimizer
from evomerge.spaces import build_space, read_space_spec
from evomerge.spaces.dataflow_genome import DataflowGenome


def models_of(m) -> dict[str, str]:
    return {"base": str(m["base"]), "a": str(m["ft0"]), "b": str(m["ft1"])}


def depth(m):
    return lambda name: ModelSource(models_of(m)[name]).num_layers


def tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def layer_of(tensors_: dict, layer: int) -> dict:
    prefix = f"model.layers.{layer}."
    return {k[len(prefix) :]: v for k, v in tensors_.items() if k.startswith(prefix)}


def assert_layer_is(merged: dict, source: dict, layer: int, atol=1e-6):
    got, want = layer_of(merged, layer), layer_of(source, layer)
    assert got.keys() == want.keys()
    for name in got:
        assert np.allclose(got[name].float().numpy(), want[name].float().numpy(), atol=atol), name


def test_a_sharp_layer_swap_puts_each_experts_layers_where_it_owns_them(llama, tmp_path):
    space = build_space(
        read_space_spec({"kind": "layer_swap", "segments": 2, "owners": ["a", "b"]}),
        models_of(llama),
        "base",
        depth(llama),
    )
    assert space.gene_names() == ["cut[1]", "owner[0]", "owner[1]"]
    genome = np.array([0.5, 0.5, 1.5])  # cut at layer 2 of 4: a below, b above
    assert space.layer_weights(genome) == {"a": [1, 1, 0, 0], "b": [0, 0, 1, 1]}
    merged = tensors(merge_to_disk(space.decode(genome), tmp_path / "m", progress=False))
    a, b = tensors(llama["ft0"]), tensors(llama["ft1"])
    for layer in (0, 1):
        assert_layer_is(merged, a, layer)
    for layer in (2, 3):
        assert_layer_is(merged, b, layer)
    assert np.allclose(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_transition_blends_over_its_width_and_sources_are_expressed(llama):
    space = build_space(
        read_space_spec(
            {
                "kind": "layer_swap",
                "segments": 2,
                "transition": {"low": 0, "high": 4, "init": 0},
                "scale": {"low": 0.5, "high": 1.5},
            }
        ),
        models_of(llama),
        "base",
        depth(llama),
    )
    genome = np.array([0.5, 0.2, 1.7, 2.0, 1.0, 1.0])  # a then b, blended over 2 layers
    weights = space.layer_weights(genome)
    assert weights == {"a": [1, 0.75, 0.25, 0], "b": [0, 0.25, 0.75, 1]}
    genome[-2:] = [1.2, 0.5]
    assert space.layer_weights(genome)["a"] == [1.2, 0.9, 0.3, 0]
    sources = dict(space.source_genomes())
    assert space.layer_weights(sources["b"]) == {"a": [0] * 4, "b": [1] * 4}
    recipe = space.decode(sources["a"])
    assert [m.parameters["weight"] for m in recipe.models] == [1.0, 0.0]


def test_owner_genes_pick_an_expert_and_cuts_are_sorted(llama):
    space = build_space(
        read_space_spec({"kind": "layer_swap", "method": "linear", "segments": 3}),
        models_of(llama),
        "base",
        depth(llama),
    )
    # cuts given out of order; owners b, a, b (a sandwich)
    weights = space.layer_weights(np.array([0.75, 0.25, 1.9, 0.1, 1.0]))
    assert weights == {"a": [0, 1, 1, 0], "b": [1, 0, 0, 1]}
    assert space.model_names() == ["a", "b"]  # linear swaps whole weights: no base read
    assert space.decode(space.initial()).base_model is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"owners": ["a"]}, "1 owners for 3 segments"),
        ({"owners": ["a", "c", "a"]}, "'c' is not one of the experts"),
        ({"segments": 9}, "use at most 4"),
        ({"method": "linear", "scale": {"low": 0, "high": 2}}, "method: task_arithmetic"),
        ({"models": ["a", "x"]}, "'x' is not a key"),
        ({"transition": 7}, "use 0 to 4"),
    ],
)
def test_bad_layer_swaps_name_the_field(llama, spec, message):
    with pytest.raises(EvomergeError, match=message):
        build_space(
            read_space_spec({"kind": "layer_swap", **spec}),
            models_of(llama),
            "base",
            depth(llama),
        )


def test_task_arithmetic_swap_without_a_base_is_refused(llama):
    with pytest.raises(EvomergeError, match="field 'base_model'"):
        build_space(read_space_spec({"kind": "layer_swap"}), models_of(llama), None, depth(llama))


def test_block_genes_change_sharply_at_the_block_boundary(llama, tmp_path):
    spec = {
        "method": "task_arithmetic",
        "parameters": {"weight": {"low": 0, "high": 1}},
        "layer_groups": 2,
    }
    models = models_of(llama)
    blocks = build_space(
        read_space_spec({**spec, "layer_shape": "blocks"}), models, "base", depth(llama)
    )
    gradient = build_space(read_space_spec(spec), models, "base", depth(llama))
    genome = np.array([1.0, 0.0, 0.0, 1.0])  # a in the lower block, b in the upper one
    weights = {m.model: m.parameters["weight"] for m in blocks.decode(genome).models}
    assert weights == {models["a"]: [1, 1, 0, 0], models["b"]: [0, 0, 1, 1]}
    assert gradient.decode(genome).models[0].parameters["weight"] == [1.0, 0.0]  # blends
    merged = tensors(merge_to_disk(blocks.decode(genome), tmp_path / "m", progress=False))
    a, b = tensors(llama["ft0"]), tensors(llama["ft1"])
    assert_layer_is(merged, a, 1)
    assert_layer_is(merged, b, 2)


def test_interleaved_layout_takes_a_layer_from_the_other_model_in_two_slots():
    g = DataflowGenome((("a", 3), ("b", 3)), repetitions=1, scaling="none", layout="interleaved")
    assert g.layers == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    x = g.initial()
    assert [(s.model, s.layer) for s in g.decode(x)] == [("a", 0), ("a", 1), ("a", 2)]
    x[2], x[3] = -x[2], -x[3]  # a1 off, b1 on
    assert [(s.model, s.layer) for s in g.decode(x)] == [("a", 0), ("b", 1), ("a", 2)]


def test_cma_steps_from_a_dfs_seed_are_local_moves(llama):
    """A DFS candidate near its seed inserts or drops a few layers; with the paper's layout a
    full-width step would flip about half of the slots and break the model."""
    spec = read_space_spec(
        {"kind": "dataflow", "models": ["a", "b"], "repetitions": 2, "scaling": "per_layer"}
    )
    space = build_space(spec, models_of(llama), "base", lambda name: 30)  # two 30-layer models
    (_, seed), *_ = space.source_genomes()
    low, high = space.bounds()
    on = seed[: space.genome.slots] > 0
    flips = {}
    for steps in (space.step_sizes(), None):
        opt = make_optimizer("cma", {"population_size": 8}, low, high, seed, 1, 0, steps)
        asked = [np.asarray(c.genome) for c in opt.ask(8)]
        flips[steps is None] = np.mean([np.sum((g[: len(on)] > 0) != on) for g in asked])
    assert 0.3 <= flips[False] <= 8  # a few of the 120 slots
    assert flips[True] > 20  # the old default step: a different model each time


def test_a_dfs_space_can_search_whose_embeddings_its_path_reads(llama, tmp_path):
    """`embed_from: [a, b]` adds one gene: the path starts on a's embeddings and a step may move
    it to b's (a language in its words, a skill in the layers); each model with its own
    embeddings and layers is a source the search starts from."""
    spec = {"kind": "dataflow", "models": ["a", "b"], "embed_from": ["a", "b"], "repetitions": 1,
            "scaling": "none", "layout": "interleaved"}  # fmt: skip
    space = build_space(read_space_spec(spec), models_of(llama), "base", depth(llama))
    assert space.gene_names()[-1] == "embed_from" and space.size == space.genome.size + 1
    low, high = space.bounds()
    assert (low[-1], high[-1]) == (0.0, 2.0) and space.step_sizes()[-1] == 1.0
    start = space.initial()
    recipe = space.decode(start)
    assert recipe.embed_from == "a" and [s.model for s in recipe.path] == ["a"] * 4
    moved = start.copy()
    moved[-1] = 1.7  # only the embeddings move
    assert space.decode(moved).embed_from == "b" and space.decode(moved).path == recipe.path
    merged = tensors(merge_to_disk(space.decode(moved), tmp_path / "m", progress=False))
    a, b = tensors(llama["ft0"]), tensors(llama["ft1"])
    assert np.allclose(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert_layer_is(merged, a, 1)
    sources = dict(space.source_genomes())
    assert set(sources) == {"a", "b"}
    own = tensors(merge_to_disk(space.decode(sources["b"]), tmp_path / "b", progress=False))
    assert own.keys() == b.keys() and all(np.allclose(own[k], b[k]) for k in b)
    assert [label for label, _, _ in space.must_plan()] == ["the start genome", "embed_from b"]
    bad_lists = ((["a", "zz"], "'zz' is not a key"), (["a", "a"], "without repeats"),
                 ([], "name one model"))  # fmt: skip
    for bad, message in bad_lists:
        with pytest.raises(EvomergeError, match=f"search_space.embed_from.*{message}"):
            build_space(read_space_spec({**spec, "embed_from": bad}), models_of(llama), "base",
                        depth(llama))  # fmt: skip


def test_a_ps_dfs_space_starts_from_the_other_models_embeddings_too(llama):
    """The PS part here expresses no source (weights in [0.2, 0.8]); b on its own embeddings
    and layers is one through the DFS part."""
    weight = {"low": 0.2, "high": 0.8}
    spec = {
        "kind": "ps_dfs",
        "parameter": {"method": "task_arithmetic", "parameters": {"weight": weight}},
        "dataflow": {"models": ["merged", "a", "b"], "embed_from": ["merged", "b"],
                     "repetitions": 1, "scaling": "none"},
    }  # fmt: skip
    space = build_space(read_space_spec(spec), models_of(llama), "base", depth(llama))
    sources = dict(space.source_genomes())
    assert set(sources) == {"b"}
    recipe = space.decode(sources["b"])
    assert recipe.embed_from == "b" and {s.model for s in recipe.path} == {"b"}
    assert space.decode(space.initial()).embed_from == "merged"
    # listed second, the PS result still needs the PS part's models loaded
    later = {**spec, "dataflow": {**spec["dataflow"], "embed_from": ["b", "merged"]}}
    space = build_space(read_space_spec(later), models_of(llama), "base", depth(llama))
    assert "base" in space.model_names() and space.decode(space.initial()).embed_from == "b"
