"""Learned merges (DAM, AdaMerging) against their equations, written out here independently:
the merged weight is sum_i c_i * W_i (DAM) or theta_0 + sum_k lambda_k tau_k (AdaMerging) from
the stored coefficient file; the training losses equal a KL and an entropy computed here, and a
few steps lower them; lambdas stay in [0, 1]; the learned folder re-merges bit for bit on disk
and in a live model; bad input ends in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.learn.command import _load, learned_recipe
from evomerge.learn.train import (
    TrainSettings,
    answer_entropy,
    kl_to_source,
    similarity_penalty,
    train_adamerging,
    train_dam,
)
from evomerge.merge.engine import load_source_tensors, merge_into_model, merge_to_disk, plan_for
from evomerge.merge.io import ModelSource
from evomerge.merge.learned import write_coefficients
from evomerge.merge.live import build_live_model
from evomerge.merge.methods import MergeInputs, get_method
from evomerge.recipe import Recipe

from .helpers import load_folder
from .test_run import expect_error, run_config, write
from .test_workers import make_tasks


def texts_of(tmp_path, name: str, words: str, count: int = 4):
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(f"{words} {n} {words}\n" for n in range(count)))
    return str(path)


def learn_config(llama, tmp_path, **changes) -> dict:
    tasks = make_tasks(tmp_path / "tasks")
    calibration = {
        "files": {
            "a": texts_of(tmp_path, "a", "alpha beta"),
            "b": texts_of(tmp_path, "b", "gamma delta"),
        }
    }
    fitness = {
        "kind": "lm_eval",
        "tasks": ["parity_fit"],
        "include_path": str(tasks),
        "batch_size": 4,
        "held_out": {"tasks": ["parity_held"]},
    }
    objectives = [{"name": "parity", "metric": "parity_fit: acc,none"}]
    config = run_config(llama, calibration=calibration, fitness=fitness, objectives=objectives)
    config.update(changes)
    return config


def method_fn(name, base, others, stats, scales=None):
    scales = scales or [1.0] * len(others)
    inputs = MergeInputs(base, [o.clone() for o in others], {}, [{"scale": s} for s in scales])
    inputs.stats = stats
    return get_method(name).fn(inputs)


def test_dam_is_the_column_scaled_sum_and_adamerging_the_clamped_task_vectors():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    ws = [torch.randn(4, 6) for _ in range(3)]
    cs = [torch.rand(6) for _ in ws]
    expected = sum(c[None, :] * w for c, w in zip(cs, ws))
    assert torch.allclose(method_fn("dam", None, ws, cs), expected)
    scaled = sum(s * c[None, :] * w for s, c, w in zip((0.5, 1.0, 2.0), cs, ws))
    assert torch.allclose(method_fn("dam", None, ws, cs, [0.5, 1.0, 2.0]), scaled, atol=1e-6)
    # a tensor with no coefficients: the base when there is one, else the mean
    assert torch.equal(method_fn("dam", base, ws, [None] * 3), base)
    assert torch.allclose(method_fn("dam", None, ws, [None] * 3), sum(ws) / 3)
    lambdas = [torch.tensor(0.25), torch.tensor(1.7), torch.tensor(-0.3)]  # clamped to [0, 1]
    expected = base + 0.25 * (ws[0] - base) + 1.0 * (ws[1] - base)
    assert torch.allclose(method_fn("adamerging", base, ws, lambdas), expected, atol=1e-6)


def test_dam_loss_is_the_tempered_kl_and_a_few_steps_lower_it(llama, tmp_path):
    config = RunConfig.from_dict(learn_config(llama, tmp_path, base_model=None))
    sources, tokenizer = _load(config, ["a", "b"], torch.device("cpu"))
    torch.manual_seed(0)
    merged, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t = 2.0
    expected, kept = 0.0, 0
    for row in range(2):
        for pos in range(5):
            if mask[row, pos]:
                p = torch.softmax(teacher[row, pos] / t, -1)
                q = torch.softmax(merged[row, pos] / t, -1)
                expected += float((p * (p.log() - q.log())).sum())
                kept += 1
    assert float(kl_to_source(merged, teacher, mask)) == pytest.approx(expected / kept * t * t)
    vectors = {"w": [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]}
    assert float(similarity_penalty(vectors)) == pytest.approx(2**-0.5)
    texts = {"a": ["alpha beta 1 alpha beta"] * 4, "b": ["gamma delta 2 gamma"] * 4}
    settings = TrainSettings(steps=6, lr=0.05, batch_size=4, progress=False)
    before = {
        n: {k: t.detach().clone() for k, t in ts.items()} for n, ts in sources.tensors.items()
    }
    learned = train_dam(sources, tokenizer, ["a", "b"], texts, None, settings)
    kls = [row["kl a"] + row["kl b"] for row in learned.log]
    assert kls[-1] < kls[0]
    # the sources are frozen: no tensor of theirs changed or holds a gradient
    assert all(
        torch.equal(t, before[n][k]) and t.grad is None
        for n, tensors in sources.tensors.items()
        for k, t in tensors.items()
    )
    linear = sources.linear_weights()
    assert set(learned.coefficients) == set(linear)  # linear layers only, by default
    name = linear[0]
    assert learned.coefficients[name][0].shape == (sources.tensors["a"][name].shape[-1],)
    assert learned.summary["tokens_backward"] > 0


def test_adamerging_entropy_is_the_answer_entropy_lower_after_steps_lambdas_clamped(
    llama, tmp_path
):
    config = RunConfig.from_dict(learn_config(llama, tmp_path))
    sources, tokenizer = _load(config, ["base", "a", "b"], torch.device("cpu"))
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rows = [logits[0, 2], logits[1, 3]]  # the last kept token answers
    expected = sum(float(-(F.softmax(r, -1) * F.log_softmax(r, -1)).sum()) for r in rows) / 2
    assert float(answer_entropy(logits, mask)) == pytest.approx(expected, rel=1e-5)
    prompts = [f"Is {n} even?" for n in range(8)]
    settings = TrainSettings(steps=8, lr=0.3, batch_size=8, progress=False)
    learned = train_adamerging(sources, tokenizer, "base", ["a", "b"], prompts, settings)
    assert learned.log[-1]["loss"] < learned.log[0]["loss"]
    values = torch.stack([v for vs in learned.coefficients.values() for v in vs])
    assert values.min() >= 0 and values.max() <= 1
    assert ((values == 0) | (values == 1)).any()  # steps of 0.3 from 0.3 reached a bound
    layers = {n: vs for n, vs in learned.coefficients.items() if ".layers.0." in n}
    first = next(iter(layers.values()))
    assert all(torch.equal(vs[0], first[0]) for vs in layers.values())  # one lambda per layer


@pytest.mark.parametrize("method", ["dam", "adamerging"])
def test_learn_writes_a_folder_that_remerges_bit_identically(method, llama, tmp_path, capsys):
    config = write(tmp_path, learn_config(llama, tmp_path))
    out = tmp_path / "learned"
    args = ["learn", str(config), "--method", method, "--out", str(out), "--steps", "2"]
    assert main([*args, "--quiet"]) == 0
    assert f"{method}: 2 steps" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "evomerge_recipe.yaml", "learned"} <= names
    assert any(n.startswith("tokenizer") for n in names)
    log = [json.loads(line) for line in (out / "learned/learn_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    recipe = yaml.safe_load((out / "evomerge_recipe.yaml").read_text())
    assert recipe["coefficients"] == "learned/coefficients.safetensors"
    weights = load_folder(out)
    # the stored weight equals the equation computed here from the stored coefficients
    name = "model.layers.0.mlp.up_proj.weight"
    sources = {k: load_folder(llama[v]) for k, v in (("base", "base"), ("a", "ft0"), ("b", "ft1"))}
    with safe_open(str(out / "learned/coefficients.safetensors"), "pt") as handle:
        c = [handle.get_tensor(f"{i}:{name}") for i in range(2)]
        meta = handle.metadata()
    assert json.loads(meta["models"]) == [str(llama["ft0"]), str(llama["ft1"])]
    if method == "dam":
        expected = c[0] * sources["a"][name] + c[1] * sources["b"][name]
    else:
        b = sources["base"][name]
        expected = b + c[0] * (sources["a"][name] - b) + c[1] * (sources["b"][name] - b)
    assert torch.allclose(weights[name], expected, atol=1e-6)
    # the folder's recipe re-merges it bit for bit, on disk and in a live model
    again = tmp_path / "again"
    assert main(["merge", str(out / "evomerge_recipe.yaml"), str(again), "--quiet"]) == 0
    remerged = load_folder(again)
    assert all(torch.equal(remerged[k], weights[k]) for k in weights)
    plan_recipe = Recipe.from_yaml(out / "evomerge_recipe.yaml")
    plan_recipe = plan_recipe.model_copy(
        update={"coefficients": str(out / "learned/coefficients.safetensors")}
    )
    sources_open = {r: ModelSource(r) for r in plan_recipe.referenced_models()}
    plan = plan_for(plan_recipe, sources_open)
    model = build_live_model(plan.output_config(), torch.device("cpu"), torch.float32, False)
    merge_into_model(plan, load_source_tensors(sources_open, "cpu"), model, chunk_bytes=4096)
    live = model.state_dict()
    assert all(torch.equal(live[k], weights[k]) for k in weights)


def test_learn_refuses_bad_input_in_one_line_writing_nothing(llama, tmp_path, capsys):
    out = tmp_path / "learned"

    def refused(config, method, *needles):
        path = write(tmp_path, config)
        expect_error(["learn", str(path), "--method", method, "--out", str(out)], capsys, *needles)
        assert not out.exists() and not list(tmp_path.glob(".learned*"))

    good = learn_config(llama, tmp_path)
    no_b = {**good, "calibration": {"files": {"a": good["calibration"]["files"]["a"]}}}
    refused(no_b, "dam", "calibration.files", "'b'")
    refused({**good, "calibration": None}, "dam", "field 'calibration'")
    held = tmp_path / "held.txt"
    held.write_text("some text then Is 103 even? and more\n")
    leaky = {**good, "calibration": {"files": {**good["calibration"]["files"], "b": str(held)}}}
    refused(leaky, "dam", "calibration.files.b", "held-out task parity_held")
    refused({**good, "base_model": None}, "adamerging", "base_model")
    python_fitness = {**good, "fitness": {"function": "tests.fitness_fns:score"}}
    refused(python_fitness, "adamerging", "field 'fitness'")
    leaky_tasks = make_tasks(tmp_path / "leaky_tasks")  # a held-out document among the fitness's
    with open(leaky_tasks / "parity_fit.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Is 103 even?", "choices": [" yes", " no"], "answer": 1}))
    leaky_fitness = {**good["fitness"], "include_path": str(leaky_tasks)}
    refused({**good, "fitness": leaky_fitness}, "adamerging", "fitness.tasks", "held-out")
    convolutional = gpt2_family(tmp_path / "gpt2")  # GPT-2's blocks are Conv1D, its head tied
    no_linear = {**good, "models": convolutional, "base_model": None}
    refused(no_linear, "dam", "GPT2LMHeadModel", "no torch.nn.Linear layers", "adamerging")
    nested = tmp_path / "not" / "yet" / "learned"
    expect_error(["learn", str(write(tmp_path, no_linear)), "--method", "dam", "--out",
                  str(nested)], capsys, "no torch.nn.Linear")  # fmt: skip
    assert not (tmp_path / "not").exists()  # not even the output's parent folders
    out.mkdir()
    path = write(tmp_path, good)
    expect_error(["learn", str(path), "--method", "dam", "--out", str(out)], capsys, "exists")


def gpt2_family(folder) -> dict[str, str]:
    """Two tiny GPT-2 models: no torch.nn.Linear outside the (tied) head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)
        GPT2LMHeadModel(config).save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def test_a_learned_recipe_without_its_file_or_for_other_models_is_refused(llama, tmp_path):
    config = RunConfig.from_dict(learn_config(llama, tmp_path))

    recipe = learned_recipe(config, "dam", tmp_path / "missing.safetensors")
    with pytest.raises(EvomergeError, match="field 'coefficients'"):
        merge_to_disk(recipe, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    # a file learned for the same models in another order, or by the other method
    name = "model.layers.0.mlp.up_proj.weight"
    path = write_coefficients(
        tmp_path / "c.safetensors", "dam", [str(llama["ft1"]), str(llama["ft0"])], None,
        {name: [torch.ones(64), torch.ones(64)]},
    )  # fmt: skip
    for method, needle in (("dam", "same models, same order"), ("adamerging", "holds dam")):
        recipe = learned_recipe(config, method, path)
        with pytest.raises(EvomergeError, match=needle):
            merge_to_disk(recipe, tmp_path / "x", progress=False)
        assert not (tmp_path / "x").exists()


def test_a_run_learns_its_baselines_once_and_searches_over_the_learned_merge(
    llama, tmp_path, capsys
):
    hybrid = {
        "kind": "parameter",
        "method": "dam",
        "parameters": {"scale": {"low": 0.5, "high": 1.5, "init": 1.0}},
        "layer_groups": 2,
    }
    config = learn_config(
        llama,
        tmp_path,
        search_space=hybrid,
        baselines=["average", "dam", "adamerging"],
        learning={"steps": 2, "batch_size": 4},
        optimizer={"name": "cma", "options": {"population_size": 2}},
        budget=3,
    )
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    for method in ("dam", "adamerging"):
        assert (out / "learned" / method / "coefficients.safetensors").is_file()
        assert (out / "learned" / method / "learn_log.jsonl").is_file()
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"dam", "adamerging", "average"} <= set(data["baselines"])
    for name in ("dam", "adamerging"):
        scored = data["baselines"][name]
        assert scored["learned"]["method"] == name and scored["learned"]["steps"] == 2
        assert (
            0 <= scored["values"]["parity"] <= 1 and "parity_held: acc,none" in scored["held_out"]
        )
    # status and the report mark the learned baselines as such
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "learned (dam)" in text and "learned (adamerging)" in text
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "learned dam (2 steps)" in page and "learned adamerging (2 steps)" in page
    # the search started from the learned merge itself: its first candidate is the dam baseline
    from evomerge.results.store import RunStore

    records = RunStore.open(out).records()
    assert (
        records[0].origin == "baseline" and records[0].values == data["baselines"]["dam"]["values"]
    )
    # the hybrid at genes 1.0 is the learned merge bit for bit
    from evomerge.search.run import open_run

    run = open_run(out)
    at_one = run.space.decode(np.ones(run.space.size), seed=0)
    learned = Recipe.from_dict(next(b.recipe for b in run.config.baselines if b.name == "dam"))
    merge_to_disk(at_one, tmp_path / "hybrid", progress=False)
    merge_to_disk(learned, tmp_path / "dam", progress=False)
    a, b = load_folder(tmp_path / "hybrid"), load_folder(tmp_path / "dam")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a resume learns nothing again
    stamp = (out / "learned" / "dam" / "coefficients.safetensors").stat().st_mtime_ns
    assert main(["resume", str(out), "--quiet"]) == 0
    assert (out / "learned" / "dam" / "coefficients.safetensors").stat().st_mtime_ns == stamp
    # an exported model carries its coefficients and re-merges from its own recipe
    assert (
        main(["export", str(out), "--id", "0", "--to", str(tmp_path / "exports"), "--quiet"]) == 0
    )
    exported = next((tmp_path / "exports").iterdir())
    assert (exported / "learned" / "coefficients.safetensors").is_file()
    again = tmp_path / "again"
    assert main(["merge", str(exported / "evomerge_recipe.yaml"), str(again), "--quiet"]) == 0
    x, y = load_folder(exported), load_folder(again)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_references_from_lends_a_learned_merge_only_when_it_learned_alike(llama, tmp_path):
    from evomerge.learn.in_run import borrowed, learns_alike, same_merge

    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    data = learn_config(llama, tmp_path, learning={"steps": 3})
    for folder in (theirs, mine):
        folder.mkdir()
        (folder / "run.yaml").write_text(yaml.safe_dump(data))
    config = RunConfig.from_dict({**data, "references_from": str(theirs)})
    refs = [config.models[n] for n in ("a", "b")]
    write_coefficients(
        theirs / "learned" / "dam" / "coefficients.safetensors", "dam", refs,
        config.models["base"], {"w": [torch.ones(2), torch.ones(2)]},
    )  # fmt: skip
    path = (mine / "learned" / "dam" / "coefficients.safetensors").resolve()
    assert borrowed(config, mine, path) == theirs / "learned" / "dam" / "coefficients.safetensors"
    # the same text under another file name is the same data; other steps are not
    copy = tmp_path / "copy.txt"
    copy.write_text((tmp_path / "a.txt").read_text())
    moved = {**data, "calibration": {"files": {**data["calibration"]["files"], "a": str(copy)}}}
    assert learns_alike(RunConfig.from_dict(moved), RunConfig.from_dict(data))
    longer = RunConfig.from_dict({**data, "learning": {"steps": 4}, "references_from": str(theirs)})
    assert not learns_alike(longer, RunConfig.from_dict(data))
    assert borrowed(longer, mine, path) is None
    # a learned recipe is the same merge in both runs, each naming its own file
    file = theirs.resolve() / "learned" / "dam" / "coefficients.safetensors"
    recipe = f"merge_method: dam\ncoefficients: {file}\n"
    assert same_merge(
        recipe, recipe.replace(str(theirs.resolve()), str(mine.resolve())), theirs.resolve(), mine
    )
    assert not same_merge(recipe, recipe.replace("dam\n", "adamerging\n", 1), theirs, mine)


def test_a_ray_run_learns_on_a_worker_and_the_driver_only_stores(llama, tmp_path, monkeypatch):
    """In a run the learned merges train on a worker's device (where a cluster's GPUs are):
    with the driver's own model loading broken the run still learns, and the file equals the
    same training done here."""
    import evomerge.learn.command as command
    from evomerge.learn.command import learn
    from evomerge.merge.learned import Coefficients

    config = learn_config(
        llama,
        tmp_path,
        pool="ray",
        workers=1,
        threads_per_worker=1,
        baselines=["dam"],
        learning={"steps": 2, "batch_size": 4},
        budget=1,
    )
    here = learn(RunConfig.from_dict(config), "dam", TrainSettings(steps=2, batch_size=4,
                                                                    progress=False))  # fmt: skip

    def loaded_here(*args, **kwargs):
        raise AssertionError("the driver loaded the models to train")

    monkeypatch.setattr(command, "_load", loaded_here)
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    stored = Coefficients(out / "learned" / "dam" / "coefficients.safetensors")
    assert stored.trained["device"] == "cpu" and stored.trained["steps"] == 2
    refs = [str(llama["ft0"]), str(llama["ft1"])]
    for name, values in here.coefficients.items():
        for ref, value in zip(refs, values):
            assert torch.allclose(stored.get(ref, "dam", name), value, atol=1e-6), name


def test_a_run_that_learns_counts_training_in_its_memory_line_and_fit_check(
    llama, tmp_path, monkeypatch
):
    """The worker that trains holds its sources and the training (the base and two experts in
    fp32, the merged weights twice, a batch's activations and logits); a machine with room to
    score but not to train refuses the run in its first line."""
    import psutil

    from evomerge.baselines import baseline_recipes
    from evomerge.learn.in_run import learning_bytes
    from evomerge.search.prepare import prepare
    from evomerge.workers.footprint import announce, check_fits

    folder = tmp_path / "run"
    data = learn_config(llama, tmp_path, baselines=["dam"])
    config, space = prepare(RunConfig.from_dict(data), folder)
    recipes = baseline_recipes(config.baselines, config.models, config.base_model, config.seed)
    learning = learning_bytes(folder, config, recipes, space)
    weights = sum(
        info.nbytes for n, info in ModelSource(llama["base"]).index.items() if "lm_head" not in n
    )  # fp32 checkpoints: bytes = 4 x parameters
    assert learning > (3 + 2) * weights  # three models held, the merged weights twice
    footprint = announce(config, space, learning)
    assert footprint.peak == footprint.sources + max(footprint.reserve, learning)
    assert "while learning, the worker that trains" in footprint.describe()

    class Free:  # room for the workers to score, not for one of them to train
        available = int((2 * (footprint.sources + footprint.reserve)) / 0.9) + 1

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free())
    assert learning > footprint.reserve
    problem = check_fits(footprint, config.model_copy(update={"workers": 2, "pool": "ray"}))
    assert problem is not None and "learning.batch_size" in problem
    # once learned, nothing is left to train
    path = next(iter(recipes.values()))
    stored = Path(yaml.safe_load(path)["coefficients"])
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"")
    assert learning_bytes(folder, config, recipes, space) == 0
