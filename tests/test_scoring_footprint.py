"""Scoring's term of the memory formula: the longest request is the one lm-eval builds, the
bytes are the equation written out, `batch_size: auto` picks the largest batch that fits beside
the rest of a worker, and the fit check counts scoring."""

from __future__ import annotations

import json

import psutil
from transformers import AutoTokenizer

from evomerge.config import RunConfig
from evomerge.search.prepare import prepare
from evomerge.workers.footprint import check_fits, choose_batch, pool_config, predict
from evomerge.workers.scoring_footprint import (
    Requests,
    Shape,
    largest_batch,
    longest_requests,
    scoring_bytes,
)
from evomerge.zoo.real import GEN_YAML  # the real zoo's generative tasks: max_gen_toks 8

from .test_run import run_config
from .test_workers import make_tasks


def tasks_with_generation(folder):
    make_tasks(folder)
    (folder / "echo_gen.yaml").write_text(GEN_YAML.format(name="echo_gen"))
    with open(folder / "echo_gen.jsonl", "w") as f:
        for n in range(5):
            f.write(json.dumps({"prompt": "say " + "ab" * n, "target": "ab" * n}) + "\n")
    return folder


def lm_eval_run(llama, folder, batch_size=4, tasks=("parity_fit",)) -> RunConfig:
    return RunConfig.from_dict(
        run_config(
            llama,
            objectives=[{"name": "parity", "metric": "parity_fit: acc,none"}],
            fitness={
                "kind": "lm_eval",
                "tasks": list(tasks),
                "include_path": str(folder),
                "batch_size": batch_size,
                "held_out": {"tasks": ["parity_held"]},
            },
        )
    )


def test_the_longest_request_is_the_longest_lm_eval_builds(llama, tmp_path):
    folder = tasks_with_generation(tmp_path / "tasks")
    config = lm_eval_run(llama, folder, tasks=("parity_fit", "echo_gen"))
    tokenizer = AutoTokenizer.from_pretrained(llama["base"])

    def count(text: str) -> int:  # the tokens lm-eval feeds, a BOS allowed for
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    docs = [json.loads(line) for name in ("parity_fit", "parity_held")
            for line in (folder / f"{name}.jsonl").read_text().splitlines()]  # fmt: skip
    expected_ll = max(count(d["prompt"]) + count(c) for d in docs for c in d["choices"])
    prompts = [json.loads(line)["prompt"] for line in (folder / "echo_gen.jsonl").open()]
    found = longest_requests(config.fitness, tokenizer)
    assert found == Requests(expected_ll, max(map(count, prompts)), 8)
    # a tokenizer without a chat template (this byte tokenizer) is measured without one: the
    # estimate never stops a run that lm-eval itself would score
    templated = config.fitness.model_copy(update={"apply_chat_template": True})
    assert longest_requests(templated, tokenizer) == found


def test_the_scoring_bytes_are_the_equation():
    shape = Shape(vocab=1000, hidden=64, intermediate=256, layers=4, kv_width=32, context=512)
    b, e = 8, 4
    ll_only = scoring_bytes(shape, Requests(loglikelihood=50), b, e)
    assert ll_only.logits == 3 * b * 50 * 1000 * e  # logits, log-softmax, the last batch's
    assert ll_only.activations == b * 50 * (3 * 256 + 4 * 64) * e
    assert ll_only.cache == 0 and ll_only.tokens == 50
    # a long generation: the key/value cache over prompt + generated tokens outweighs the logits
    gen = scoring_bytes(shape, Requests(loglikelihood=10, generate=300, gen_tokens=200), b, e)
    assert gen.cache == 2 * 4 * b * 32 * 500 * e
    assert gen.logits == 3 * b * 1000 * 4 and gen.tokens == 500
    assert gen.total > scoring_bytes(shape, Requests(loglikelihood=10), b, e).total
    capped = scoring_bytes(shape, Requests(loglikelihood=5000), b, e)  # lm-eval truncates
    assert capped.tokens == 512
    assert scoring_bytes(shape, Requests(loglikelihood=50), 2 * b, e).total == 2 * ll_only.total


def test_a_bigger_batch_costs_scoring_memory_in_the_footprint(llama, tmp_path):
    folder = make_tasks(tmp_path / "tasks")
    small = predict(*prepare(lm_eval_run(llama, folder, batch_size=2)))
    large = predict(*prepare(lm_eval_run(llama, folder, batch_size=16)))
    assert large.scoring.total == 8 * small.scoring.total > 0
    assert large.peak - small.peak == large.scoring.total - small.scoring.total
    assert "+ scoring" in large.describe() and "batch 16 x" in large.describe()


def test_auto_batch_is_the_largest_that_fits_and_reaches_the_workers(llama, tmp_path, monkeypatch):
    folder = make_tasks(tmp_path / "tasks")
    config = lm_eval_run(llama, folder, batch_size="auto")
    resolved, space = prepare(config)
    one = predict(resolved, space)
    assert one.auto_batch and one.scoring.batch == 1
    rest = one.peak - one.scoring.total
    per_sequence = one.scoring.total

    class Free:  # room for the rest and exactly 5 sequences, with the formula's headroom
        available = int((rest + 5 * per_sequence) / 0.9) + 1

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free())
    chosen = choose_batch(one, resolved)
    assert chosen.scoring.batch == 4  # the largest power of two that fits
    assert chosen.scoring.total == 4 * per_sequence and check_fits(chosen, resolved) is None
    assert pool_config(resolved, chosen).fitness.batch_size == 4
    assert resolved.fitness.batch_size == "auto"  # the run's own config keeps auto
    assert largest_batch(per_sequence, 10**15) == 64  # lm-eval's own ceiling


def test_a_run_whose_scoring_cannot_fit_says_so(llama, tmp_path, monkeypatch):
    folder = make_tasks(tmp_path / "tasks")
    resolved, space = prepare(lm_eval_run(llama, folder, batch_size=64))
    footprint = predict(resolved, space)

    class Free:  # enough for everything but scoring
        available = int((footprint.peak - footprint.scoring.total / 2) / 0.9)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free())
    problem = check_fits(footprint, resolved)
    assert problem is not None and "smaller fitness batch_size" in problem


def test_a_python_fitness_is_not_estimated(llama):
    resolved, space = prepare(RunConfig.from_dict(run_config(llama)))
    footprint = predict(resolved, space)
    assert footprint.scoring is None and "not estimated" in footprint.describe()
