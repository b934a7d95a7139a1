"""Multi-stage files (mergekit-multi's format): merged in one pass, equal to mergekit-multi's
output, written again as a file `evomerge merge` re-materializes; bad files fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main

from .helpers import load_folder


def stages_text(m: dict) -> str:
    """Three stages: TIES of two fine-tunes, SLERP of that with a third, then task arithmetic
    of both stages over the base (a stage read twice, and read as the final stage's model)."""
    base, a, b, c = (str(m[k]) for k in ("base", "ft0", "ft1", "ft2"))
    docs = [
        {
            "name": "pair",
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": [0.3, 0.9], "density": 0.6}},
                {"model": b, "parameters": {"weight": 0.5, "density": 0.4}},
            ],
        },
        {
            "name": "blend",
            "merge_method": "slerp",
            "base_model": "pair",
            "parameters": {"t": [{"filter": "mlp", "value": 0.7}, {"value": 0.25}]},
            "models": [{"model": "pair"}, {"model": c}],
        },
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": "blend", "parameters": {"weight": 0.8}},
                {"model": "pair", "parameters": {"weight": [0.2, 0.6]}},
            ],
        },
    ]
    # the final stage first: the order of documents does not matter, only what reads what
    return yaml.safe_dump_all([docs[2], docs[1], docs[0]], sort_keys=False)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_multi_stage_file_equals_mergekit_multi(llama, tmp_path, capsys):
    pytest.importorskip("mergekit")
    config = tmp_path / "stages.yml"
    config.write_text(stages_text(llama))
    code, err = run_cli(capsys, "merge", config, tmp_path / "ours", "--quiet", "--device", "cpu")
    assert code == 0, err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no intermediate kept
    tool = Path(sys.executable).with_name("mergekit-multi")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [str(tool), str(config), "--out-path", str(tmp_path / "theirs"),
         "--intermediate-dir", str(tmp_path / "stages"), "--no-copy-tokenizer"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = load_folder(tmp_path / "ours"), load_folder(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # the folder's recipe is the whole chain: merging it again gives the same bits
    code, err = run_cli(
        capsys, "merge", tmp_path / "ours" / "evomerge_recipe.yaml", tmp_path / "again", "--quiet"
    )
    assert code == 0, err
    again = load_folder(tmp_path / "again")
    assert all(torch.equal(again[n], t) for n, t in ours.items())
    stored = list(yaml.safe_load_all((tmp_path / "ours" / "mergekit_config.yml").read_text()))
    assert [d.get("name") for d in stored] == ["pair", "blend", None]


def test_a_stage_read_twice_is_merged_once(llama, tmp_path, capsys, monkeypatch):
    from evomerge.merge import nested

    made: list[str] = []
    make = nested.MergedSource.make

    def counting(self, name, *args, **kwargs):
        made.append(f"{self.ref}:{name}")
        return make(self, name, *args, **kwargs)

    monkeypatch.setattr(nested.MergedSource, "make", counting)
    config = tmp_path / "stages.yml"
    config.write_text(stages_text(llama))
    code, err = run_cli(capsys, "merge", config, tmp_path / "out", "--quiet")
    assert code == 0, err
    assert made and len(made) == len(set(made))  # every stage tensor made exactly once
    out = load_folder(tmp_path / "out")
    assert {m.split(":", 1)[1] for m in made if m.startswith("pair:")} == set(out)


def write(tmp_path, docs: list) -> Path:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("two_unnamed", "needs a name"),
        ("duplicate", "names two stages"),
        ("circle", "in a circle (a -> b -> a)"),
        ("all_named", "leave the final one (the output) unnamed"),
        ("bad_stage", "stage 'a': field 'models.0.parameters.density'"),
    ],
)
def test_bad_multi_stage_files_fail_in_one_line(llama, tmp_path, capsys, case, needle):
    base, ft0, ft1 = (str(llama[k]) for k in ("base", "ft0", "ft1"))

    def linear(name, *models):
        doc = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}
                                                    for m in models]}  # fmt: skip
        return {"name": name, **doc} if name else doc

    docs = {
        "two_unnamed": [linear("a", ft0, ft1), linear(None, "a", ft0), linear(None, "a", ft1)],
        "duplicate": [linear("a", ft0, ft1), linear("a", ft0, base), linear(None, "a", ft0)],
        "circle": [linear("a", "b", ft0), linear("b", "a", ft1), linear(None, "a", ft0)],
        "all_named": [linear("a", ft0, ft1), linear("b", "a", ft0)],
        "bad_stage": [
            {
                "name": "a",
                "merge_method": "ties",
                "base_model": base,
                "models": [{"model": ft0, "parameters": {"weight": 1.0, "density": 2.0}}],
            },
            linear(None, "a", ft0),
        ],  # fmt: skip
    }[case]
    code, err = run_cli(capsys, "merge", write(tmp_path, docs), tmp_path / "out")
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "bad.yml"]
    assert leftovers == []


def test_a_single_named_config_is_a_plain_recipe(llama, tmp_path, capsys):
    doc = {"name": "only", "merge_method": "linear",
           "models": [{"model": str(llama["ft0"]), "parameters": {"weight": 1.0}},
                      {"model": str(llama["ft1"]), "parameters": {"weight": 1.0}}]}  # fmt: skip
    path = write(tmp_path, [doc])
    code, err = run_cli(capsys, "merge", path, tmp_path / "out", "--quiet")
    assert code == 0, err
    out, a, b = (load_folder(f) for f in (tmp_path / "out", llama["ft0"], llama["ft1"]))
    for name, tensor in out.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, msg=name)


def test_a_search_over_the_final_stage_with_earlier_stages_fixed(llama, tmp_path, capsys):
    """A run's model may be a recipe file: its merge is made once, kept beside the file, and
    searched over like a checkpoint; later runs of the same stages reuse it."""
    from .test_run import run_config, write

    base, a, b = (str(llama[k]) for k in ("base", "ft0", "ft1"))
    earlier = [
        {"name": "pair", "merge_method": "ties", "base_model": base,
         "models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": b, "parameters": {"weight": 0.4, "density": 0.5}}]},
        {"merge_method": "slerp", "base_model": "pair", "parameters": {"t": 0.3},
         "models": [{"model": "pair"}, {"model": base}]},
    ]  # fmt: skip
    stages = tmp_path / "stages.yml"
    stages.write_text(yaml.safe_dump_all(earlier, sort_keys=False))
    config = run_config(llama, budget=3)
    config["models"] = {"base": base, "blend": str(stages), "b": b}
    config["search_space"]["models"] = ["blend", "b"]
    path = write(tmp_path, config)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    made = sorted((tmp_path / ".evomerge").iterdir())
    assert len(made) == 1 and made[0].name.startswith("stages-")
    stored = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert stored["models"]["blend"] == str(made[0])  # resume reads the made folder
    code, err = run_cli(capsys, "merge", stages, tmp_path / "direct", "--quiet")
    assert code == 0, err
    direct, kept = load_folder(tmp_path / "direct"), load_folder(made[0])
    assert all(torch.equal(direct[n], kept[n]) for n in direct)
    assert main(["status", str(tmp_path / "run"), "--json"]) == 0
    assert "blend" in json.loads(capsys.readouterr().out)["sources"]
    # a second run of the same stages does not merge them again
    stamp = (made[0] / "config.json").stat().st_mtime_ns
    assert main(["run", str(path), "--out", str(tmp_path / "run2"), "--quiet"]) == 0
    assert (made[0] / "config.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / ".evomerge").iterdir())) == 1


def test_a_stage_read_only_as_a_tokenizer_comes_first():
    from evomerge.merge.stages import Stages

    docs = [
        {"merge_method": "linear", "tokenizer_source": "chat",
         "models": [{"model": "a", "parameters": {"weight": 1.0}}]},
        {"name": "chat", "merge_method": "linear",
         "models": [{"model": "b", "parameters": {"weight": 1.0}}]},
    ]  # fmt: skip
    stages = Stages.from_yaml_text(yaml.safe_dump_all(docs))
    assert stages.order == ["chat"] and stages.referenced_models() == ["b", "a"]
