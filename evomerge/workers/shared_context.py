"""lm-eval's Hugging Face model, with shared contexts run once.

lm-eval scores each choice of a multiple-choice document as its own sequence, context
included, and every chat-templated prompt repeats the template's system turn. Here the prefix
a call's (or a generation batch's) requests share runs once, each context's own tokens run on
its cache, each choice runs only its own tokens on its context's cache, and the vocabulary
head runs only where a token is scored; greedy generation then decodes one token a step as
transformers' greedy search does. Log-likelihoods, greedy flags and generations are lm-eval's
own (the same positions, the same softmax dtype, the same stopping); log-likelihoods differ
from the stock path by float rounding only. What this path cannot take (a model without a
selectable key/value cache, an encoder-decoder, a sequence longer than the model's window,
sampling, beams, a logits processor) goes to lm-eval's own path.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM, stop_sequences_criteria
from tqdm import tqdm

from evomerge.workers.model_shape import Shape

Request = tuple[tuple[str, str], list[int], list[int]]


# generation-config fields that leave greedy decoding plain (ids, switches, sampling knobs
# that greedy ignores); any other set field may add a logits processor: lm-eval's path then
PLAIN_GENERATION_FIELDS = {
    "_from_model_config", "transformers_version", "bos_token_id", "eos_token_id",
    "pad_token_id", "decoder_start_token_id", "use_cache", "output_attentions",
    "output_hidden_states", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "do_sample", "max_length",
}  # fmt: skip


class SharedContextHFLM(HFLM):
    """HFLM whose contexts run once: a multiple-choice document's for all its choices, and the
    prefix a batch's prompts share (a chat template's system turn) once for the batch."""

    _call_prefix: tuple[tuple[int, ...], Any] = ((), None)

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        window = self.max_length
        fits = [len(ctx) > 0 and len(ctx) + len(cont) - 1 <= window for _, ctx, cont in requests]
        if self.backend != "causal" or self.batch_size == "auto" or not any(fits):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        results: list[Any] = [None] * len(requests)
        rest = [i for i, ok in enumerate(fits) if not ok]
        if rest:
            stock = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm)
            for i, answer in zip(rest, stock):
                results[i] = answer
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, ok in enumerate(fits):
            if ok:
                groups.setdefault(tuple(requests[i][1]), []).append(i)
        # longest contexts first, as lm-eval orders: a batch pads little, memory peaks early
        ordered = sorted(groups.items(), key=lambda item: -len(item[0]))
        contexts = [ctx for ctx, _ in ordered]
        self._call_prefix = (contexts[0][: _common_prefix(contexts)], None)
        pbar = tqdm(
            total=len(requests) - len(rest),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        per_batch = max(1, int(self.batch_size))
        start = 0
        while start < len(ordered):
            stop = _batch_end(ordered, start, per_batch, requests, self._shape())
            answers = self._score_batch(ordered[start:stop], requests)
            if answers is None:  # no selectable cache: lm-eval's own path for everything left
                left = [i for _, members in ordered[start:] for i in members]
                stock = super()._loglikelihood_tokens([requests[i] for i in left], True)
                for i, answer in zip(left, stock):
                    results[i] = answer
                break
            for i, answer in answers.items():
                results[i] = answer
                if requests[i][0] is not None:  # rolling windows are cached per document
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            pbar.update(len(answers))
            start = stop
        pbar.close()
        self._call_prefix = ((), None)  # the kept prefix cache goes with the call
        return results

    def _run_contexts(self, contexts: list[tuple[int, ...]]) -> Any:
        """The contexts of one batch run on the cache of the prefix they share: each one's
        next-token logits, the cache after (None where the model's cannot be reindexed), the
        attention mask over it, and each context's length."""
        device = self.device
        shared = _common_prefix(contexts)
        lengths = torch.tensor([len(ctx) for ctx in contexts], device=device)
        own = _padded([ctx[shared:] for ctx in contexts], device)
        mask = torch.cat([torch.ones((len(contexts), shared), dtype=torch.long, device=device),
                          own[1]], dim=1)  # fmt: skip
        last = lengths - 1 - shared  # each context's last token, within its own part
        keep = torch.unique(last)  # the positions whose next-token logits are needed
        name = _cache_argument(self.model)
        cache = self._prefix_cache(contexts[0][:shared]) if shared else None
        if shared:
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return None, None, mask, lengths
            cache.batch_repeat_interleave(len(contexts))
        out = self.model(
            input_ids=own[0],
            attention_mask=mask,
            position_ids=shared + torch.arange(own[0].shape[1], device=device).expand_as(own[0]),
            use_cache=True,
            logits_to_keep=keep,
            **({name: cache} if cache is not None else {}),
        )
        cache = getattr(out, name, None)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            cache = None
        rows = torch.arange(len(contexts), device=device)
        return out.logits[rows, torch.searchsorted(keep, last)], cache, mask, lengths

    def _score_batch(
        self, groups: list[tuple[tuple[int, ...], list[int]]], requests: list[Request]
    ) -> dict[int, tuple[float, bool]] | None:
        """One batch: the prefix its contexts share, once; each context's own tokens on that
        prefix's cache; every continuation of theirs on its context's cache."""
        device = self.device
        name = _cache_argument(self.model)
        with torch.no_grad(), self._autocast():
            first, cache, mask, lengths = self._run_contexts([ctx for ctx, _ in groups])
            if cache is None:
                return None
            members = [(row, i) for row, (_, idx) in enumerate(groups) for i in idx]
            owner = torch.tensor([row for row, _ in members], device=device)
            conts = [requests[i][2] for _, i in members]
            rest = None
            if max(len(c) for c in conts) > 1:  # the tokens after each continuation's first
                cont_ids, cont_mask = _padded([c[:-1] for c in conts], device)
                cache.batch_select_indices(owner.cpu())  # indexes a cache spread over devices
                steps = torch.arange(cont_ids.shape[1], device=device)
                rest = self.model(
                    input_ids=cont_ids,
                    attention_mask=torch.cat([mask[owner], cont_mask], dim=1),
                    position_ids=lengths[owner].unsqueeze(1) + steps,
                    use_cache=True,
                    **{name: cache},
                ).logits  # [continuations, longest - 1, vocab]
            answers: dict[int, tuple[float, bool]] = {}
            for r, (row, i) in enumerate(members):
                cont = conts[r]
                logits = first[row].unsqueeze(0)
                if len(cont) > 1:
                    logits = torch.cat([logits, rest[r, : len(cont) - 1]], dim=0)
                logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                target = torch.tensor(cont, device=device)
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                answers[i] = (float(logprobs.gather(1, target.unsqueeze(1)).sum()), greedy)
        return answers

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Greedy generation with the batch's shared prefix run once (the prompts' own tokens
        on its cache), then one token a step for every row, as transformers' greedy search
        does it: a row that has ended (an end-of-sequence token) is padded after, and the
        batch stops when lm-eval's stop sequences say so, every row has ended, or at
        `max_length`. Anything but plain greedy decoding goes to lm-eval's own path."""
        mask = kwargs.get("attention_mask")
        if self.backend != "causal" or not self._plain_greedy(kwargs):
            return super()._model_generate(context, max_length, stop, **kwargs)
        rows = [tuple(row[keep.bool()].tolist()) for row, keep in
                zip(context, mask if mask is not None else torch.ones_like(context))]  # fmt: skip
        prefix = rows[0][: _common_prefix(rows)]
        if self._call_prefix[0] != prefix:  # batches that share a prefix share its cache
            self._call_prefix = (prefix, None)
        name = _cache_argument(self.model)
        with torch.no_grad(), self._autocast():
            logits, cache, seen, lengths = self._run_contexts(rows)
            if cache is None:
                return super()._model_generate(context, max_length, stop, **kwargs)
            criteria = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], len(rows))
            eos = _eos_ids(self.model.generation_config)
            pad = self.tokenizer.pad_token_id
            pad = pad if pad is not None else (eos[0] if eos else 0)
            running = torch.ones(len(rows), dtype=torch.bool, device=self.device)
            out = context
            for step in range(max(0, max_length - context.shape[1])):
                token = logits.float().argmax(dim=-1)
                token = torch.where(running, token, torch.full_like(token, pad))
                out = torch.cat([out, token.unsqueeze(1)], dim=1)
                if eos:
                    running &= ~torch.isin(token, torch.tensor(eos, device=self.device))
                stopped = [bool(c(out, None)) for c in criteria]  # each keeps its own tracker
                if any(stopped) or not running.any() or out.shape[1] >= max_length:
                    break
                seen = torch.cat([seen, torch.ones_like(seen[:, :1])], dim=1)
                step_out = self.model(
                    input_ids=token.unsqueeze(1),
                    attention_mask=seen,
                    position_ids=(lengths + step).unsqueeze(1),
                    use_cache=True,
                    **{name: cache},
                )
                cache, logits = getattr(step_out, name), step_out.logits[:, -1]
        return out

    def _plain_greedy(self, kwargs: dict[str, Any]) -> bool:
        """Whether transformers would decode greedily with no logits processor: no sampling,
        one beam, nothing in the model's generation config beyond ids and switches."""
        extra = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        config = self.model.generation_config
        do_sample = extra.pop("do_sample", None)
        extra.pop("temperature", None)  # no effect without sampling
        sampling = do_sample if do_sample is not None else bool(config.do_sample)
        if extra or sampling:
            return False
        return set(config.to_diff_dict()) <= PLAIN_GENERATION_FIELDS

    def _prefix_cache(self, tokens: tuple[int, ...]) -> Any:
        """The key/value cache of `tokens` alone (one sequence), for a batch to extend. The
        prefix every request of the call shares (a chat template's system turn) is run once per
        call and copied for each batch; a batch's longer prefix runs on top of a copy."""
        base, kept = self._call_prefix
        if base and kept is None:
            kept = self._extend(base, None, 0)
            self._call_prefix = (base, kept)
        cache = copy.deepcopy(kept) if base and kept is not None else None
        if base and cache is None:
            return None
        if len(tokens) > len(base):
            cache = self._extend(tokens[len(base) :], cache, len(base))
        return cache

    def _extend(self, tokens: tuple[int, ...], cache: Any, offset: int) -> Any:
        """One sequence's tokens run on `cache` (positions from `offset`); the cache after."""
        name = _cache_argument(self.model)
        ids = torch.tensor([list(tokens)], device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones(
                (1, offset + len(tokens)), dtype=torch.long, device=self.device
            ),
            position_ids=offset + torch.arange(len(tokens), device=self.device).unsqueeze(0),
            use_cache=True,
            logits_to_keep=1,
            **({name: cache} if cache is not None else {}),
        )
        return getattr(out, name, None)

    def _shape(self) -> Shape:
        if getattr(self, "_model_shape", None) is None:
            self._model_shape = Shape.of(self.model.config.to_dict())
        return self._model_shape

    def _autocast(self) -> Any:
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )


def _cache_argument(model: Any) -> str:
    """The forward argument (and output field) that carries the key/value cache: `cache` in
    recent transformers, `past_key_values` before."""
    return _cache_argument_of(type(model))


@functools.lru_cache(maxsize=32)
def _cache_argument_of(model_class: type) -> str:  # read once per class, not every pass
    names = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def _common_prefix(contexts: list[tuple[int, ...]]) -> int:
    """How many leading tokens every context shares, leaving each at least one of its own
    (its last token's logits come from the pass over its own tokens)."""
    shortest = min(len(c) for c in contexts) - 1
    first = contexts[0]
    n = 0
    while n < shortest and all(c[n] == first[n] for c in contexts):
        n += 1
    return n


def _padded(sequences: list[Any], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded into one tensor, and the mask of the real ones."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, : len(seq)] = torch.tensor(list(seq), device=device)
            mask[row, : len(seq)] = 1
    return ids, mask


def _batch_end(
    ordered: list[tuple[tuple[int, ...], list[int]]],
    start: int,
    per_batch: int,
    requests: list[Request],
    shape: Shape,
) -> int:
    """Where the batch that starts at `start` ends: at most `per_batch` contexts, and no more
    memory than lm-eval's own batch of `per_batch` whole sequences (its logits, their softmax
    and one layer's activations: the scoring formula's terms) for the continuations' key/value
    cache, logits and activations."""
    width, cache = shape.activation_width, shape.cache_width  # elements per position
    longest = len(ordered[start][0]) + max(len(requests[i][2]) for i in ordered[start][1])
    budget = per_batch * longest * (3 * shape.vocab + width)
    context = len(ordered[start][0])  # the longest of the batch: contexts come longest first
    rows, span, stop = 0, 1, start
    while stop < len(ordered) and stop - start < per_batch:
        members = ordered[stop][1]
        wider = max(span, *(len(requests[i][2]) for i in members))
        held = (rows + len(members)) * ((context + wider) * cache + wider * (shape.vocab + width))
        if stop > start and held > budget:
            break
        rows, span, stop = rows + len(members), wider, stop + 1
    return stop


def _eos_ids(config: Any) -> list[int]:
    """The end-of-sequence ids transformers stops a row at (one id or several)."""
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
