"""The worker path: a recipe written into a live model equals the streamed checkpoint, in place."""

import pytest
import torch

from evomerge.merge.engine import load_source_tensors, merge_into_model, merge_to_disk, plan_for
from evomerge.merge.io import ModelSource
from evomerge.recipe import Recipe

from .helpers import load_folder


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp", "della"])
def test_in_place_equals_disk_and_reuses_parameters(llama, tmp_path, method):
    from transformers import AutoModelForCausalLM

    params = {"weight": 0.5, "density": 0.6}
    models = [
        {"model": str(llama["ft0"]), "parameters": params},
        {"model": str(llama["ft1"]), "parameters": params},
    ]
    spec = {"merge_method": method, "base_model": str(llama["base"]), "models": models, "seed": 11}
    if method == "slerp":
        spec = {
            "merge_method": method,
            "base_model": str(llama["base"]),
            "parameters": {"t": [0.1, 0.9]},
            "models": [{"model": str(llama["base"])}, {"model": str(llama["ft0"])}],
        }
    recipe = Recipe.from_dict(spec)
    disk = load_folder(merge_to_disk(recipe, tmp_path / "out", progress=False, device="cpu"))

    sources = {ref: ModelSource(ref) for ref in recipe.referenced_models()}
    tensors = load_source_tensors(sources, "cpu")
    live = AutoModelForCausalLM.from_pretrained(llama["base"])
    before = {n: p.data_ptr() for n, p in live.named_parameters()}
    snapshot = {ref: {k: v.clone() for k, v in t.items()} for ref, t in tensors.items()}
    merge_into_model(plan_for(recipe, sources), tensors, live)
    state = live.state_dict()
    for name, expected in disk.items():
        assert torch.equal(state[name], expected), name
    assert before == {n: p.data_ptr() for n, p in live.named_parameters()}
    for ref in tensors:  # sources held by the worker are never modified
        assert all(torch.equal(tensors[ref][k], snapshot[ref][k]) for k in tensors[ref])
