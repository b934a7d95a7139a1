"""Pareto computation, and exported models that equal what the workers scored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard

from evomerge.cli import main
from evomerge.config import Objective
from evomerge.recipe import Recipe
from evomerge.results.export import shared_license
from evomerge.results.pareto import hypervolume, hypervolume_curve, losses_of, non_dominated
from evomerge.results.store import RunStore
from evomerge.workers.evaluator import Evaluator

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
        data = ModelCard.load(folder / "README.md").data.to_dict()  # as the Hub reads it
        assert data["base_model"] == [llama[k].name for k in ("base", "ft0", "ft1")]
        assert data["base_model_relation"] == "merge"
        assert {"merge", "evomerge"} <= set(data["tags"]) and "license" not in data
        assert record.recipe.strip().splitlines()[0] in card  # the recipe rides along
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


def test_the_card_names_a_license_only_when_every_source_shares_it(tmp_path):
    for name, license_ in (("a", "apache-2.0"), ("b", "apache-2.0"), ("c", "mit"), ("d", None)):
        (tmp_path / name).mkdir()
        if license_:
            (tmp_path / name / "README.md").write_text(f"---\nlicense: {license_}\n---\n# {name}\n")
    assert shared_license([str(tmp_path / "a"), str(tmp_path / "b")]) == "apache-2.0"
    assert shared_license([str(tmp_path / "a"), str(tmp_path / "c")]) is None
    assert shared_license([str(tmp_path / "a"), str(tmp_path / "d")]) is None  # no card: unknown


@pytest.fixture
def no_hub_login(tmp_path, monkeypatch):
    """No stored token and no HF_TOKEN; offline mode off (the upload path is what is tested)."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def test_push_to_hub_fails_before_any_work(llama, tmp_path, capsys, monkeypatch, no_hub_login):
    config = run_config(llama, budget=2, optimizer={"name": "random"}, score_sources=False)
    run = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "exports"
    push = ["export", str(run), "--to", str(out), "--quiet", "--push-to-hub"]
    expect_error([*push, "org/name"], capsys, "--push-to-hub", "no Hugging Face token")
    expect_error([*push, "no-org"], capsys, "--push-to-hub no-org", "ORG/NAME")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    expect_error([*push, "org/name"], capsys, "--push-to-hub", "cannot reach the Hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error([*push, "org/name"], capsys, "--push-to-hub", "HF_HUB_OFFLINE")
    assert not out.exists()  # nothing was merged for an upload that could not happen


@pytest.mark.parametrize("objectives", [2, 3])
def test_report_figures_are_described_once_and_drawn_by_both_renderers(tmp_path, objectives):
    """The page's plotly figures and the PNGs come from one description: the same points, the
    same reference models, for a scatter front (two objectives) and parallel coordinates."""
    from types import SimpleNamespace

    from evomerge.results.figures import describe
    from evomerge.results.report import plotly_figure, write_png
    from evomerge.results.store import ReferenceResult

    names = "abc"[:objectives]
    config = SimpleNamespace(
        objectives=[Objective(name=n, metric=n, direction="maximize") for n in names],
        reference=None,
    )
    g = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"number": range(12), "index": range(12), "failed": [False] * 11 + [True]}
        | {n: g.random(12) for n in names}
    )
    frame["pareto"] = False
    frame.loc[3, "pareto"] = True
    references = {
        "source": {"m": ReferenceResult(values={n: 0.5 for n in names})},
        "baseline": {"avg": ReferenceResult(values=None, error="boom")},
    }
    figures = describe(frame, config, references)
    assert set(figures) == {"pareto", "hypervolume", *(f"objective_{n}" for n in names)}
    for name, figure in figures.items():
        drawn = plotly_figure(figure)
        if figure.profiles is not None:  # 11 evaluations and the one scored source
            assert len(drawn.data[0].dimensions[0]["values"]) == len(figure.profiles.lines) == 12
        else:
            points = sum(len(t.x) for t in figure.traces)
            assert sum(len(t.x) for t in drawn.data if t.x and t.x[0] is not None) == points
        write_png(figure, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
    nothing = describe(frame.assign(failed=True), config, {"source": {}, "baseline": {}})
    plotly_figure(nothing["pareto"])  # every evaluation failed: an empty plot, not a crash
    front = figures["pareto"]
    if objectives == 2:
        assert [t.names for t in front.traces if t.names] == [["m"]]  # the failed one is not drawn
    assert [level.note for level in figures["objective_a"].levels] == ["m"]
