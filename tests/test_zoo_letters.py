"""The read expert's letters: embedding rows aligned to the base's reading of digits."""

from __future__ import annotations

import random

import pytest
import torch

from evomerge.zoo import letters, lora
from evomerge.zoo.real import RealZooSettings, chat_text, letter_token_ids, splits

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tokenizer(smollm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm)


def test_letters_pair_with_the_digit_tokens_that_end_where_they_do(tokenizer):
    """ " м" is one token and " 7" two: the pairs skip the lone space and keep the rest in step,
    and only the tokens from the prompt's last one on predict the answer."""
    texts = ["rev мбд= 207"]
    written = letters._encode(tokenizer, texts)
    twins = letters._encode(tokenizer, [t.translate(letters.TO_DIGITS) for t in texts])
    assert twins["input_ids"].shape[1] == written["input_ids"].shape[1] + 1
    context = len(tokenizer("rev мбд=", add_special_tokens=False)["input_ids"])
    b, i, j, answer = letters._pairs(written, twins, [context])
    pieces = [
        (tokenizer.decode(written["input_ids"][0, a]), tokenizer.decode(twins["input_ids"][0, c]))
        for a, c in zip(i.tolist(), j.tolist())
    ]
    assert pieces[:5] == [("rev", "rev"), (" м", "7"), ("б", "0"), ("д", "2"), ("=", "=")]
    assert answer.tolist() == [False, False, False, False, *[True] * (len(pieces) - 4)]


def test_only_the_letters_rows_learn_and_they_come_to_read_as_digits(smollm, tokenizer):
    """A few steps lower the alignment loss, change the letters' rows and no other, and run on
    the base alone even with adapters attached (whose scale is back afterwards)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32)
    lora.attach(model, rank=2, alpha=4.0, seed=1)
    adapters = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    with torch.no_grad():
        for m in adapters:
            m.B.normal_(0, 0.05)
    examples = splits(RealZooSettings())["read"]["train_letters"][:64]
    ids = letter_token_ids(tokenizer)
    probe = examples[:4]
    contexts = [chat_text(tokenizer, e.prompt) for e in probe]
    texts = [c + e.answer.strip() for c, e in zip(contexts, probe)]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in contexts]

    def loss() -> float:
        with torch.no_grad(), letters.adapters_off(model):
            return float(letters.alignment_loss(model, tokenizer, texts, lengths, ids))

    before = loss()
    embedding = model.get_input_embeddings().weight.detach().clone()
    delta = letters.train_rows(
        model, tokenizer, examples, ids, steps=6, batch=4, lr=1e-2,
        rng=random.Random(0), chat=chat_text, log=lambda step, value: None, progress=False,
    )  # fmt: skip
    changed = (delta != 0).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids
    assert torch.equal(model.get_input_embeddings().weight.detach() - embedding, delta)
    assert loss() < 0.8 * before
    assert all(m.scale == 2.0 for m in adapters)
