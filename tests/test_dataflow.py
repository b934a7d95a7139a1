"""Data-flow merges export as plain checkpoints whose logits equal the explicitly scaled path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evomerge.cli import main
from evomerge.merge.engine import merge_to_disk
from evomerge.recipe import Recipe

from .helpers import scale_layer_inputs, write_recipe

# Folding is exact up to the norms' epsilon; tiny random models have a small stream, where
# epsilon is not negligible, so both sides are compared without it.
NO_EPS = 1e-30
PATH = [("a", 0, 1.0), ("b", 2, 0.83), ("a", 1, 1.12), ("c", 3, 0.9), ("b", 0, 1.3)]


def dataflow(m, path=PATH, **extra) -> dict:
    return {
        "merge_method": "dataflow",
        "embed_from": "a",
        "tokenizer_source": "a",
        "models": {"a": str(m["base"]), "b": str(m["ft0"]), "c": str(m["ft1"])},
        "path": [{"model": mod, "layer": layer, "scale": scale} for mod, layer, scale in path],
        **extra,
    }


def scaled_reference(m, tmp_path):
    """The same path with unit scales (no folding), and hooks that scale the stream explicitly."""
    from transformers import AutoModelForCausalLM

    plain = dataflow(m, [(mod, layer, 1.0) for mod, layer, _ in PATH])
    folder = merge_to_disk(
        Recipe.from_dict(plain), tmp_path / "plain", progress=False, device="cpu"
    )
    model = AutoModelForCausalLM.from_pretrained(folder, rms_norm_eps=NO_EPS)
    scale_layer_inputs(model, [scale for _, _, scale in PATH])
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_folded_logits_equal_explicit_scaling(families, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    m = families[arch]
    out = merge_to_disk(
        Recipe.from_dict(dataflow(m)), tmp_path / "folded", progress=False, device="cpu"
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(PATH)
    if "layer_types" in config:
        assert len(config["layer_types"]) == len(PATH)
    folded = AutoModelForCausalLM.from_pretrained(out, rms_norm_eps=NO_EPS).eval()
    reference = scaled_reference(m, tmp_path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = folded(ids).logits, reference(ids).logits
    rel = float((got - want).norm() / want.norm())
    assert rel <= 1e-4, rel
    unscaled = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", rms_norm_eps=NO_EPS).eval()
    with torch.no_grad():
        assert float((unscaled(ids).logits - want).norm() / want.norm()) > 1e-3  # scales matter


def test_generate_with_cache_equals_without(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge_to_disk(
        Recipe.from_dict(dataflow(llama)), tmp_path / "f", progress=False, device="cpu"
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 258}
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_bad_dataflow_input(llama, tmp_path, capsys):
    unsupported = tmp_path / "gemma_like"
    shutil.copytree(llama["base"], unsupported)
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["architectures"] = ["Gemma2ForCausalLM"]
    (unsupported / "config.json").write_text(json.dumps(cfg))
    cases = {
        "out of range": (dataflow(llama, [("a", 0, 1.0), ("b", 9, 1.0)]), "out of range"),
        "bad scale": (dataflow(llama, [("a", 0, 0.0)]), "scale must be finite and > 0"),
        "empty path": (dataflow(llama, []), "non-empty 'path'"),
        "unknown model": (dataflow(llama, [("z", 0, 1.0)]), "'z' is not a key"),
        "unsupported": (
            {
                **dataflow(llama),
                "models": {"a": str(unsupported), "b": str(unsupported), "c": str(unsupported)},
            },
            "Gemma2ForCausalLM",
        ),
    }
    for name, (data, expected) in cases.items():
        code = main(["merge", str(write_recipe(tmp_path, data)), str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "out").exists()


def test_bad_dataflow_models_mismatch(llama, tmp_path, capsys):
    from .family import make_family

    wide = make_family(tmp_path / "wide", "llama", n_finetunes=0, seed=5, hidden=96, heads=4)
    big_vocab = make_family(tmp_path / "vocab", "llama", n_finetunes=0, seed=6, vocab=300)
    capsys.readouterr()
    for other, expected in ((wide, "hidden_size 96 differs"), (big_vocab, "vocab_size 300")):
        data = dataflow(llama)
        data["models"]["c"] = str(other["base"])
        code = main(["merge", str(write_recipe(tmp_path, data)), str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "models.c" in err and expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def nested_ps(m) -> dict:
    """A stochastic parameter-space merge, to be read by a data-flow path."""
    return {
        "merge_method": "dare_ties",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["ft0"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(m["ft1"]), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "seed": 7,
    }


def test_ps_then_dfs_in_one_recipe_equals_two_steps(llama, tmp_path):
    """A nested PS recipe gives the same bytes as merging it to disk and pointing the path at it."""
    from .helpers import load_folder

    one_file = dataflow(llama)
    one_file["models"]["b"] = nested_ps(llama)
    one_file["embed_from"] = "b"
    got = merge_to_disk(Recipe.from_dict(one_file), tmp_path / "one", progress=False)

    ps = merge_to_disk(Recipe.from_dict(nested_ps(llama)), tmp_path / "ps", progress=False)
    two_steps = dataflow(llama)
    two_steps["models"]["b"] = str(ps)
    two_steps["embed_from"] = "b"
    want = merge_to_disk(Recipe.from_dict(two_steps), tmp_path / "two", progress=False)

    got_t, want_t = load_folder(got), load_folder(want)
    assert got_t.keys() == want_t.keys()
    assert all(torch.equal(got_t[k], want_t[k]) for k in want_t)
    saved = Recipe.from_yaml(got / "evomerge_recipe.yaml")
    assert saved.models["b"].merge_method == "dare_ties" and saved.models["b"].seed == 7


def merged_in_memory(recipe: Recipe, shape_from) -> dict[str, torch.Tensor]:
    """`recipe` written into a live model (of the folder `shape_from`'s shape, zeroed first)."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import load_source_tensors, merge_into_model, plan_for
    from evomerge.merge.io import ModelSource

    sources = {ref: ModelSource(ref) for ref in recipe.referenced_models()}
    tensors = load_source_tensors(sources, "cpu")
    live = AutoModelForCausalLM.from_pretrained(shape_from)
    with torch.no_grad():
        for p in live.parameters():
            p.zero_()
    merge_into_model(plan_for(recipe, sources), tensors, live)
    return live.state_dict()


def test_nested_recipe_in_memory_equals_disk(llama, tmp_path):
    from .helpers import load_folder

    data = dataflow(llama)
    data["models"]["c"] = nested_ps(llama)
    recipe = Recipe.from_dict(data)
    disk = load_folder(merge_to_disk(recipe, tmp_path / "out", progress=False))
    state = merged_in_memory(recipe, tmp_path / "out")
    assert all(torch.equal(state[k], v) for k, v in disk.items())


def test_bad_nested_recipe_names_its_model(llama, tmp_path, capsys):
    data = dataflow(llama)
    data["models"]["b"] = {**nested_ps(llama), "merge_method": "tiez"}
    code = main(["merge", str(write_recipe(tmp_path, data)), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "models.b" in err and "tiez" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def second_nested_ps(m) -> dict:
    """Another stochastic merge of the same family, with its own seed."""
    return {
        "merge_method": "della",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["ft1"]), "parameters": {"weight": 0.7, "density": 0.6}},
            {"model": str(m["ft2"]), "parameters": {"weight": 0.5, "density": 0.4}},
        ],
        "parameters": {"epsilon": 0.1},
        "seed": 11,
    }


def test_two_nested_recipes_equal_merging_each_to_a_folder_first(llama, tmp_path):
    """A path over two PS merges: the same bytes on disk and in a live model as merging each PS
    recipe to its own folder and pointing the path at those folders."""
    from .helpers import load_folder

    path = [("m1", 0, 1.0), ("m2", 1, 0.8), ("a", 2, 1.0), ("m1", 3, 1.2), ("m2", 3, 1.0)]
    one_file = dataflow(llama, path)
    one_file["models"] = {
        "a": str(llama["base"]),
        "m1": nested_ps(llama),
        "m2": second_nested_ps(llama),
    }
    one_file["embed_from"] = "m2"
    recipe = Recipe.from_dict(one_file)
    got = load_folder(merge_to_disk(recipe, tmp_path / "one", progress=False))

    first = merge_to_disk(Recipe.from_dict(nested_ps(llama)), tmp_path / "m1", progress=False)
    second = merge_to_disk(
        Recipe.from_dict(second_nested_ps(llama)), tmp_path / "m2", progress=False
    )
    folders = {"a": str(llama["base"]), "m1": str(first), "m2": str(second)}
    two_steps = {**one_file, "models": folders}
    want = load_folder(merge_to_disk(Recipe.from_dict(two_steps), tmp_path / "two", progress=False))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    state = merged_in_memory(recipe, tmp_path / "one")
    assert all(torch.equal(state[k], v) for k, v in want.items())
