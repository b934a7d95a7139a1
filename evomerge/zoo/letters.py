"""New words for the read expert: the letters' embedding rows, trained so that the frozen base
reads a number in letters as it reads the same number in digits.

A row trained by the task's own loss through the expert's adapters learns whatever those
adapters need, and is read by no other model (merged with add, such rows left the target at
0.02). Aligned to the base instead, the rows stand for digits in the representation every
fine-tune of that base shares, so a model that computes on digits reads them too.

The loss, on each training prompt in letters and its twin in digits (same characters, one
letter a digit): the mean squared difference of the two hidden states at every layer, each
layer scaled by the twin's variance, at the tokens whose text ends at the same character; plus
-log(1 - p(letters)) where the answer is predicted. The embedding is tied to the output
layer, so rows close to the digits' would also be written as answers; the second term keeps
the answers in digits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from evomerge.zoo import lora, tasks

TO_DIGITS = str.maketrans({letter: str(d) for d, letter in enumerate(tasks.LETTERS)})


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The base alone, while its adapters stay attached (their scale at zero)."""
    wrapped = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    scales = [m.scale for m in wrapped]
    for m in wrapped:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(wrapped, scales):
            m.scale = scale


def _encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(
        texts,
        add_special_tokens=False,
        return_tensors="pt",
        padding=True,
        return_offsets_mapping=True,
    )


def _pairs(
    letters: dict[str, torch.Tensor], digits: dict[str, torch.Tensor], contexts: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(example, token in letters, token in digits, predicts the answer) for the tokens of the
    two texts that end at the same character: " м" is one token, " 7" two, so the rest shift."""
    rows: list[tuple[int, int, int, bool]] = []
    for b, context in enumerate(contexts):
        ends = {
            int(end): j
            for j, (_, end) in enumerate(digits["offset_mapping"][b].tolist())
            if digits["attention_mask"][b, j]
        }
        mask = letters["attention_mask"][b]
        first = int(mask.argmax())  # padding on either side
        for i, (_, end) in enumerate(letters["offset_mapping"][b].tolist()):
            if mask[i] and end in ends:
                rows.append((b, i, ends[end], i - first >= context - 1))
    b, i, j, answer = zip(*rows)
    return torch.tensor(b), torch.tensor(i), torch.tensor(j), torch.tensor(answer)


def alignment_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    contexts: list[int],
    letter_ids: Sequence[int],
) -> torch.Tensor:
    """The loss above for chat-templated `texts` in letters (prompt and answer), `contexts`
    tokens of each being the prompt."""
    written = _encode(tokenizer, texts)
    twins = _encode(tokenizer, [t.translate(TO_DIGITS) for t in texts])
    b, i, j, answer = _pairs(written, twins, contexts)
    with torch.no_grad():
        teacher = model(
            input_ids=twins["input_ids"],
            attention_mask=twins["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    out = model(
        input_ids=written["input_ids"],
        attention_mask=written["attention_mask"],
        output_hidden_states=True,
    )
    states = out.hidden_states
    loss = sum(
        ((states[k][b, i] - teacher[k][b, j]) ** 2).mean() / teacher[k][b, j].var()
        for k in range(1, len(states))
    ) / (len(states) - 1)
    p_letters = out.logits[b[answer], i[answer]].softmax(-1)[:, list(letter_ids)].sum(-1)
    return loss - torch.log1p(-p_letters.clamp(max=1 - 1e-6)).mean()


def train_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[tasks.Example],
    letter_ids: Sequence[int],
    steps: int,
    batch: int,
    lr: float,
    rng: random.Random,
    chat: Callable[[Any, str], str],
    log: Callable[[int, float], None],
    progress: bool = True,
) -> torch.Tensor:
    """Train the letters' rows of the input embedding alone (everything else frozen, any
    adapters off) and return the embedding's change (zero outside those rows)."""
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    mask = torch.zeros(embedding.shape[0], 1)
    mask[list(letter_ids)] = 1.0
    embedding.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding], lr=lr, weight_decay=0.0)
    with adapters_off(model):
        for step in tqdm(range(steps), desc="letters", disable=not progress):
            chosen = [examples[rng.randrange(len(examples))] for _ in range(batch)]
            contexts = [chat(tokenizer, e.prompt) for e in chosen]
            texts = [c + e.answer.strip() for c, e in zip(contexts, chosen)]
            lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in contexts]
            loss = alignment_loss(model, tokenizer, texts, lengths, letter_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            embedding.grad.mul_(mask)  # only the letters' rows learn
            optimizer.step()
            if step % 10 == 0 or step == steps - 1:
                log(step, float(loss.detach()))
    embedding.requires_grad_(False)
    return embedding.detach() - before
