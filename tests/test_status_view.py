"""`evomerge status` fits a 120-column terminal: held-out columns are named by task and metric
in short, only where something was scored, and a table that would still be wider is shown as
one row per model per task; `--wide` keeps lm-eval's full names in one table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from evomerge.results.status import readable, short_metric

TASKS = [f"sm2_{t}_heldout: {m},none" for t in ("add", "decode", "dec_add") for m in ("acc",)]
TASKS += [f"sm2_{t}_gen_heldout: exact_match,none" for t in ("add", "decode", "dec_add")]


def frame(rows: int = 9) -> pd.DataFrame:
    g = np.random.default_rng(0)
    data = {"kind": ["source"] * rows, "name": [f"model number {i}" for i in range(rows)]}
    data["mean"] = g.random(rows)
    for task in TASKS:
        data[f"held_out:{task}"] = g.random(rows)
    data["held_out:never_scored_heldout: acc,none"] = [np.nan] * rows
    return pd.DataFrame(data)


def test_short_names_keep_task_and_metric():
    assert short_metric("held_out:sm2_add_heldout: acc,none") == "sm2_add acc"
    assert short_metric("held_out:sm2_add_gen_heldout: exact_match,none") == "sm2_add_gen em"
    assert short_metric("gsm8k: exact_match,strict-match") == "gsm8k em,strict-match"


def test_status_tables_fit_the_terminal_and_wide_keeps_everything():
    lines = readable(frame(), ["name"], wide=False)
    assert max(map(len, lines)) <= 120
    text = "\n".join(lines)
    assert "never_scored" not in text and "held_out:" not in text
    assert sum("sm2_dec_add_gen em" in line for line in lines) == 9  # a row per model
    wide = readable(frame(), ["name"], wide=True)
    assert max(map(len, wide)) > 120 and "held_out:sm2_add_heldout: acc,none" in wide[0]
    narrow = frame()[["kind", "name", "mean", f"held_out:{TASKS[0]}"]]
    assert readable(narrow, ["name"], wide=False)[0].split()[-2:] == ["sm2_add", "acc"]


def test_info_lines_show_by_default_and_quiet_keeps_warnings_only(llama, tmp_path, capsys):
    from evomerge.cli import main

    from .test_run import run_config, write

    config = write(tmp_path, run_config(llama, budget=1))
    assert main(["run", str(config), "--out", str(tmp_path / "loud")]) == 0
    assert "memory per worker" in capsys.readouterr().err
    assert main(["run", str(config), "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "memory per worker" not in err and "run folder" not in err
