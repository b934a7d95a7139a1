"""Pareto computation, and exported models that equal what the workers scored."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.cli import main
from evomerge.config import Objective
from evomerge.evaluator import Evaluator
from evomerge.pareto import hypervolume, hypervolume_curve, losses_of, non_dominated
from evomerge.recipe import Recipe
from evomerge.store import RunStore

from .helpers import load_folder
from .test_run import REPO, TWO_OBJECTIVES, expect_error, pareto_config, run_config, write


def test_non_dominated_and_hypervolume_by_hand():
    losses = np.array([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2]], dtype=float)
    assert non_dominated(losses).tolist() == [0, 1, 2, 4]  # (3,3) is dominated; ties kept
    assert hypervolume(losses, np.array([4.0, 4.0])) == 6.0
    assert hypervolume(np.array([[5.0, 5.0]]), np.array([4.0, 4.0])) == 0.0
    curve = hypervolume_curve(losses, np.array([4.0, 4.0]))
    assert curve.tolist() == [3.0, 5.0, 6.0, 6.0, 6.0]
    objectives = [
        Objective(name="acc", metric="a"),
        Objective(name="loss", metric="l", direction="minimize"),
    ]
    assert losses_of([{"acc": 0.8, "loss": 2.0}], objectives).tolist() == [[-0.8, 2.0]]


def test_exported_models_equal_the_scored_ones(llama, tmp_path, capsys):
    config = pareto_config(
        llama, search_space=str(REPO / "search_spaces" / "ps_dfs.yaml"), budget=6
    )
    run = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--pareto", "--to", str(tmp_path / "pareto"), "--quiet"]) == 0
    exported = sorted((tmp_path / "pareto").iterdir())
    records = {r.index: r for r in RunStore.open(run).records()}
    assert exported and len(records) == 6
    worker = Evaluator(
        [str(llama[k]) for k in ("base", "ft0", "ft1")],
        {"function": "tests.fitness_fns:score"},
        device="cpu",
    )
    for folder in exported:
        record = records[int(folder.name.split("-")[1])]
        model, _ = worker.materialize(Recipe.from_yaml_text(record.recipe))
        scored = model.state_dict()
        weights = load_folder(folder)
        for name, tensor in weights.items():
            assert torch.equal(tensor, scored[name]), (folder.name, name)
        card = (folder / "README.md").read_text()
        assert f"evaluation {record.index}" in card and f"{record.values['nll']:.6g}" in card
        assert (folder / "evomerge_recipe.yaml").exists() and (folder / "config.json").exists()
    best = min(records.values(), key=lambda r: r.values["nll"])
    assert (
        main(["export", str(run), "--best", "nll", "--to", str(tmp_path / "best"), "--quiet"]) == 0
    )
    assert [p.name for p in (tmp_path / "best").iterdir()] == [f"eval-{best.index:05d}"]
    expect_error(
        ["export", str(run), "--best", "accuracy", "--to", str(tmp_path / "x")],
        capsys,
        "--best accuracy",
        "nll, spread",
    )
    expect_error(
        ["export", str(run), "--id", "999", "--to", str(tmp_path / "x")], capsys, "--id 999"
    )
    assert not (tmp_path / "x").exists()

    assert main(["report", str(run), "--exports", str(tmp_path / "pareto")]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "Plotly.newPlot" in page and '<script src="http' not in page  # self-contained
    assert f"eval-{best.index:05d}" in page and "source models" in page
    for png in ("pareto", "objective_nll", "objective_spread"):
        assert (run / "report" / f"{png}.png").stat().st_size > 10_000


def test_surrogate_step_on_a_finished_run(llama, tmp_path):
    config = run_config(
        llama,
        budget=12,
        optimizer={"name": "random"},
        search_space={
            "kind": "parameter",
            "method": "task_arithmetic",
            "parameters": {"weight": {"low": 0.0, "high": 1.0}},
        },
        objectives=TWO_OBJECTIVES,
    )
    run = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(run), "--quiet"]) == 0
    assert main(["propose", str(run), "--points", "3", "--quiet"]) == 0
    records = RunStore.open(run).records()
    extra = [r for r in records if r.origin == "surrogate"]
    assert len(records) == 15 and len(extra) == 3 and all(r.index < 0 for r in extra)
    assert main(["resume", str(run), "--quiet"]) == 0  # the budget is still the optimizer's
    assert len(RunStore.open(run).records()) == 15
