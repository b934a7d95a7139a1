"""Bounded merge memory: large tensors merged in row chunks give the very weights of a whole
merge, and sources kept on the host are accounted for and placed as the memory model says."""

from __future__ import annotations

import pytest
import torch

from evomerge.config import RunConfig
from evomerge.merge.engine import load_source_tensors, merge_into_model, merge_to_disk, plan_for
from evomerge.merge.io import ModelSource
from evomerge.merge.ops import row_chunks
from evomerge.recipe import Recipe
from evomerge.search.prepare import prepare
from evomerge.workers.footprint import Footprint, check_fits, predict, sources_placement

from .helpers import load_folder
from .test_run import run_config

GIB = 2**30
TINY = 4096  # bytes per input piece: every matrix of the tiny models is split into many chunks


def recipe_of(llama, method: str, **shared) -> Recipe:
    if method in ("nearswap",):
        return Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": str(llama["base"]),
                "parameters": {"t": 0.003},
                "models": [{"model": str(llama["base"])}, {"model": str(llama["ft0"])}],
            }
        )
    density = {} if method in ("linear", "task_arithmetic") else {"density": 0.4}
    models = [
        {"model": str(llama[f"ft{i}"]), "parameters": {**density, "weight": 0.7 - 0.2 * i}}
        for i in range(3)
    ]
    spec = {"merge_method": method, "models": models, "seed": 5, "parameters": shared}
    if method != "linear":
        spec["base_model"] = str(llama["base"])
    return Recipe.from_dict(spec)


CASES = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("dare_ties", {"rescale": False}),  # random masks: each chunk draws its own entries' bits
    ("dare_linear", {"rescale": False}),
    ("nearswap", {}),
    ("ties", {}),  # a magnitude top-k sees the whole tensor: never chunked, still equal
    ("dare_ties", {}),  # L1 rescaling sees the whole tensor too
]


@pytest.mark.parametrize("method,shared", CASES)
def test_row_chunked_merges_are_bit_equal_to_whole_ones(llama, tmp_path, method, shared):
    recipe = recipe_of(llama, method, **shared)
    sources = {ref: ModelSource(ref) for ref in recipe.referenced_models()}
    plan = plan_for(recipe, sources)
    chunked = sum(len(row_chunks(op, plan.method, TINY)) > 1 for op in plan.ops)
    entrywise = (
        method not in ("ties",)
        and shared.get("rescale", True) is False
        or method
        in (
            "linear",
            "task_arithmetic",
            "nearswap",
        )
    )
    assert (chunked > 0) == entrywise
    for op in plan.ops:  # the chunks cover every row once, in order
        pieces = row_chunks(op, plan.method, TINY)
        if pieces != [None]:
            assert [r.start for r in pieces] == [0, *[r.stop for r in pieces[:-1]]]
            assert pieces[-1].stop == op.shape[0]

    from transformers import AutoModelForCausalLM

    tensors = load_source_tensors(sources, "cpu")
    whole = AutoModelForCausalLM.from_pretrained(llama["base"])
    merge_into_model(plan, tensors, whole, chunk_bytes=None)
    pieces = AutoModelForCausalLM.from_pretrained(llama["ft2"])  # other weights to overwrite
    merge_into_model(plan, tensors, pieces, chunk_bytes=TINY)
    expected = whole.state_dict()
    for name, value in pieces.state_dict().items():
        assert torch.equal(value, expected[name]), name

    disk = load_folder(
        merge_to_disk(recipe, tmp_path / "out", progress=False, device="cpu", chunk_bytes=TINY)
    )
    for name, value in disk.items():
        assert torch.equal(value, expected[name].to(value.dtype)), name


def test_the_start_recipes_chunks_bound_the_predicted_temporaries(llama):
    data = run_config(
        llama,
        search_space={
            "kind": "parameter",
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 1.0, "init": 0.5}},
        },
    )
    resolved, space = prepare(RunConfig.from_dict(data))
    whole = predict(resolved.model_copy(update={"merge_chunk_mib": 1024}), space)
    # the tiny models' largest tensor (the embeddings) is far below a MiB: one chunk, whole
    assert whole.temporaries == predict(resolved, space).temporaries
    largest = max(
        info.shape[0] * info.shape[1]
        for info in ModelSource(str(llama["base"])).index.values()
        if len(info.shape) == 2
    )
    assert whole.temporaries == (3 + 3) * largest * 4


def test_host_sources_leave_the_device_the_live_model_and_temporaries(monkeypatch):
    footprint = Footprint(sources=30 * GIB, live=8 * GIB, temporaries=2 * GIB, sources_on="host")
    assert footprint.reserve == 10 * GIB
    assert "pinned host 30.00 GiB" in footprint.describe()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 24 * GIB))
    config = RunConfig.from_dict(
        {
            "models": {"a": "x"},
            "search_space": "s.yml",
            "objectives": [{"name": "n", "metric": "n"}],
            "optimizer": {"name": "cma"},
            "budget": 1,
            "fitness": {"function": "m:f"},
            "device": "cuda",
            "pool": "local",
        }
    )
    assert check_fits(footprint, config) is None  # 10 GiB on a GPU with 20 free
    on_device = Footprint(30 * GIB, 8 * GIB, 2 * GIB, sources_on="device")
    assert "each GPU needs 40.00 GiB" in check_fits(on_device, config)

    cuda = torch.device("cuda")
    assert sources_placement("auto", cuda, 8 * GIB, 9 * GIB) == "device"  # 17 <= 0.9 x 20
    assert sources_placement("auto", cuda, 30 * GIB, 10 * GIB) == "host"
    assert sources_placement("device", cuda, 30 * GIB, 10 * GIB) == "device"  # as told
    assert sources_placement("auto", torch.device("cpu"), 30 * GIB, 10 * GIB) == "device"


def test_a_worker_with_host_sources_scores_what_one_with_device_sources_does(llama):
    from evomerge.workers.evaluator import Evaluator

    recipe = recipe_of(llama, "dare_ties", rescale=False)
    refs = list(recipe.referenced_models())
    scores = []
    for where in ("device", "host"):
        worker = Evaluator(refs, {"function": "tests.fitness_fns:score"}, sources_on=where)
        assert worker.sources_on == where
        scores.append(worker.evaluate(recipe.to_yaml()).metrics)
    assert scores[0] == scores[1] and scores[0]


def test_a_worker_spanning_devices_spreads_its_layers_and_scores_the_same(llama):
    """gpus_per_worker 2+: the live model's decoder layers in contiguous runs over the devices,
    the rest on the first, activations moved by hooks; logits equal a one-device model's (on a
    CPU both "devices" are the CPU, with the hooks forced on)."""
    from evomerge.merge.engine import merge_into_model
    from evomerge.merge.live import build_live_model, spread_layers

    recipe = recipe_of(llama, "task_arithmetic")
    sources = {ref: ModelSource(ref) for ref in recipe.referenced_models()}
    plan = plan_for(recipe, sources)
    tensors = load_source_tensors(sources, "cpu")
    cpu = torch.device("cpu")
    one = build_live_model(plan.output_config(), cpu, torch.float32, False)
    two = build_live_model(plan.output_config(), cpu, torch.float32, False, [cpu, cpu])
    assert hasattr(two, "hf_device_map") and not hasattr(one, "hf_device_map")
    for model in (one, two):
        merge_into_model(plan, tensors, model)
    ids = torch.arange(24).reshape(2, 12) % one.config.vocab_size
    with torch.no_grad():
        assert torch.equal(one(ids).logits, two(ids).logits)

    devices = ["gpu0", "gpu1", "gpu2"]
    depth = one.config.num_hidden_layers
    spread = spread_layers(one, devices)
    runs = [spread[f"model.layers.{i}"] for i in range(depth)]
    assert runs == sorted(runs) and set(runs) == set(devices)  # contiguous runs, all used
    outside = {k: v for k, v in spread.items() if ".layers." not in k}
    assert set(outside.values()) == {"gpu0"} and "lm_head" in outside


def test_gpus_per_worker_above_one_takes_whole_gpus(llama, capsys):
    from .test_run import expect_error, write

    for value, ok in ((0.5, True), (2, True), (1.5, False)):
        data = run_config(llama, gpus_per_worker=value)
        if ok:
            assert RunConfig.from_dict(data).gpus_per_worker == value
        else:
            import tempfile
            from pathlib import Path

            folder = Path(tempfile.mkdtemp())
            line = expect_error(["run", str(write(folder, data))], capsys, "gpus_per_worker")
            assert "whole number" in line
