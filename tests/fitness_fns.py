"""Cheap python-callable fitness functions for run tests (imported by the run's worker)."""

from __future__ import annotations

import time

import torch

IDS = torch.arange(0, 64).reshape(2, 32) % 250


def score(model, tokenizer, sleep: float = 0.0):
    """Next-token NLL on a fixed byte sequence, plus the logit scale; per-example = per-row
    token accuracy."""
    if sleep:
        time.sleep(sleep)
    logits = model(IDS).logits.float()
    logp = torch.log_softmax(logits, -1)[:, :-1]
    target = IDS[:, 1:]
    nll = -logp.gather(-1, target[..., None]).mean()
    hits = (logp.argmax(-1) == target).float()
    return {
        "nll": float(nll),
        "logit_std": float(logits.std()),
        "per_example": hits.flatten().tolist(),
    }


def explode(model, tokenizer):
    raise RuntimeError("this fitness always fails")


def chaos_once(model, tokenizer, folder: str, hang: float = 60.0):
    """First call anywhere: the worker process dies. Second: it hangs. Then: it scores."""
    import os
    import signal
    from pathlib import Path

    died, hung = Path(folder) / "died", Path(folder) / "hung"
    if not died.exists():
        died.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if not hung.exists():
        hung.touch()
        time.sleep(hang)
    return score(model, tokenizer)


def sleepy(model, tokenizer, seconds: float = 0.5):
    """A fixed-cost fitness, for dispatcher benchmarks: the score is the logit scale."""
    time.sleep(seconds)
    return {"nll": float(len(list(model.parameters()))), "logit_std": seconds}


def logged(model, tokenizer, log: str, sleep: float = 0.0):
    """`score`, appending one line per call to `log` (to count work repeated after kills)."""
    with open(log, "a") as f:
        f.write("call\n")
    return score(model, tokenizer, sleep=sleep)


def counted(model, tokenizer, folder: str):
    """`score`, leaving one line in folder/calls per call: how often a run really scored."""
    from pathlib import Path

    with open(Path(folder) / "calls", "a") as f:
        f.write("1\n")
    return score(model, tokenizer)


def fails_while(model, tokenizer, flag: str):
    """Raises while the file `flag` exists (a broken fitness the user then fixes); scores after."""
    from pathlib import Path

    if Path(flag).exists():
        raise RuntimeError("the task file is missing")
    return score(model, tokenizer)


def out_of_memory(model, tokenizer):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
