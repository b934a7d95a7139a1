"""Merges that weigh each parameter by what it does: Fisher merging and RegMean, from statistics
of each source on calibration data (merge/statistics.py computes and stores them), and
PCB-merging, which balances the task vectors against each other without data.

Fisher (Matena & Raffel, arXiv:2111.09832): theta = sum_i w_i (F_i + eps) theta_i /
sum_i w_i (F_i + eps), F_i the diagonal Fisher of model i (mean squared gradient of the
log-likelihood); eps is the smoothing that keeps unseen parameters an average.

RegMean (Jin et al., arXiv:2212.09849): for a linear layer y = x W^T, the W minimising
sum_i w_i ||X_i W^T - X_i W_i^T||^2 is W = (sum_i w_i W_i G_i)(sum_i w_i G_i)^-1 with
G_i = X_i^T X_i; the off-diagonal entries of each G_i are scaled by alpha (1: the exact
least-squares merge; 0: each input feature's column averaged by its energy in each model).
Tensors that are not linear-layer weights are averaged with the same weights.

PCB (Du et al., arXiv:2410.02396): with task vectors tau_i (clamped to their 1e-4 and 1 - 1e-4
quantiles of magnitude), intra-balancing exp(n * norm(|tau_i|)^2) and inter-balancing
tanh(tau_i * sum_j tau_j) multiply into a competition score; each model keeps the entries whose
score is in its top `pcb_ratio`, weighted by the min-max normalised score; the merged task vector
is the score-weighted mean, scaled by lambda. Applied tensor by tensor (the paper flattens the
whole model).
"""

from __future__ import annotations

from typing import Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import (
    MergeInputs,
    Method,
    Param,
    _finite,
    _fraction,
    _unit_interval,
    register,
)
from evomerge.merge.select import kth_smallest

CLAMP = 1e-4  # PCB's outlier quantile, at each end


def _weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out.div_(total if abs(total) >= 1e-12 else 1.0)


def _need(stats: Optional[list[Optional[torch.Tensor]]], method: str) -> list:
    if stats is None:
        raise EvomergeError(
            f"{method} needs statistics of its models on calibration data: give the recipe "
            "'statistics: FOLDER', or run `evomerge merge` with --calibration FILE"
        )
    return stats


def fisher(m: MergeInputs) -> torch.Tensor:
    weights = [p["weight"] for p in m.per_input]
    stats = _need(m.stats, "fisher")
    if any(f is None for f in stats):  # a tensor with no gradient (a buffer): the average
        return _weighted_average(m.others, weights)
    eps = m.shared["epsilon"]
    numerator = torch.zeros_like(m.others[0])
    denominator = torch.zeros_like(m.others[0])
    for x, f, w in zip(m.others, stats, weights):
        weight = f.add(eps).mul_(w)
        numerator.addcmul_(weight, x)
        denominator.add_(weight)
    return numerator.div_(denominator)


def regmean(m: MergeInputs) -> torch.Tensor:
    weights = [p["weight"] for p in m.per_input]
    grams = _need(m.stats, "regmean")
    if m.others[0].dim() != 2 or any(g is None for g in grams):
        return _weighted_average(m.others, weights)
    alpha = m.shared["alpha"]
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(m.others[0].shape[::-1], dtype=torch.float64, device=m.others[0].device)
    for x, gram, w in zip(m.others, grams, weights):
        g = gram.to(torch.float64)
        g = g * alpha + torch.diag(torch.diagonal(g)) * (1 - alpha)
        total.add_(g, alpha=w)
        rhs.add_(g @ x.to(torch.float64).T, alpha=w)  # G_i W_i^T
    return _solve_gram(total, rhs, alpha).T.to(torch.float32).contiguous()


def _solve_gram(total: torch.Tensor, rhs: torch.Tensor, alpha: float) -> torch.Tensor:
    """W^T from the merged Gram matrix. With alpha < 1 the matrix is positive definite unless an
    input is dead (a zero diagonal entry), and a Cholesky solve is about twice as fast as least
    squares; a singular matrix (a dead input, alpha 1 on fewer tokens than inputs) gets the
    least-squares minimum-norm solution, by SVD: LAPACK's default QR-based driver (gelsy)
    decides the rank of such a matrix differently from call to call in one process, so the
    same merge could come out with other weights."""
    if alpha < 1:
        factor, info = torch.linalg.cholesky_ex(total)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(total, rhs, driver="gelsd").solution


def _minmax(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    span = high - low
    return (x - low).div_(span if span > 0 else 1.0)


def pcb(m: MergeInputs) -> torch.Tensor:
    base = m.base
    if not m.others:
        return base.clone()
    n = len(m.others)
    taus = [x - base for x in m.others]
    total = torch.zeros_like(base)
    for tau in taus:
        total.add_(tau)
    count = base.numel()
    drop = min(count - 1, int(count * (1 - m.shared["pcb_ratio"])))  # entries below the top
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for tau in taus:
        magnitude = tau.abs().reshape(-1)
        low = kth_smallest(magnitude, int(count * CLAMP) + 1)
        high = kth_smallest(magnitude, max(1, int(count * (1 - CLAMP))))
        magnitude = magnitude.clamp(low, high).reshape(tau.shape)
        intra = _minmax(magnitude).pow_(2).mul_(n).exp_()
        score = intra.mul_(torch.tanh(tau * total))
        floor = kth_smallest(score.reshape(-1), drop + 1)  # clamped up to it: weight 0
        scale = _minmax(score.clamp_(min=floor))
        numerator.addcmul_(scale, torch.sign(tau).mul_(magnitude))
        denominator.add_(scale)
    merged = numerator.div_(denominator.clamp_(min=1e-12))
    return merged.mul_(m.shared["lambda"]).add_(base)


register(
    Method(
        "fisher",
        fisher,
        (
            Param("weight", float, "input", 1.0, _finite),
            Param("epsilon", float, "shared", 1e-6, lambda v: None if v > 0 else "must be > 0"),
        ),
        reference="arXiv:2111.09832",
        statistics="fisher",
    )
)
register(
    Method(
        "regmean",
        regmean,
        (
            Param("weight", float, "input", 1.0, _finite),
            Param("alpha", float, "shared", 0.9, _unit_interval),
        ),
        min_inputs=2,
        reference="arXiv:2212.09849",
        statistics="gram",
    )
)
register(
    Method(
        "pcb",
        pcb,
        (
            Param("pcb_ratio", float, "shared", 0.1, _fraction),
            Param("lambda", float, "shared", 1.0, _finite),
        ),
        base="required",
        reference="arXiv:2410.02396",
        task_vector=True,
    )
)
register(
    Method(
        "regmean_plus",
        regmean,  # the closed form, with Gram matrices of the merged model's activations
        (
            Param("weight", float, "input", 1.0, _finite),
            Param("alpha", float, "shared", 0.9, _unit_interval),
        ),
        min_inputs=2,
        reference="arXiv:2508.03121",
        statistics="activations",
        layerwise=True,
    )
)
