"""Baseline merges and the run measured against them: scored like the sources on the fitness
and held-out tasks, reported by `status --json`, and marked on the report's plots."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from evomerge.cli import main
from evomerge.merge.engine import merge_to_disk
from evomerge.results.store import RunStore
from tests.helpers import load_folder
from tests.test_run import expect_error, run_config, write
from tests.test_workers import make_tasks


def lm_eval_config(llama, tasks, **changes):
    return run_config(
        llama,
        budget=4,
        optimizer={"name": "random"},
        objectives=[{"name": "parity", "metric": "parity_fit: acc,none"}],
        fitness={
            "kind": "lm_eval",
            "tasks": ["parity_fit"],
            "include_path": str(tasks),
            "batch_size": 4,
            "held_out": {"tasks": ["parity_held"]},
        },
        **changes,
    )


def test_baselines_and_sources_are_scored_on_fitness_and_held_out(llama, tmp_path, capsys):
    tasks = make_tasks(tmp_path / "tasks")
    mine = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": 0.3}}  # fmt: skip
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    baselines = ["average", "task_arithmetic", "ties", "dare_ties"]
    baselines += [{"name": "mine", "recipe": "mine.yaml"}]
    config = lm_eval_config(llama, tasks, baselines=baselines)
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["sources"]) == {"base", "a", "b"}
    assert set(data["baselines"]) == {"average", "task_arithmetic", "ties", "dare_ties", "mine"}
    for scored in [*data["sources"].values(), *data["baselines"].values()]:
        assert 0 <= scored["values"]["parity"] <= 1
        assert set(scored["held_out"]) >= {"parity_held: acc,none"}
    assert data["pareto"] and all(
        {"index", "values", "held_out"} <= set(p) and "parity_held: acc,none" in p["held_out"]
        for p in data["pareto"]
    )
    # the run folder holds each baseline as the recipe it scored, with the models resolved
    stored = yaml.safe_load((out / "run.yaml").read_text())["baselines"]
    by_name = {b["name"]: b["recipe"] for b in stored}
    assert by_name["mine"]["models"][0]["model"] == str(llama["ft0"].resolve())
    assert by_name["ties"]["merge_method"] == "ties"
    assert by_name["ties"]["models"][0]["parameters"] == {"weight": 1.0, "density": 0.5}
    # the text summary lists them too
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sources and baselines:" in text and "task_arithmetic" in text
    # and the report marks them on its plots and lists them with their held-out scores
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "index.html").read_text()
    assert "baseline merges" in page and "source models" in page
    assert "<td>baseline</td><td>dare_ties</td>" in page and "parity_held: acc,none" in page
    assert (out / "report" / "objective_parity.png").stat().st_size > 0


def test_the_average_baseline_is_the_plain_mean_of_the_experts(llama, tmp_path):
    """What the preset stands for: merged, it is the mean of the experts' tensors."""
    from evomerge.baselines import preset_recipe

    models = {"base": str(llama["base"]), "a": str(llama["ft0"]), "b": str(llama["ft1"])}
    recipe = preset_recipe("average", models, "base", 0, "field 'baselines'")
    merged = load_folder(merge_to_disk(recipe, tmp_path / "avg", progress=False, device="cpu"))
    a, b = load_folder(llama["ft0"]), load_folder(llama["ft1"])
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        assert tensor.allclose((a[name] + b[name]) / 2, atol=1e-6), name


@pytest.mark.parametrize(
    "baselines, needles",
    [
        (["avg"], ("baselines", "unknown preset 'avg'")),
        (["average", {"name": "average", "preset": "ties"}], ("baselines", "used twice")),
        ([{"name": "x", "recipe": {"merge_method": "ties", "models": [{"model": "nowhere"}]}}],
         ("baselines", "(x)")),
    ],
)  # fmt: skip
def test_bad_baselines_are_one_line(llama, tmp_path, capsys, baselines, needles):
    config = run_config(llama, baselines=baselines)
    out = tmp_path / "o"
    expect_error(["run", str(write(tmp_path, config)), "--out", str(out)], capsys, *needles)
    assert not out.exists()


def test_task_vector_presets_need_a_base_model(llama, tmp_path, capsys):
    config = run_config(llama, baselines=["ties"], base_model=None)
    config["search_space"] = {
        "kind": "parameter", "method": "linear", "parameters": {"weight": {"low": 0, "high": 1}}
    }  # fmt: skip
    expect_error(
        ["run", str(write(tmp_path, config)), "--out", str(tmp_path / "o")],
        capsys,
        "baselines",
        "needs base_model",
    )


def test_a_run_reuses_another_runs_reference_scores(llama, tmp_path, capsys):
    """references_from: a second run with the same fitness takes the first run's source and
    baseline scores (held-out included) instead of scoring them again, but scores a failed one
    itself (as a resume does); another fitness is refused in one line before anything is
    written."""
    tasks = make_tasks(tmp_path / "tasks")
    first = tmp_path / "first"
    config = lm_eval_config(llama, tasks, baselines=["average"])
    assert main(["run", str(write(tmp_path, config)), "--out", str(first), "--quiet"]) == 0
    wide = {
        "kind": "parameter",
        "method": "linear",
        "parameters": {"weight": {"low": 0, "high": 1}},
    }
    second = tmp_path / "second"
    config = lm_eval_config(
        llama, tasks, baselines=["average"], references_from=str(first), search_space=wide
    )
    path = write(tmp_path, config, "second.yaml")
    assert main(["run", str(path), "--out", str(second), "--quiet"]) == 0
    a, b = RunStore.open(first), RunStore.open(second)
    assert b.sources() == a.sources() and b.baselines() == a.baselines()
    assert all(v.held_out for v in b.sources().values())
    scored = a.baselines()["average"]
    a.set_baseline("average", replace(scored, values=None, error="RuntimeError: out of memory"))
    fourth = tmp_path / "fourth"  # a failure of the first run is scored again, not copied
    short = write(tmp_path, {**config, "budget": 1}, "fourth.yaml")
    assert main(["run", str(short), "--out", str(fourth), "--quiet"]) == 0
    again = RunStore.open(fourth).baselines()["average"]
    assert not again.failed and again.values == scored.values
    assert main(["resume", str(first), "--quiet"]) == 0  # and the first run's own, on resume
    assert RunStore.open(first).baselines()["average"].values == scored.values
    other = {**config, "objectives": [{"name": "p", "metric": "parity_fit: acc,none"}]}
    third = tmp_path / "third"
    path = write(tmp_path, other, "third.yaml")
    expect_error(["run", str(path), "--out", str(third)], capsys, "references_from", "fitness")
    assert not third.exists()
