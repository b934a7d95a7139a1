"""Training the learned merges' coefficients with everything else frozen.

One module skeleton runs every forward pass through `torch.func.functional_call`: the merged
weights are made from the frozen source tensors and the trainable coefficients at each step,
so gradients reach the coefficients only and no source is copied (autograd keeps references to
the source tensors it multiplies, not copies; the merged weights are the one model-sized
temporary). Device memory while training, P the parameter count and b the sources' bytes per
parameter:

    sources  N x P x b (plus the base: AdaMerging, or a DAM with a base for the other tensors)
  + merged   2 x P x 4 (fp32 merged weights alive through one forward and backward, and one
             more tensor while they are built or their gradient flows)
  + coefficients x 16 (value, gradient, Adam's two moments)
  + activations of one batch (one source's, for DAM: each source steps back on its own): what
    the merged model keeps for backward, and the logits over the vocabulary (DAM: the
    teacher's and the merge's, their log-softmaxes and their gradient; AdaMerging: the logits
    and their gradient); `training_bytes` computes each term

DAM (arXiv:2410.08371): loss = sum_i T^2 KL(p_i^T || q^T) averaged over the non-padding tokens
of source i's own texts, p_i^T the source's and q^T the merge's next-token distribution at
temperature T (2), plus lambda (0.01) times the mean over tensors of the sum over source pairs
of the cosine similarity of their coefficient vectors. Coefficients start at 1/N; Adam.

AdaMerging (arXiv:2310.02575): loss = the mean entropy of the merge's next-token distribution at
the position that answers each fitness prompt (its last token); lambdas start at 0.3, Adam, and
are clamped into [0, 1] after every step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from evomerge.errors import EvomergeError
from evomerge.merge.ops import split_layer_name

TEMPERATURE = 2.0
SIMILARITY_PENALTY = 0.01
ADAMERGING_INIT = 0.3


@dataclass
class TrainSettings:
    steps: Optional[int] = None  # None: one pass over the texts
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    granularity: str = "layer"  # AdaMerging: one lambda per source per "layer" or "tensor"
    embeddings_and_norms: bool = False  # DAM: coefficients for those tensors too
    progress: bool = True


@dataclass
class Learned:
    """Per tensor name, one coefficient tensor per merged source; and how training went."""

    coefficients: dict[str, list[torch.Tensor]]
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def linear_weights(skeleton: torch.nn.Module, names: list[str]) -> list[str]:
    """Those of `names` that are a linear layer's weight in `skeleton`; none is an error."""
    linear = {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    found = [n for n in names if n in linear]
    if not found:
        raise EvomergeError(
            f"{type(skeleton).__name__}: no torch.nn.Linear layers to learn DAM "
            "coefficients for; use adamerging, or a method from `evomerge methods`"
        )
    return found


class FrozenSources:
    """The sources' tensors (frozen) and one module skeleton to run any set of them through."""

    def __init__(
        self,
        skeleton: torch.nn.Module,
        tensors: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        self.skeleton = skeleton.eval()
        for p in self.skeleton.parameters():
            p.requires_grad_(False)
        self.tensors = tensors
        first = next(iter(tensors.values()))
        # the parameters a forward pass replaces: the skeleton's, as its sources store them
        # (a tied head is the embedding: functional_call ties it)
        self.names = [n for n, _ in skeleton.named_parameters() if n in first]
        self.device = next(skeleton.parameters()).device

    def forward(self, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return functional_call(
            self.skeleton, params, args=(), kwargs={**inputs, "use_cache": False}
        ).logits

    def aliases(self) -> dict[str, list[str]]:
        """Parameter name -> the other names the same tensor goes by (a tied head)."""
        first: dict[int, str] = {}
        out: dict[str, list[str]] = {}
        for name, p in self.skeleton.named_parameters(remove_duplicate=False):
            if id(p) in first:
                out.setdefault(first[id(p)], []).append(name)
            else:
                first[id(p)] = name
        return out

    def linear_weights(self) -> list[str]:
        """Names of the linear layers' weights (what DAM scales column by column)."""
        return linear_weights(self.skeleton, self.names)


def _batches(
    texts: list[str],
    tokenizer: Any,
    settings: TrainSettings,
    seed: int,
    templated: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `texts`, reshuffled every pass, forever (`templated`: the texts went
    through the chat template, which wrote their special tokens already)."""
    order = list(range(len(texts)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            chosen = [texts[i] for i in order[start : start + settings.batch_size]]
            yield tokenizer(
                chosen,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=settings.max_length,
                add_special_tokens=not templated,
            )


def _pad_tokenizer(tokenizer: Any) -> Any:
    """Right padding (the last kept token is each row's mask sum less one); a text longer than
    max_length loses its beginning, never the end where a prompt is answered."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


def kl_to_source(
    merged_logits: torch.Tensor,
    source_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """T^2 KL(source || merged) per token at temperature T, averaged over the tokens `mask`
    keeps."""
    log_q = F.log_softmax(merged_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(source_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp(min=1) * temperature**2


def similarity_penalty(coefficients: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Mean over tensors of the summed pairwise cosine similarity of the sources' vectors."""
    terms = []
    for values in coefficients.values():
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                terms.append(F.cosine_similarity(values[i], values[j], dim=0))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() / len(coefficients)


def answer_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distribution at each row's last kept token."""
    last = mask.sum(1) - 1
    rows = logits[torch.arange(logits.shape[0]), last].float()
    log_p = F.log_softmax(rows, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def dam_weights(
    sources: FrozenSources,
    models: list[str],
    coefficients: dict[str, list[torch.Tensor]],
    fallback: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The merged parameters: sum_i c_i * W_i where coefficients exist, else the fallback."""
    out = {}
    for name in sources.names:
        values = coefficients.get(name)
        if values is None:
            out[name] = fallback[name]
            continue
        merged = None
        for model, c in zip(models, values):
            term = sources.tensors[model][name] * c
            merged = term if merged is None else merged + term
        out[name] = merged
    return out


def adamerging_weights(
    sources: FrozenSources,
    base: str,
    models: list[str],
    lambdas: dict[str, torch.Tensor],
    group_of: dict[str, str],
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_k lambda_k (theta_k - theta_0), written (1 - sum_k lambda_k) theta_0 +
    sum_k lambda_k theta_k so that autograd keeps references to the sources, not task-vector
    copies (the stored merge is computed as the method does; the two agree to rounding)."""
    base_tensors = sources.tensors[base]
    out = {}
    for name in sources.names:
        group = lambdas[group_of[name]]
        merged = base_tensors[name] * (1 - group.sum())
        for k, model in enumerate(models):
            merged = merged + sources.tensors[model][name] * group[k]
        out[name] = merged
    return out


def groups(names: list[str], granularity: str) -> dict[str, str]:
    """Tensor name -> its AdaMerging group: the decoder layer, or the tensor itself."""
    if granularity not in ("layer", "tensor"):
        raise EvomergeError(f"--granularity {granularity!r}: use layer or tensor")
    out = {}
    for name in names:
        parts = split_layer_name(name)
        out[name] = f"layer {parts[1]}" if granularity == "layer" and parts else name
    return out


def _run(
    steps: int,
    params: list[torch.Tensor],
    settings: TrainSettings,
    step_loss: Callable[[], tuple[torch.Tensor, dict[str, float]]],
    after_step: Optional[Callable[[], None]] = None,
    desc: str = "learning",
) -> tuple[list[dict[str, Any]], float]:
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    log = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not settings.progress)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        loss, parts = step_loss()
        optimizer.step()
        if after_step is not None:
            after_step()
        row = {"step": step + 1, "loss": round(float(loss), 6), **parts}
        row["seconds"] = round(time.perf_counter() - start, 2)
        log.append(row)
        bar.set_postfix(loss=f"{float(loss):.4f}")
    return log, time.perf_counter() - start


def _summary(
    method: str,
    settings: TrainSettings,
    steps: int,
    tokens: dict[str, int],
    log: list[dict[str, Any]],
    seconds: float,
    trained: Iterable[torch.Tensor],
) -> dict[str, Any]:
    """What the coefficient file's `trained` metadata records of a training run."""
    return {
        "method": method,
        "steps": steps,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "tokens_forward": tokens["forward"],
        "tokens_backward": tokens["backward"],
        "seconds": round(seconds, 2),
        "loss_first": log[0]["loss"] if log else None,
        "loss_last": log[-1]["loss"] if log else None,
        "coefficients": sum(t.numel() for t in trained),
    }


def train_dam(
    sources: FrozenSources,
    tokenizer: Any,
    models: list[str],
    texts: dict[str, list[str]],
    base: Optional[str],
    settings: TrainSettings,
) -> Learned:
    """DAM's column coefficients for `models`, each distilled on its own texts."""
    torch.manual_seed(settings.seed)
    tokenizer = _pad_tokenizer(tokenizer)
    names = sources.linear_weights()
    if settings.embeddings_and_norms:
        names = list(sources.names)
    n = len(models)
    coefficients = {
        name: [
            torch.full(
                (sources.tensors[models[0]][name].shape[-1],),
                1.0 / n,
                device=sources.device,
                requires_grad=True,
            )
            for _ in models
        ]
        for name in names
    }
    if base is not None:
        fallback = {k: sources.tensors[base][k] for k in sources.names}
    else:
        fallback = {
            k: sum(sources.tensors[m][k] for m in models) / n
            for k in sources.names
            if k not in coefficients
        }
    streams = {
        m: _batches(texts[m], tokenizer, settings, settings.seed + i) for i, m in enumerate(models)
    }
    steps = settings.steps or max(math.ceil(len(t) / settings.batch_size) for t in texts.values())
    tokens = {"forward": 0, "backward": 0}

    def step_loss() -> tuple[torch.Tensor, dict[str, float]]:
        total = 0.0
        parts = {}
        for model in models:  # one backward per source: one source's activations at a time
            batch = {k: v.to(sources.device) for k, v in next(streams[model]).items()}
            mask = batch["attention_mask"]
            with torch.no_grad():
                teacher = sources.forward(
                    {k: sources.tensors[model][k] for k in sources.names}, batch
                )
            merged = dam_weights(sources, models, coefficients, fallback)
            kl = kl_to_source(sources.forward(merged, batch), teacher, mask)
            kl.backward()
            del teacher, merged
            count = int(mask.sum())
            tokens["forward"] += 2 * count
            tokens["backward"] += count
            parts[f"kl {model}"] = round(float(kl.detach()), 6)
            total += float(kl.detach())
        penalty = SIMILARITY_PENALTY * similarity_penalty(coefficients)
        if penalty.requires_grad:
            penalty.backward()
        parts["similarity"] = round(float(penalty.detach()), 6)
        return torch.tensor(total + float(penalty.detach())), parts

    flat = [c for values in coefficients.values() for c in values]
    log, seconds = _run(steps, flat, settings, step_loss, desc="DAM")
    summary = _summary("dam", settings, steps, tokens, log, seconds, flat)
    summary["texts"] = {m: len(texts[m]) for m in models}
    out = {name: [c.detach().cpu() for c in values] for name, values in coefficients.items()}
    return Learned(with_aliases(out, sources), log, summary)


def train_adamerging(
    sources: FrozenSources,
    tokenizer: Any,
    base: str,
    models: list[str],
    prompts: list[str],
    settings: TrainSettings,
    templated: bool = False,
) -> Learned:
    """AdaMerging's lambdas for `models` over `base`, by entropy on the fitness prompts."""
    torch.manual_seed(settings.seed)
    tokenizer = _pad_tokenizer(tokenizer)
    group_of = groups(sources.names, settings.granularity)
    lambdas = {
        g: torch.full((len(models),), ADAMERGING_INIT, device=sources.device, requires_grad=True)
        for g in dict.fromkeys(group_of.values())
    }
    stream = _batches(prompts, tokenizer, settings, settings.seed, templated)
    steps = settings.steps or math.ceil(len(prompts) / settings.batch_size)
    tokens = {"forward": 0, "backward": 0}

    def step_loss() -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(sources.device) for k, v in next(stream).items()}
        merged = adamerging_weights(sources, base, models, lambdas, group_of)
        entropy = answer_entropy(sources.forward(merged, batch), batch["attention_mask"])
        entropy.backward()
        count = int(batch["attention_mask"].sum())
        tokens["forward"] += count
        tokens["backward"] += count
        return entropy.detach(), {}

    def clamp() -> None:
        with torch.no_grad():
            for value in lambdas.values():
                value.clamp_(0.0, 1.0)

    log, seconds = _run(steps, list(lambdas.values()), settings, step_loss, clamp, "AdaMerging")
    summary = _summary("adamerging", settings, steps, tokens, log, seconds, lambdas.values())
    summary.update(granularity=settings.granularity, texts=len(prompts))
    out = {
        name: [lambdas[group_of[name]][k].detach().cpu().clone() for k in range(len(models))]
        for name in sources.names
    }
    return Learned(with_aliases(out, sources), log, summary)


def with_aliases(
    coefficients: dict[str, list[torch.Tensor]], sources: FrozenSources
) -> dict[str, list[torch.Tensor]]:
    """The same coefficients under every name of a tied tensor (a checkpoint that stores the
    tied head as well merges it as the embedding, so disk and live model agree)."""
    out = dict(coefficients)
    for name, others in sources.aliases().items():
        if name in coefficients:
            for other in others:
                out[other] = [c.clone() for c in coefficients[name]]
    return out


def training_bytes(
    method: str,
    parameters: int,
    sources: int,
    coefficients: int,
    config: dict[str, Any],
    batch_size: int,
    tokens: int,
) -> dict[str, int]:
    """The module docstring's formula, term by term, for fp32 sources: `parameters` per model,
    `sources` models held (the skeleton's own included), a batch of `batch_size` texts of
    `tokens` tokens. Activations per token and decoder layer: ~10 hidden-sized and 4
    intermediate-sized fp32 tensors kept for backward; logits: DAM keeps the teacher's and the
    merge's logits and log-softmaxes and their gradient (5 vocabulary-sized tensors per
    token), AdaMerging the logits and their gradient (2)."""
    hidden = int(config.get("hidden_size", 0))
    inter = int(config.get("intermediate_size", 4 * hidden))
    layers = int(config.get("num_hidden_layers", 0))
    vocab = int(config.get("vocab_size", 0))
    rows = batch_size * tokens
    terms = {
        "sources": sources * parameters * 4,
        "merged": 2 * parameters * 4,  # the merged weights, and one more tensor while built
        "coefficients": coefficients * 16,
        "activations": rows * layers * (10 * hidden + 4 * inter) * 4,
        "logits": rows * vocab * (5 if method == "dam" else 2) * 4,
    }
    terms["total"] = sum(terms.values())
    return terms
