"""Exact rank selection without sorting whole tensors.

TIES and breadcrumbs keep the k largest (or a rank window of) |delta|. A full argsort is
O(n log n) and dominates merge time; here a strided sample brackets the k-th value, one pass
counts what lies above the bracket, and only the few elements inside it are ranked exactly.
Ties at the threshold are broken by position, so exactly k elements are kept on any device.
"""

from __future__ import annotations

import math

import torch

_SAMPLE = 65536


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest element (1-based) of a flat tensor, exactly."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(values, k).values
    sample = torch.sort(values[:: n // _SAMPLE]).values
    m = sample.numel()
    q = (k - 0.5) / n
    margin = 4.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    lo = sample[max(0, int((q - margin) * (m - 1)))]
    hi = sample[min(m - 1, math.ceil((q + margin) * (m - 1)))]
    below = int(torch.count_nonzero(values < lo))
    band = values[(values >= lo) & (values <= hi)]
    rank = k - below
    if 1 <= rank <= band.numel():
        return torch.kthvalue(band, rank).values
    return torch.kthvalue(values, k).values  # the sample was unrepresentative: exact fallback


def smallest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k smallest elements of a flat tensor (ties: earlier position first)."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = kth_smallest(values, k)
    mask = values < threshold
    need = k - int(torch.count_nonzero(mask))
    at_threshold = values == threshold
    if int(torch.count_nonzero(at_threshold)) > need:
        mask[at_threshold.nonzero().squeeze(1)[:need]] = True
    else:
        mask |= at_threshold
    return mask


def largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest elements of a flat tensor (ties: earlier position first)."""
    return smallest_mask(values.neg(), k)


def keep_largest_(values: torch.Tensor, k: int) -> torch.Tensor:
    """Overwrite a flat float tensor with a 0/1 mask of its k largest elements and return it.

    Same selection as `largest_mask`, in float and in place: float-only kernels are several
    times faster than boolean ones on CPU, and no new buffer is touched.
    """
    n = values.numel()
    if k >= n:
        return values.fill_(1.0)
    if k <= 0:
        return values.zero_()
    threshold = kth_smallest(values, n - k + 1)
    above = int(torch.count_nonzero(values > threshold))
    tied = values == threshold
    surplus = above + int(torch.count_nonzero(tied)) - k
    dropped = tied.nonzero().squeeze(1)[k - above :] if surplus > 0 else None
    torch.ge(values, threshold, out=values)
    if dropped is not None:
        values[dropped] = 0.0
    return values


def rank_window_mask(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the elements whose ascending rank lies in [start, stop)."""
    return smallest_mask(values, stop) & ~smallest_mask(values, start)
