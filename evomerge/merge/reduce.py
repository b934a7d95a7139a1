"""Reductions over whole tensors (and over rows) that stay accurate at any size.

Merging leans on them: norms and dot products (slerp, nuslerp, model_stock's cosines), L1 sums
(DARE/DELLA/TIES rescaling), energies (SCE). Real tensors hold 10^7 to 10^9 elements, where fp32
accumulation drifts: torch's fp32 `vector_norm` over 28M elements is off by 0.17% on CPU, enough
to push slerp's cosine across its lerp fall-back threshold. Here every sum is two-level: blocks
of BLOCK elements are summed by torch in the tensor's dtype (a pairwise sum on a CPU, a tree on a
GPU: relative error about 1e-7 at this length), and the block sums are added in float64, so the
error does not grow with the tensor. Work goes chunk by chunk on the tensor's own device: the
temporaries stay at CHUNK elements and no float64 copy of a tensor is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

CHUNK = 1 << 22  # elements per temporary: 16 MiB in fp32
BLOCK = 1 << 12  # elements summed in the tensor's dtype before float64 takes over

Product = Callable[..., torch.Tensor]  # elementwise


def row_sums(product: Product, *tensors: torch.Tensor) -> torch.Tensor:
    """float64 sums over the last dimension of `product(*tensors)`: one per row (the leading
    dimensions' shape; a 0-d or 1-d input is one row)."""
    first = tensors[0]
    lead = first.shape[:-1] if first.dim() > 1 else ()
    width = first.shape[-1] if first.dim() > 0 else 1
    if first.numel() == 0:  # nothing to add: zero per row
        return torch.zeros(lead, dtype=torch.float64, device=first.device)
    rows = [t.reshape(-1, width) for t in tensors]
    count = rows[0].shape[0]
    out = torch.zeros(count, dtype=torch.float64, device=first.device)
    row_step = max(1, CHUNK // max(width, 1))
    col_step = max(1, min(width, CHUNK))
    for r in range(0, count, row_step):
        for c in range(0, width, col_step):
            values = product(*(t[r : r + row_step, c : c + col_step] for t in rows))
            out[r : r + row_step] += _block_sums(values)
    return out.reshape(lead)


def _block_sums(values: torch.Tensor) -> torch.Tensor:
    """Per row: sums of BLOCK-element blocks in the values' dtype, added in float64."""
    rows, width = values.shape
    whole = width // BLOCK * BLOCK
    sums = values[:, whole:].sum(-1).to(torch.float64)
    if whole:
        blocks = values[:, :whole].reshape(rows, -1, BLOCK).sum(-1)
        sums += blocks.to(torch.float64).sum(-1)
    return sums


def _whole(product: Product, *tensors: torch.Tensor) -> float:
    return float(row_sums(product, *(t.reshape(-1) for t in tensors)))


def total(x: torch.Tensor) -> float:
    return _whole(lambda a: a, x)


def abs_total(x: torch.Tensor) -> float:
    """The L1 norm."""
    return _whole(torch.abs, x)


def squares(x: torch.Tensor) -> float:
    return _whole(torch.square, x)


def norm(x: torch.Tensor) -> float:
    return math.sqrt(squares(x))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return _whole(torch.mul, a, b)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """float64 L2 norms over the last dimension."""
    return row_sums(torch.square, x).sqrt_()


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 dot products over the last dimension."""
    return row_sums(torch.mul, a, b)


def row_kl(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """float64 KL(softmax(x) + eps || softmax(y) + eps) over the last dimension, one per row.
    Near-uniform rows (small weights) make it a sum of cancelling terms, so the softmaxes too
    are taken in float64, a block of whole rows at a time."""
    width = x.shape[-1] if x.dim() > 0 else 1
    rows_x, rows_y = x.reshape(-1, width), y.reshape(-1, width)
    out = torch.empty(rows_x.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, CHUNK // max(width, 1))
    for r in range(0, rows_x.shape[0], step):
        p = torch.softmax(rows_x[r : r + step].to(torch.float64), dim=-1).add_(eps)
        q = torch.softmax(rows_y[r : r + step].to(torch.float64), dim=-1).add_(eps)
        out[r : r + step] = (p * torch.log(p / q)).sum(-1)
    return out.reshape(x.shape[:-1] if x.dim() > 1 else ())
