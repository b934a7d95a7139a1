"""Multiple-choice scoring with each context run once gives lm-eval's own log-likelihoods."""

from __future__ import annotations

import pytest
import torch


def requests_for(tokenizer, window: int, alone: bool = True) -> list:
    """Contexts of several lengths behind one shared prefix (as a chat template makes them),
    each with choices of one, two and five tokens, plus a request longer than the window and
    (`alone`) one whose context shares nothing with the others."""
    prefix = tokenizer.encode("system: answer with the number. user: ")
    out = []
    for question in ("12+7=", "3+40=", "100+1=", "9="):
        ctx = prefix + tokenizer.encode(question)
        for choice in ("1", "19", "43", "10101", "x"):
            out.append(((question, choice), ctx, tokenizer.encode(choice)))
    if alone:
        other = tokenizer.encode("no shared prefix here:")
        out.append((("alone", "7"), other, tokenizer.encode("7")))
    out.append((("long", "12"), list(range(3, 3 + window)), tokenizer.encode("12")))
    return out


def both_scorers(path, batch_size: int):
    """The model at `path`, lm-eval's stock HFLM and the shared-context one around it."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.workers.shared_context import SharedContextHFLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=batch_size)
    shared = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, device="cpu",
                               batch_size=batch_size)  # fmt: skip
    return model, tokenizer, stock, shared


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
@pytest.mark.parametrize("alone", [True, False], ids=["one-apart", "all-share"])
def test_shared_context_scores_equal_lm_evals_own(families, arch, batch_size, alone):
    _, tokenizer, stock, shared = both_scorers(families[arch]["ft0"], batch_size)
    requests = requests_for(tokenizer, stock.max_length, alone)
    want = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(got) == len(want)
    for (request, _, _), (lp, greedy), (lp_want, greedy_want) in zip(requests, got, want):
        assert lp == pytest.approx(lp_want, abs=1e-4), request
        assert greedy == greedy_want, request
    # the choices of one context must be told apart the way lm-eval tells them apart
    by_context = [got[i : i + 5] for i in range(0, 20, 5)]
    wanted = [want[i : i + 5] for i in range(0, 20, 5)]
    for ours, theirs in zip(by_context, wanted):
        assert max(range(5), key=lambda k: ours[k][0]) == max(range(5), key=lambda k: theirs[k][0])


def test_fitness_scores_multiple_choice_through_the_shared_context(llama, tmp_path):
    """LmEvalFitness wraps the live model in the shared-context scorer, and a task's accuracy
    and per-document values equal lm-eval's stock HFLM on the same model."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.workers.scoring import LmEvalFitness
    from evomerge.workers.shared_context import SharedContextHFLM

    from .test_workers import make_tasks

    tasks = make_tasks(tmp_path / "tasks")
    fitness = LmEvalFitness(["parity_fit"], include_path=str(tasks), batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(llama["ft1"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama["ft1"])
    ours = fitness(model, tokenizer)
    assert isinstance(fitness._lm, SharedContextHFLM)
    stock = evaluate(
        lm=HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4),
        task_dict=fitness.task_dict,
        bootstrap_iters=0,
        log_samples=True,
        verbosity="ERROR",
    )
    assert ours["parity_fit: acc,none"] == stock["results"]["parity_fit"]["acc,none"]
    docs = sorted(stock["samples"]["parity_fit"], key=lambda s: s["doc_id"])
    assert ours["per_example"] == [float(d["acc"]) for d in docs]


def test_a_batch_holds_no_more_than_lm_evals_own_batch_would():
    """Where a position's key/value cache is large (many layers, full-width heads), a batch
    takes fewer contexts: its continuations' cache and logits stay within the memory of
    lm-eval's batch of whole sequences, which the scoring formula counts."""
    from evomerge.workers.model_shape import Shape
    from evomerge.workers.shared_context import _batch_end

    ordered = [(tuple(range(20)), [4 * g + k for k in range(4)]) for g in range(64)]
    requests = [(("q", "a"), list(range(20)), [1, 2]) for _ in range(256)]
    small_cache = Shape(vocab=49152, hidden=576, intermediate=1536, layers=30, kv_width=192,
                        context=2048)  # fmt: skip
    wide_cache = Shape(vocab=32000, hidden=4096, intermediate=11008, layers=32, kv_width=4096,
                       context=4096)  # fmt: skip
    assert _batch_end(ordered, 0, 32, requests, small_cache) == 32  # capped by batch_size
    few = _batch_end(ordered, 0, 32, requests, wide_cache)
    assert 1 <= few < 32
    # the budget: lm-eval's 32 sequences of 22 tokens, their logits x 3 and activations
    shape = wide_cache
    width = 3 * shape.intermediate + 4 * shape.hidden
    budget = 32 * 22 * (3 * shape.vocab + width)
    held = lambda n: 4 * n * (22 * 2 * shape.layers * shape.kv_width + 2 * (shape.vocab + width))  # noqa: E731
    assert held(few) <= budget < held(few + 1)


def test_rolling_loglikelihood_and_the_fallback_equal_lm_evals_own(llama, monkeypatch):
    """Perplexity-style requests (rolling windows, one continuation each) score as lm-eval's
    own; a model whose cache cannot be reindexed is scored by lm-eval's path, same results."""
    from lm_eval.api.instance import Instance

    from evomerge.workers.shared_context import SharedContextHFLM

    _, tokenizer, stock, shared = both_scorers(llama["ft2"], 4)
    texts = ["the quick brown fox " * 12, "jumps over the lazy dog", "x" * (stock.max_length + 40)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    want = stock.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert shared.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(want, abs=1e-3)

    requests = requests_for(tokenizer, stock.max_length)
    monkeypatch.setattr(SharedContextHFLM, "_score_batch", lambda self, groups, requests: None)
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    want = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


def generation_requests(count: int = 7) -> list:
    from lm_eval.api.instance import Instance

    prompts = [f"system: answer. user: {n}+{n * 3}=" for n in range(count)] + ["apart: 9"]
    kwargs = {"until": ["\n", "<<<"], "max_gen_toks": 6, "do_sample": False}
    return [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_greedy_generation_equals_lm_evals_own(families, arch, batch_size):
    """Generations (stopped by a stop string, by the end-of-sequence token, or at max_gen_toks)
    equal lm-eval's through transformers' generate, token for token."""
    model, tokenizer, stock, shared = both_scorers(families[arch]["ft1"], batch_size)
    want = stock.generate_until(generation_requests(), disable_tqdm=True)
    assert shared.generate_until(generation_requests(), disable_tqdm=True) == want
    assert len(set(want)) > 1  # the prompts lead to different generations
    # the end-of-sequence token ends a row early: the same as transformers' padding after it
    eos = tokenizer.encode(want[0])[0] if want[0] else 0
    model.generation_config.eos_token_id = eos
    want = stock.generate_until(generation_requests(), disable_tqdm=True)
    assert shared.generate_until(generation_requests(), disable_tqdm=True) == want


def test_generation_with_a_logits_processor_is_lm_evals_own(llama, monkeypatch):
    """A generation config that adds a logits processor (a repetition penalty), or sampling,
    goes through transformers' generate, so its effect is kept."""
    from lm_eval.models.huggingface import HFLM

    model, _, _, shared = both_scorers(llama["ft0"], 4)
    assert shared._plain_greedy({"do_sample": False, "attention_mask": None})
    assert not shared._plain_greedy({"do_sample": True, "temperature": 0.7})
    model.generation_config.repetition_penalty = 1.3
    assert not shared._plain_greedy({"do_sample": False})
    calls = []
    original = HFLM._model_generate
    monkeypatch.setattr(
        HFLM, "_model_generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    out = shared.generate_until(generation_requests(3), disable_tqdm=True)
    assert calls and len(out) == 4
