"""Ray workers survive dead and hung actors; lm-eval scores the live model."""

from __future__ import annotations

import json

import pytest

from evomerge.cli import main
from evomerge.results.store import RunStore
from evomerge.zoo.build import TASK_YAML

from .test_run import expect_error, run_config, write


def test_ray_pool_survives_a_killed_worker_and_a_hung_one(llama, tmp_path):
    config = run_config(
        llama,
        pool="ray",
        workers=2,
        threads_per_worker=1,
        candidate_timeout=20,
        budget=6,
        optimizer={"name": "random"},
        score_sources=False,
        fitness={
            "function": "tests.fitness_fns:chaos_once",
            "options": {"folder": str(tmp_path), "hang": 120},
        },
    )
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 6 and len({r.index for r in records}) == 6
    failed = [r for r in records if r.failed]
    assert len(failed) == 1 and "timed out after 20 s" in failed[0].error  # the hung candidate
    assert sum(not r.failed for r in records) == 5  # the killed worker's candidate was scored
    assert (tmp_path / "died").exists()  # a worker was killed; its candidate was scored anyway


def make_tasks(folder, names=("parity_fit", "parity_held")):
    folder.mkdir(parents=True, exist_ok=True)
    for offset, name in enumerate(names):
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name))
        with open(folder / f"{name}.jsonl", "w") as f:
            for n in range(offset * 100, offset * 100 + 12):
                doc = {"prompt": f"Is {n} even?", "choices": [" yes", " no"], "answer": n % 2}
                f.write(json.dumps(doc) + "\n")
    return folder


def test_lm_eval_fitness_with_per_example_scores_and_held_out(llama, tmp_path):
    tasks = make_tasks(tmp_path / "tasks")
    config = run_config(
        llama,
        budget=4,
        optimizer={"name": "m2n2"},
        objectives=[{"name": "parity", "metric": "parity_fit: acc,none"}],
        fitness={
            "kind": "lm_eval",
            "tasks": ["parity_fit"],
            "include_path": str(tasks),
            "batch_size": 4,
            "held_out": {"tasks": ["parity_held"]},
        },
    )
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 4 and not any(r.failed for r in records)
    assert all(len(r.per_example) == 12 for r in records)
    assert all(r.values["parity"] == pytest.approx(sum(r.per_example) / 12) for r in records)
    held = [r for r in records if r.held_out is not None]
    assert held and all("parity_held: acc,none" in r.held_out for r in held)


def test_bad_lm_eval_fitness(llama, tmp_path, capsys):
    tasks = make_tasks(tmp_path / "tasks")
    config = run_config(
        llama, fitness={"kind": "lm_eval", "tasks": ["parity_fitt"], "include_path": str(tasks)}
    )
    expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "o")],
        capsys,
        "fitness.tasks",
        "parity_fitt",
    )
    config["fitness"] = {"kind": "lm_eval", "tasks": ["x"], "include_path": str(tmp_path / "no")}
    expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "o")],
        capsys,
        "fitness.include_path",
    )
    assert not (tmp_path / "o").exists()


def test_one_live_model_at_a_time(llama, tmp_path, monkeypatch):
    """A DFS candidate of another depth rebuilds the live model; by then nothing (the lm-eval
    wrapper included) holds the previous one, so two never share the device's memory."""
    import gc
    import weakref

    import transformers

    from evomerge.recipe import Recipe
    from evomerge.workers.evaluator import Evaluator

    tasks = make_tasks(tmp_path / "tasks")
    fitness = {"kind": "lm_eval", "tasks": ["parity_fit"], "include_path": str(tasks)}
    base = str(llama["base"])
    evaluator = Evaluator([base], fitness, device="cpu")

    def path(depth: int) -> str:
        steps = [{"model": "a", "layer": k} for k in range(depth)]
        data = {"merge_method": "dataflow", "embed_from": "a", "models": {"a": base}, "path": steps}
        return Recipe.from_dict(data).to_yaml()

    assert evaluator.evaluate(path(3)).error is None
    previous = weakref.ref(evaluator.model)
    seen: list[bool] = []
    build = transformers.AutoModelForCausalLM.from_config

    def checked(*args, **kwargs):
        gc.collect()
        seen.append(previous() is None)
        return build(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", checked)
    outcome = evaluator.evaluate(path(2))
    assert outcome.error is None and "parity_fit: acc,none" in outcome.metrics
    assert seen == [True]


def test_score_dtype_scores_every_model_in_that_dtype(llama, tmp_path):
    """score_dtype: bfloat16 gives a bf16 live model for candidates and sources alike, holding
    the merged weights rounded to bf16 (the merge math itself stays fp32)."""
    import torch

    from evomerge.recipe import Recipe
    from evomerge.search.references import source_recipe
    from evomerge.workers.evaluator import Evaluator
    from tests.helpers import load_folder

    tasks = make_tasks(tmp_path / "tasks")
    fitness = {"kind": "lm_eval", "tasks": ["parity_fit"], "include_path": str(tasks)}
    base, expert = str(llama["base"]), str(llama["ft0"])
    evaluator = Evaluator([base, expert], fitness, device="cpu", score_dtype="bfloat16")
    outcome = evaluator.evaluate(source_recipe(expert))
    assert outcome.error is None and 0 <= outcome.metrics["parity_fit: acc,none"] <= 1
    live = dict(evaluator.model.named_parameters())
    want = load_folder(llama["ft0"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert live[name].dtype == torch.bfloat16
    assert torch.equal(live[name], want[name].to(torch.bfloat16))
    models = [{"model": ref, "parameters": {"weight": 1.0}} for ref in (base, expert)]
    linear = {"merge_method": "linear", "models": models}
    assert evaluator.evaluate(Recipe.from_dict(linear).to_yaml()).error is None
    assert evaluator.model.dtype == torch.bfloat16


def test_lm_eval_options_for_instruct_users(llama, tmp_path, capsys):
    """num_fewshot per task, gen_kwargs on generate_until tasks (scored through the live
    model), batch_size auto; a per-task count for a task that is not scored, or multi-turn
    few-shot without the chat template, is one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.errors import EvomergeError
    from evomerge.workers.scoring import LmEvalFitness
    from evomerge.zoo.real import GEN_YAML

    tasks = make_tasks(tmp_path / "tasks")
    (tasks / "parity_gen.yaml").write_text(GEN_YAML.format(name="parity_gen"))
    with open(tasks / "parity_gen.jsonl", "w") as f:
        for n in range(6):
            f.write(
                json.dumps({"prompt": f"Is {n} even?", "target": "yes" if n % 2 == 0 else "no"})
                + "\n"
            )  # noqa: E501
    fitness = LmEvalFitness(
        ["parity_fit", "parity_gen"],
        include_path=str(tasks),
        batch_size="auto",
        num_fewshot={"parity_fit": 2},
        gen_kwargs={"max_gen_toks": 3},
    )
    by_name = fitness.task_dict["tasks"]
    assert by_name["parity_fit"].config.num_fewshot == 2
    assert by_name["parity_gen"].config.generation_kwargs["max_gen_toks"] == 3
    assert by_name["parity_gen"].config.generation_kwargs["until"] == ["<|im_end|>", "\n"]
    model = AutoModelForCausalLM.from_pretrained(llama["base"]).eval()
    scores = fitness(model, AutoTokenizer.from_pretrained(llama["base"]))
    assert 0 <= scores["parity_gen: exact_match,none"] <= 1
    assert 0 <= scores["parity_fit: acc,none"] <= 1
    with pytest.raises(EvomergeError, match="num_fewshot"):
        LmEvalFitness(["parity_fit"], include_path=str(tasks), num_fewshot={"parity_gen": 1})
    spec = {"kind": "lm_eval", "tasks": ["parity_fit"], "include_path": str(tasks)}
    config = run_config(llama, fitness={**spec, "fewshot_as_multiturn": True})
    expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "o")],
        capsys,
        "fewshot_as_multiturn",
        "apply_chat_template",
    )


def test_a_task_folder_is_indexed_alone_unless_a_task_is_built_in(tmp_path):
    """Tasks all in the fitness folder are found from the folder's own index (lm-eval's
    built-in one takes seconds to build in the driver and in every worker); a built-in task
    named beside them is found too, from lm-eval's whole index."""
    from evomerge.workers.scoring import load_tasks, task_manager

    tasks = make_tasks(tmp_path / "tasks")
    local = task_manager(str(tasks), ["parity_fit", "parity_held"])
    assert set(local.all_tasks) == {"parity_fit", "parity_held"}
    assert set(load_tasks(["parity_fit"], str(tasks))["tasks"]) == {"parity_fit"}
    both = task_manager(str(tasks), ["parity_fit", "arc_easy"])
    assert {"parity_fit", "arc_easy"} <= set(both.all_tasks)
