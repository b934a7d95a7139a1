"""A two-parameter item-response model of the fitness documents, to estimate a candidate's score
on a whole task from the documents it was scored on.

Each document d has a discrimination a_d > 0 and a difficulty b_d; a candidate c an ability
theta_c; P(c gets d right) = sigmoid(a_d * (theta_c - b_d)). The parameters are fit jointly by
penalised maximum likelihood (Gaussian priors keep them finite when few candidates are known)
on every 0/1 result the run holds, missing entries skipped. A candidate scored on a subset gets
the ability that explains its results there, and its estimated task score is the mean of what
it got right on the documents it saw and the predicted probabilities on the ones it did not:
documents that separate good candidates from bad count more than ones everybody gets right or
wrong. This is the estimator idea of tinyBenchmarks and MERGE³, kept small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIOR_THETA = 1.0  # sd of abilities
PRIOR_B = 2.0  # sd of difficulties
PRIOR_LOG_A = 0.5  # sd of log discriminations


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


@dataclass
class Items:
    """Fitted document parameters."""

    a: np.ndarray  # discriminations, (D,)
    b: np.ndarray  # difficulties, (D,)


def fit_items(results: np.ndarray, steps: int = 300, lr: float = 0.05) -> Items:
    """Fit (a, b) to a candidates x documents matrix of 0/1 results (NaN: not scored), by Adam
    on the penalised log-likelihood of all parameters at once."""
    x = np.asarray(results, dtype=float)
    seen = ~np.isnan(x)
    y = np.where(seen, x, 0.0)
    n_cand, n_docs = x.shape
    p_doc = (y.sum(0) + 0.5) / (seen.sum(0) + 1.0)
    params = {
        "theta": np.zeros(n_cand),
        "log_a": np.zeros(n_docs),
        "b": -np.log(p_doc / (1 - p_doc)),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    for step in range(1, steps + 1):
        a = np.exp(params["log_a"])
        diff = params["theta"][:, None] - params["b"][None, :]
        residual = np.where(seen, y - _sigmoid(a[None, :] * diff), 0.0)  # d loglik / d logit
        grads = {
            "theta": (residual * a[None, :]).sum(1) - params["theta"] / PRIOR_THETA**2,
            "b": -(residual * a[None, :]).sum(0) - params["b"] / PRIOR_B**2,
            "log_a": (residual * diff).sum(0) * a - params["log_a"] / PRIOR_LOG_A**2,
        }
        for key, grad in grads.items():  # ascent
            m, v = moments[key]
            m[:] = 0.9 * m + 0.1 * grad
            v[:] = 0.999 * v + 0.001 * grad**2
            m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)
            params[key] = params[key] + lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return Items(a=np.exp(params["log_a"]), b=params["b"])


def ability(results: np.ndarray, items: Items, iterations: int = 30) -> float:
    """The maximum a posteriori ability behind one candidate's results (NaN: not scored), by
    Newton's method (the log-posterior is concave in theta)."""
    x = np.asarray(results, dtype=float)
    seen = ~np.isnan(x)
    y, a, b = x[seen], items.a[seen], items.b[seen]
    theta = 0.0
    for _ in range(iterations):
        p = _sigmoid(a * (theta - b))
        grad = float((a * (y - p)).sum()) - theta / PRIOR_THETA**2
        hess = -float((a**2 * p * (1 - p)).sum()) - 1.0 / PRIOR_THETA**2
        step = grad / hess
        theta -= step
        if abs(step) < 1e-8:
            break
    return theta


def estimate_mean(results: np.ndarray, items: Items) -> float:
    """A candidate's estimated mean over all documents: its results where it was scored, the
    model's probabilities elsewhere."""
    x = np.asarray(results, dtype=float)
    seen = ~np.isnan(x)
    if seen.all():
        return float(x.mean())
    theta = ability(x, items)
    predicted = _sigmoid(items.a * (theta - items.b))
    return float(np.where(seen, x, predicted).mean())


def is_binary(results: np.ndarray) -> bool:
    """Whether every scored entry is 0 or 1 (the model applies to right/wrong results only)."""
    x = np.asarray(results, dtype=float)
    x = x[~np.isnan(x)]
    return bool(x.size) and bool(np.isin(x, (0.0, 1.0)).all())
