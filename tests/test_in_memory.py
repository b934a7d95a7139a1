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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_the_uninitialised_live_model_scores_what_the_checkpoint_does(families, tmp_path, arch):
    """The worker's live model is built without initialisation (parameters on the meta device,
    then empty storage) and written by the plan: its logits equal the exported checkpoint's."""
    from transformers import AutoModelForCausalLM

    from evomerge.workers.evaluator import Evaluator

    family = families[arch]
    params = {"weight": 0.6, "density": 0.5}
    recipe = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[f"ft{i}"]), "parameters": params} for i in (0, 1)],
        }
    )
    refs = [str(family[name]) for name in ("base", "ft0", "ft1")]
    worker = Evaluator(refs, {"function": "tests.fitness_fns:score"}, device="cpu")
    live, _ = worker.materialize(recipe)
    exported = AutoModelForCausalLM.from_pretrained(
        merge_to_disk(recipe, tmp_path / "out", progress=False, device="cpu")
    )
    ids = torch.arange(0, 48).reshape(2, 24) % 250
    with torch.no_grad():
        assert torch.equal(live(ids).logits, exported(ids).logits)
    if arch == "qwen2":
        assert live.lm_head.weight is live.model.embed_tokens.weight  # still one tensor


def test_a_recipe_that_leaves_a_tensor_unwritten_is_refused_by_name(families, tmp_path):
    """Sources whose checkpoints lack a tensor of their architecture: the live model would
    score uninitialised memory there, so the evaluation fails naming the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.workers.evaluator import Evaluator

    refs = []
    for name in ("base", "ft0", "ft1"):
        folder = shutil.copytree(families["mistral"][name], tmp_path / name)
        for shard in folder.glob("*.safetensors"):
            state = load_file(shard)
            state.pop("model.norm.weight", None)
            save_file(state, shard, metadata={"format": "pt"})
        refs.append(str(folder))
    worker = Evaluator(refs, {"function": "tests.fitness_fns:score"}, device="cpu")
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": refs[0],
            "models": [{"model": ref, "parameters": {"weight": 0.5}} for ref in refs[1:]],
        }
    )
    outcome = worker.evaluate(recipe.to_yaml())
    assert outcome.error is not None and "'model.norm.weight'" in outcome.error
    assert "unwritten" in outcome.error


def test_a_worker_that_cannot_find_a_source_names_its_node_and_the_path(llama, tmp_path):
    """On a cluster a local path must exist on every node that runs a worker: a worker that
    cannot open one says which node it runs on and which path it looked for."""
    import socket

    from evomerge.errors import EvomergeError
    from evomerge.workers.evaluator import Evaluator

    missing = tmp_path / "only-on-the-head-node"
    with pytest.raises(EvomergeError) as caught:
        Evaluator(
            [str(llama["base"]), str(missing)],
            {"function": "tests.fitness_fns:score"},
            name="worker-3.1",
        )
    message = str(caught.value)
    assert f"worker worker-3.1 on node {socket.gethostname()}" in message
    assert str(missing) in message and "no such folder" in message
