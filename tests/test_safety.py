"""Run folders from strangers: torn or pickle-laden checkpoints, copied folders, full disks,
bad weights; a YAML bomb. (Fuzzed configs, spaces and recipes: test_fuzz.py.)"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.results.store import RunStore

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

    import evomerge.results.store as store_module

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


def test_report_and_model_card_say_when_a_run_trusted_remote_code(llama, tmp_path):
    for trusted in (False, True):
        folder = tmp_path / f"trusted-{trusted}"
        folder.mkdir()
        config = write(folder, run_config(llama, budget=2, trust_remote_code=trusted))
        run = folder / "run"
        assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
        assert (
            main(["export", str(run), "--best", "nll", "--to", str(folder / "x"), "--quiet"]) == 0
        )
        assert main(["report", str(run)]) == 0
        card = next((folder / "x").iterdir()) / "README.md"
        page = (run / "report" / "index.html").read_text()
        for text in (card.read_text(), page):
            assert ("trust_remote_code enabled" in text) == trusted


def test_code_shipped_in_a_model_folder_never_runs_unless_trusted(llama, tmp_path):
    import json
    import shutil

    rogue = tmp_path / "rogue"  # the base model, whose tokenizer every candidate uses
    shutil.copytree(llama["base"], rogue)
    marker = tmp_path / "remote-code-ran"
    (rogue / "tokenization_rogue.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class RogueTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    settings = json.loads((rogue / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": [None, "tokenization_rogue.RogueTokenizer"]}
    (rogue / "tokenizer_config.json").write_text(json.dumps(settings))
    for trusted in (False, True):  # trusted: proves the run does reach the code
        config = run_config({**llama, "base": rogue}, budget=2, trust_remote_code=trusted)
        run = tmp_path / f"run-{trusted}"
        assert main(["run", str(write(tmp_path, config)), "--out", str(run), "--quiet"]) == 0
        assert marker.exists() == trusted


def test_export_killed_mid_write_leaves_nothing_half_written_and_reruns(llama, tmp_path):
    import os
    import signal
    import time

    from .helpers import load_folder
    from .test_run import cli, pareto_config

    run = tmp_path / "run"
    config = write(tmp_path, pareto_config(llama, budget=8))
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--pareto", "--to", str(tmp_path / "clean"), "--quiet"]) == 0
    target = tmp_path / "killed"
    killed = False
    for _ in range(10):  # kill the moment a model is half-written (a staging folder exists)
        proc = cli("export", str(run), "--pareto", "--to", str(target))
        while proc.poll() is None:
            if target.exists() and any(p.name.endswith(f"-{proc.pid}") for p in target.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.0005)
        proc.wait()
        if killed:
            break
    assert killed, "the export always finished before a kill could land"
    assert main(["export", str(run), "--pareto", "--to", str(target), "--quiet"]) == 0
    assert sorted(p.name for p in target.iterdir()) == sorted(
        p.name for p in (tmp_path / "clean").iterdir()
    )  # every model there, no staging folder left
    for folder in (tmp_path / "clean").iterdir():
        clean, rerun = load_folder(folder), load_folder(target / folder.name)
        assert all(torch.equal(clean[k], rerun[k]) for k in clean)
