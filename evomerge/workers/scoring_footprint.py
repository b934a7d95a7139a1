"""What scoring a candidate holds at its peak, beside the merge's own memory.

lm-eval runs the live model over a batch of requests padded to the longest. Its peak is

    scoring      = max over the fitness's (and held-out) tasks of
      loglikelihood (multiple choice):  b x T x V x e x 3      a batch's logits and their
                                                               log-softmax, and the last
                                                               batch's, held until replaced
                                      + b x T x (3 I + 4 H) x e  one layer's activations
      generate_until:                   2 x L x b x KV x (T + G) x e   the key/value cache
                                      + b x V x 4 x 3          the last token's fp32 scores
                                      + b x T x (3 I + 4 H) x e  the prompt's activations

    b  the batch size; T the longest request in tokens (context and continuation, as lm-eval
       builds them: chat template, system instruction, few-shot examples), at most the model's
       context length; G the task's max_gen_toks; V the vocabulary; H, I the hidden and MLP
       widths; L the layers; KV the key/value width (kv heads x head dim); e the score dtype's
       bytes

The longest request is measured, not guessed: the tasks' requests are built as lm-eval builds
them and tokenized by the base model's tokenizer, once, before any worker starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from evomerge.config import LmEvalFitnessSpec
from evomerge.workers.model_shape import Shape
from evomerge.workers.scoring import load_tasks, working_dir

LOGLIKELIHOOD = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
DEFAULT_GEN_TOKS = 256  # lm-eval's HFLM default


@dataclass(frozen=True)
class Requests:
    """The longest request of each kind the fitness asks for."""

    loglikelihood: int = 0  # tokens of the longest context + continuation
    generate: int = 0  # tokens of the longest prompt
    gen_tokens: int = 0  # the largest max_gen_toks


@dataclass(frozen=True)
class ScoringFootprint:
    batch: int
    tokens: int  # the longest request's tokens (the formula's T)
    logits: int
    activations: int
    cache: int

    @property
    def total(self) -> int:
        return self.logits + self.activations + self.cache

    def parts(self) -> dict[str, int]:
        return {"logits": self.logits, "activations": self.activations, "cache": self.cache}

    def at_batch(self, batch: int) -> ScoringFootprint:
        """The same requests at another batch size (every term is linear in it)."""
        scale = lambda part: part * batch // self.batch  # noqa: E731
        return replace(self, batch=batch, logits=scale(self.logits),
                       activations=scale(self.activations), cache=scale(self.cache))  # fmt: skip


def scoring_bytes(shape: Shape, requests: Requests, batch: int, element: int) -> ScoringFootprint:
    """The formula above for one batch size."""
    width = shape.activation_width
    t_ll = min(requests.loglikelihood, shape.context)
    t_gen = min(requests.generate + requests.gen_tokens, shape.context)
    ll = (3 * batch * t_ll * shape.vocab * element, batch * t_ll * width * element, 0)
    gen = (
        3 * batch * shape.vocab * 4,
        batch * min(requests.generate, shape.context) * width * element,
        batch * shape.cache_width * t_gen * element,
    )
    logits, activations, cache = max(ll, gen, key=sum) if requests.generate else ll
    tokens = t_ll if sum(ll) >= sum(gen) or not requests.generate else t_gen
    return ScoringFootprint(batch, tokens, logits, activations, cache)


def longest_requests(fitness: LmEvalFitnessSpec, tokenizer: Any) -> Requests:
    """The fitness's (and its held-out tasks') longest requests, built as lm-eval builds them
    (the same chat template, system instruction and few-shot count) and tokenized."""
    tasks = list(fitness.tasks) + (list(fitness.held_out.tasks) if fitness.held_out else [])
    loaded = load_tasks(tasks, fitness.include_path, fitness.num_fewshot, fitness.gen_kwargs)
    folder = Path(fitness.include_path).resolve() if fitness.include_path else None
    # a tokenizer without a chat template is measured without one (lm-eval, which may fall back
    # or refuse, says so when it scores): the estimate never stops a run on its own
    templated = fitness.apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
    template = _chat_template(tokenizer) if templated else None
    ll = gen = gen_toks = 0
    for task in loaded["tasks"].values():
        with working_dir(folder):
            task.build_all_requests(
                limit=fitness.limit,
                system_instruction=fitness.system_instruction,
                apply_chat_template=templated,
                fewshot_as_multiturn=fitness.fewshot_as_multiturn and templated,
                chat_template=template,
            )
        kind = task.config.output_type
        for instance in task.instances:
            context = _count(tokenizer, instance.args[0])
            if kind in LOGLIKELIHOOD:
                continuation = _count(tokenizer, instance.args[1]) if len(instance.args) > 1 else 0
                ll = max(ll, context + continuation)
            else:
                gen = max(gen, context)
                kwargs = instance.args[1] if len(instance.args) > 1 else {}  # gen_kwargs applied
                gen_toks = max(gen_toks, int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKS)))
    return Requests(ll, gen, gen_toks)


def largest_batch(per_sequence: int, free: int, ceiling: int = 64) -> int:
    """`batch_size: auto`: the largest batch (a power of two, at most `ceiling`, at least 1)
    whose scoring fits in `free` bytes."""
    fits = max(1, free // max(1, per_sequence))
    return max(1, min(ceiling, 2 ** int(math.log2(fits))))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # a BOS, if any


def _chat_template(tokenizer: Any) -> Optional[Any]:
    def apply(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(
            history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    return apply
