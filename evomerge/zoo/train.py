"""Small, deterministic CPU training loops for the zoo: pre-train a base on noise text, then
fine-tune one copy per skill on correct examples."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional

import torch
from tqdm.auto import tqdm

EOS = 257
PAD = 258


def encode_lines(lines: Sequence[str], max_len: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids (+ EOS) padded to a batch, and the mask of real tokens."""
    rows = [list(line.encode())[: max_len - 1] + [EOS] for line in lines]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def train(
    model: torch.nn.Module,
    lines: Sequence[str],
    steps: int,
    *,
    lr: float = 2e-3,
    batch: int = 64,
    seed: int = 0,
    desc: str = "training",
    answer_weight: Optional[float] = None,
    progress: bool = True,
) -> float:
    """AdamW with warm-up and cosine decay on random batches of `lines`; returns the last loss.
    With `answer_weight`, tokens after the last '=' weigh that much more (they are the skill)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + torch.cos(torch.tensor(3.14159 * min(s, steps) / steps)).item())
        ),
    )
    model.train()
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        chosen = [lines[rng.randrange(len(lines))] for _ in range(batch)]
        ids, mask = encode_lines(chosen)
        logits = model(ids[:, :-1]).logits
        target = ids[:, 1:]
        weight = mask[:, 1:].float()
        if answer_weight is not None:
            for i, line in enumerate(chosen):
                cut = line.rfind("=")
                if cut >= 0:
                    weight[i, cut:] *= answer_weight
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        loss = (loss * weight.reshape(-1)).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
    model.eval()
    return loss_value
