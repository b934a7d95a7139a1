"""The zoo's tasks are deterministic and disjoint; a scaled-down demo runs end to end."""

from __future__ import annotations

import json

import yaml

from evomerge.cli import main
from evomerge.results.store import RunStore
from evomerge.zoo import tasks
from evomerge.zoo.build import SMALL, build, write_tasks

from .test_run import REPO


def prompts(path):
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_task_splits_are_disjoint_and_deterministic(tmp_path):
    data = write_tasks(tmp_path / "a", SMALL)
    write_tasks(tmp_path / "b", SMALL)
    for task in (*tasks.SKILLS, tasks.TARGET):
        splits = {name: {e.prompt for e in examples} for name, examples in data[task].items()}
        names = list(splits)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                assert not splits[first] & splits[second], (task, first, second)
        for split in ("fit", "heldout"):
            name = f"zoo_{task}_{split}.jsonl"
            assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
            for line in (tmp_path / "a" / name).read_text().splitlines():
                doc = json.loads(line)
                assert len(set(doc["choices"])) == 4 and 0 <= doc["answer"] < 4
    example = tasks.cipher_add(__import__("random").Random(1))
    a, b = example.prompt[4:-1].split("+")
    decode = {c: str(d) for d, c in enumerate(tasks.CIPHER)}
    total = int("".join(decode[c] for c in a)) + int("".join(decode[c] for c in b))
    assert example.answer == " " + tasks.encode(str(total))


def test_scaled_down_demo_end_to_end(tmp_path, capsys):
    zoo, fitness = tmp_path / "zoo", tmp_path / "fitness"
    assert (
        main(["zoo", "build", "--small", "--out", str(zoo), "--fitness", str(fitness), "--quiet"])
        == 0
    )
    stamp = (zoo / "zoo.json").stat().st_mtime
    build(zoo, fitness, SMALL, progress=False)  # cached: nothing retrained
    assert (zoo / "zoo.json").stat().st_mtime == stamp
    config = yaml.safe_load((REPO / "search_spaces" / "examples" / "tiny_zoo_run.yaml").read_text())
    config["models"] = {name: str(zoo / name) for name in config["models"]}
    config["fitness"]["include_path"] = str(fitness)
    config.update(
        budget=6,
        pool="local",
        workers=1,
        optimizer={"name": "nsga2", "options": {"population_size": 4}},
    )
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "demo.yaml"), "--out", str(run), "--quiet"]) == 0
    records = RunStore.open(run).records()
    assert len(records) == 6 and not any(r.failed for r in records), [r.error for r in records]
    assert any(r.held_out for r in records)  # the Pareto set was scored on held-out splits
    assert main(["export", str(run), "--pareto", "--to", str(run / "exports"), "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "index.html").exists() and list((run / "exports").iterdir())

    # re-scoring an exported model from disk with lm-eval gives the recorded values
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.workers.scoring import LmEvalFitness

    folder = sorted((run / "exports").iterdir())[0]
    record = next(r for r in records if r.index == int(folder.name.split("-")[1]))
    scorer = LmEvalFitness(
        config["fitness"]["tasks"],
        include_path=str(fitness),
        batch_size=config["fitness"]["batch_size"],
    )
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rescored = scorer(model, AutoTokenizer.from_pretrained(folder))
    for objective in config["objectives"]:
        assert rescored[objective["metric"]] == record.metrics[objective["metric"]]


def test_tokenizer_ids_are_the_bytes_training_feeds():
    from evomerge.zoo.models import byte_tokenizer
    from evomerge.zoo.train import encode_lines

    line = "add ru+qi= ut"
    ids, _ = encode_lines([line])
    assert byte_tokenizer()(line)["input_ids"] == ids[0, :-1].tolist()  # the last is EOS
