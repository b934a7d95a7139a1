"""Run folders from strangers: torn or pickle-laden checkpoints; fuzzed configs and recipes."""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.run import prepare
from evomerge.store import RunStore

from .test_run import run_config, stored, write

MARKER = "/tmp/evomerge-pickle-ran"


class Payload:
    def __reduce__(self):
        return (open, (MARKER, "w"))


def newest_checkpoint(run):
    return sorted((run / "checkpoints").glob("optimizer-*.npz"))[-1]


@pytest.mark.parametrize("damage", ["torn", "pickle"])
def test_bad_newest_checkpoint_falls_back_and_runs_no_code(llama, tmp_path, damage, caplog):
    import os

    if os.path.exists(MARKER):
        os.remove(MARKER)
    run = tmp_path / "run"
    config = write(tmp_path, run_config(llama, budget=6))
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    before = stored(run)
    newest = newest_checkpoint(run)
    if damage == "torn":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        buffer = io.BytesIO()
        np.savez(buffer, __state__=np.array([Payload()], dtype=object))
        newest.write_bytes(buffer.getvalue())
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        assert main(["resume", str(run), "--quiet"]) == 0
    assert "unreadable checkpoint" in caplog.text and "previous checkpoint" in caplog.text
    assert not os.path.exists(MARKER)  # the pickle never ran
    assert stored(run) == before  # nothing lost, nothing re-scored


MUTATIONS = st.sampled_from(
    [
        "delete",
        "wrong_type",
        "huge",
        "negative",
        "empty",
        "unicode",
        "unknown_key",
        "nested_unknown",
    ]
)


def mutate(data, path, how):
    target = data
    for key in path[:-1]:
        target = target[key]
    key = path[-1]
    if how == "delete":
        del target[key]
    elif how == "wrong_type":
        target[key] = {"x": [1, 2]} if not isinstance(target[key], dict) else 7
    elif how == "huge":
        target[key] = 10**30
    elif how == "negative":
        target[key] = -1
    elif how == "empty":
        target[key] = [] if isinstance(target[key], list) else ""
    elif how == "unicode":
        target[key] = "λ\u202e☃"
    elif how == "unknown_key" and isinstance(target, dict):
        target["frobnicate"] = 1
    elif how == "nested_unknown" and isinstance(target[key], dict):
        target[key]["frobnicate"] = 1
    return data


def paths(value, prefix=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzzed_run_configs_fail_with_one_clear_error(llama, data):
    base = run_config(llama)
    where = data.draw(st.sampled_from(list(paths(base))))
    how = data.draw(MUTATIONS)
    config = mutate(copy.deepcopy(base), where, how)
    try:
        prepare(RunConfig.from_dict(config))
    except EvomergeError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message


RECIPE = {
    "merge_method": "ties",
    "base_model": "b",
    "models": [
        {"model": "x", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
        {"model": "y", "parameters": {"weight": {"filter": "mlp", "value": 1.0}}},
    ],
    "dtype": "float16",
    "seed": 3,
}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzzed_recipes_parse_or_fail_clearly(data):
    where = data.draw(st.sampled_from(list(paths(RECIPE))))
    config = mutate(copy.deepcopy(RECIPE), where, data.draw(MUTATIONS))
    text = yaml.safe_dump(config)
    try:
        Recipe.from_yaml_text(text)
    except EvomergeError as exc:
        assert str(exc) and "\n" not in str(exc)


def test_yaml_bomb_is_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")
    )
    with pytest.raises(EvomergeError):
        Recipe.from_yaml_text(bomb)
    with pytest.raises(EvomergeError):
        RunConfig.from_dict(yaml.safe_load(bomb))


def test_store_opens_without_running_anything(llama, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            ["run", str(write(tmp_path, run_config(llama, budget=2))), "--out", str(run), "--quiet"]
        )
        == 0
    )
    assert len(RunStore.open(run).records()) == 2


def test_a_copied_run_folder_resumes_where_it_lands(llama, tmp_path):
    import shutil

    run = tmp_path / "run"
    config = write(tmp_path, run_config(llama, budget=4))
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    raw = yaml.safe_load((moved / "run.yaml").read_text())
    raw["budget"] = 6
    (moved / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["resume", str(moved), "--quiet"]) == 0
    assert len(RunStore.open(moved).records()) == 6


@pytest.mark.parametrize("where", ["checkpoint", "commit"])
def test_full_disk_stops_cleanly_and_resume_finishes(llama, tmp_path, capsys, monkeypatch, where):
    import errno

    import evomerge.store as store_module

    run = tmp_path / "run"
    config = write(tmp_path, run_config(llama, budget=6))
    calls = {"n": 0}
    if where == "checkpoint":
        real = store_module.write_state

        def flaky(path, state):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, state)

        monkeypatch.setattr(store_module, "write_state", flaky)
    else:
        real = RunStore._commit

        def flaky(self, record):
            calls["n"] += 1
            if calls["n"] == 3:
                from sqlalchemy.exc import OperationalError

                raise OperationalError("INSERT", {}, Exception("database or disk is full"))
            return real(self, record)

        monkeypatch.setattr(RunStore, "_commit", flaky)
    code = main(["run", str(config), "--out", str(run), "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("evomerge: error:")]
    assert code == 2 and len(lines) == 1 and "cannot write the run store" in lines[0], err
    assert "evomerge resume" in lines[0]
    committed = len(RunStore.open(run).records())
    monkeypatch.undo()
    assert main(["resume", str(run), "--quiet"]) == 0
    records = RunStore.open(run).records()
    assert len(records) == 6 and committed >= 2 and len({r.index for r in records}) == 6


@pytest.mark.parametrize("pool", ["local", "ray"])
def test_nan_weights_stop_a_run_before_anything_is_written(llama, tmp_path, capsys, pool):
    from .test_merge_cli import poisoned_copy

    bad_file, name = poisoned_copy(llama["ft1"], tmp_path / "poisoned")
    models = {**llama, "ft1": tmp_path / "poisoned"}
    config = write(tmp_path, run_config(models, budget=4, pool=pool, workers=1))
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("evomerge: error:")]
    assert len(lines) == 1 and str(bad_file) in lines[0] and name in lines[0], lines
    assert not run.exists()  # no half-made run folder to trip over
