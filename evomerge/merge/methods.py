"""Merge methods: pure tensor math and the registry that names them.

A method takes the base tensor (or None), the other inputs in recipe order, the resolved
parameters and, for stochastic methods, a TensorRng; it returns the merged tensor in float32.
It knows nothing of files, devices or models. When `scratch` is true the inputs are private
float32 copies that the method may overwrite, which keeps peak memory near N+2 tensors.
Defaults and semantics follow mergekit 0.1.5 so that existing configs give the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import reduce
from evomerge.merge.rng import TensorRng
from evomerge.merge.select import keep_largest_, largest_mask, rank_window_mask

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]
_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One method parameter: its type, default and whether it is per input or shared."""

    name: str
    kind: type
    scope: Scope
    default: Any = _MISSING
    check: Optional[Callable[[Any], Optional[str]]] = None

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass
class MergeInputs:
    """Everything a method sees for one output tensor."""

    base: Optional[torch.Tensor]
    others: list[torch.Tensor]
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    rng: Optional[TensorRng] = None
    scratch: bool = False
    # per non-base input, the statistic a data-aware method reads for this tensor, or the
    # coefficients a learned merge reads (None where the source has none for it); None when
    # the method reads none
    stats: Optional[list[Optional[torch.Tensor]]] = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    params: tuple[Param, ...]
    base: BasePolicy = "ignored"
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: int = 0
    max_non_base: Optional[int] = None
    stochastic: bool = False
    reference: str = ""
    # true when, with these shared parameters, each output entry depends on the same entry of
    # the inputs alone: such a tensor may be merged in row chunks with a bit-equal result
    entrywise: Callable[[dict[str, Any]], bool] = lambda shared: False
    statistics: Optional[str] = None  # "fisher" or "gram": what it reads from calibration data
    task_vector: bool = False  # merges base + f(task vectors): a LiNeS schedule can scale them
    layerwise: bool = False  # merged layer after layer in a live model (RegMean++)
    learned: Optional[str] = None  # "dam" or "adamerging": reads a trained coefficient file
    param_index: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})

    def shared_params(self) -> list[Param]:
        return [p for p in self.params if p.scope == "shared"]

    def input_params(self) -> list[Param]:
        return [p for p in self.params if p.scope != "shared"]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise EvomergeError(
            f"field 'merge_method': unknown method {name!r}; known: {known}"
        ) from None


# ----- parameter checks ---
def _unit_interval(value: float) -> Optional[str]:
    if not (0.0 < value <= 1.0) or math.isnan(value):
        return f"must be in (0, 1], got {value}"
    return None


def _finite(value: float) -> Optional[str]:
    return None if math.isfinite(value) else f"must be finite, got {value}"


def _fraction(value: float) -> Optional[str]:
    return None if 0.0 <= value <= 1.0 else f"must be in [0, 1], got {value}"


# ----- sparsification ---
def _rescale_l1(original_l1: float, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the kept entries so the L1 norm is preserved (mergekit's `rescale`)."""
    after = reduce.abs_total(masked)
    if original_l1 >= eps and after >= eps:
        masked.mul_(original_l1 / after)
    return masked


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the max(1, int(density*n)) largest-magnitude entries (TIES)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = flat.abs()
    l1 = reduce.total(keep) if rescale else None
    delta.mul_(keep_largest_(keep, k).reshape(delta.shape))
    del keep
    return _rescale_l1(l1, delta) if rescale else delta


def breadcrumbs_prune(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Drop the gamma largest-magnitude outliers and the smallest entries, keep density*n."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    keep_n = int(density * n)
    top_n = int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    magnitudes = flat.abs()
    l1 = reduce.total(magnitudes) if rescale else None
    keep = rank_window_mask(magnitudes, bottom_n, bottom_n + keep_n).reshape(delta.shape)
    del magnitudes
    delta = delta.masked_fill_(~keep, 0.0)
    return _rescale_l1(l1, delta) if rescale else delta


def random_prune(
    delta: torch.Tensor, density: float, rescale: bool, rng: TensorRng
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    l1 = reduce.abs_total(delta) if rescale else None
    delta.mul_(rng.keep_mask(delta.shape, density, delta.device))
    return _rescale_l1(l1, delta) if rescale else delta


def della_prune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, rng: TensorRng
) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with magnitude rank within each row,
    from density-epsilon (smallest) to density+epsilon (largest)."""
    if density >= 1:
        return delta
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise EvomergeError(
            f"parameter 'epsilon': density +/- epsilon must lie in (0, 1); got density={density},"
            f" epsilon={epsilon}"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    # tied magnitudes rank by position (a stable sort), as TIES gives ties to the earlier entry
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width, device=rows.device).expand_as(order))
    del order
    # keep probability per rank, in float64; the draw against it is an integer comparison, so
    # the kept entries are the same on every device and in every dtype
    probability = torch.arange(width, dtype=torch.float64) * (2 * epsilon / max(width - 1, 1))
    probability += density - epsilon
    l1 = reduce.abs_total(delta) if rescale else None
    keep = rng.keep_where(probability, ranks, rows.device)
    del ranks
    delta = delta.masked_fill_(~keep.reshape(delta.shape), 0.0)
    return _rescale_l1(l1, delta) if rescale else delta


# ----- task-arithmetic family ---
Sparsifier = Optional[Literal["magnitude", "random", "breadcrumbs", "della"]]


def _delta(x: torch.Tensor, base: torch.Tensor, scratch: bool) -> torch.Tensor:
    return x.sub_(base) if scratch else x - base


def _sparsify(
    kind: Sparsifier,
    delta: torch.Tensor,
    p: dict[str, Any],
    rescale: bool,
    rng: Optional[TensorRng],
) -> torch.Tensor:
    density = p["density"]
    if kind == "magnitude":
        return magnitude_prune(delta, density, rescale)
    if kind == "breadcrumbs":
        return breadcrumbs_prune(delta, density, p["gamma"], rescale)
    if kind == "random":
        return random_prune(delta, density, rescale, rng)
    if kind == "della":
        return della_prune(delta, density, p["epsilon"], rescale, rng)
    return delta


def task_arithmetic_family(
    sparsify: Sparsifier, consensus: bool
) -> Callable[[MergeInputs], torch.Tensor]:
    """base + lambda * combine_i(w_i * sparsify(x_i - base)), combine = sum or sign-consensus."""

    def merge(m: MergeInputs) -> torch.Tensor:
        base = m.base
        if not m.others:
            return base.clone()
        rescale = m.shared["rescale"]
        weights = [p["weight"] for p in m.per_input]
        deltas = []
        for i, (x, p) in enumerate(zip(m.others, m.per_input)):
            rng = m.rng.fork(f"input{i}") if m.rng is not None else None
            delta = _sparsify(sparsify, _delta(x, base, m.scratch), p, rescale, rng)
            deltas.append(delta.mul_(p["weight"]))
        if consensus:
            mixed, divisor = _sign_consensus(deltas, weights, m.shared["normalize"])
        else:
            mixed = _sum(deltas)
            total = sum(weights)
            divisor = total if abs(total) >= 1e-8 else 1.0
        del deltas
        if m.shared["normalize"]:
            mixed.div_(divisor)
        if m.shared["lambda"] != 1:
            mixed.mul_(m.shared["lambda"])
        return mixed.add_(base)

    return merge


def _sign_consensus(
    deltas: list[torch.Tensor], weights: list[float], need_divisor: bool
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """TIES sign election: per entry, the sign of the summed deltas wins (ties go to +); sum the
    deltas that agree with it, and (for normalising) the weights of those that do.

    Written with float kernels only (the deltas are overwritten): each agreeing delta is
    multiplied by the elected sign so that agreement is simply "> 0".
    """
    sign = _sum(deltas).ge_(0).mul_(2).sub_(1)
    divisor = torch.zeros_like(sign) if need_divisor else 1.0
    agrees = torch.empty_like(sign) if need_divisor else None
    for delta, w in zip(deltas, weights):
        delta.mul_(sign)
        if need_divisor:
            divisor.add_(torch.gt(delta, 0, out=agrees), alpha=w)
        delta.clamp_(min=0)
    mixed = deltas[0]
    for delta in deltas[1:]:
        mixed.add_(delta)
    mixed.mul_(sign)
    if need_divisor:
        divisor.masked_fill_(divisor == 0, 1.0)
    return mixed, divisor


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total


# ----- other methods ---
def linear(m: MergeInputs) -> torch.Tensor:
    weights = [p["weight"] for p in m.per_input]
    result = torch.zeros_like(m.others[0])
    for x, w in zip(m.others, weights):
        result.add_(x, alpha=w)
    if m.shared["normalize"]:
        result.div_(sum(weights))
    return result


def slerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two whole tensors; linear when they are nearly collinear (the
    cosine is accumulated in float64: the fall-back decision must not depend on fp32 drift)."""
    norm0, norm1 = reduce.norm(v0), reduce.norm(v1)
    norm0 = norm0 if norm0 > eps else 1.0
    norm1 = norm1 if norm1 > eps else 1.0
    dot = min(1.0, max(-1.0, reduce.dot(v0, v1) / (norm0 * norm1)))
    if abs(dot) > dot_threshold:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        c0 = math.sin((1 - t) * theta) / sin_theta
        c1 = math.sin(t * theta) / sin_theta
    return torch.add(v0 * c0, v1, alpha=c1)


def slerp(m: MergeInputs) -> torch.Tensor:
    return slerp_tensors(m.shared["t"], m.base, m.others[0])


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    norms = reduce.row_norms(a).clamp_(min=1e-7) * reduce.row_norms(b).clamp_(min=1e-7)
    cos = (reduce.row_dots(a, b) / norms).clamp_(-1, 1).unsqueeze(-1)  # float64, one per row
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    sin_theta = torch.sin(theta)
    c0 = (torch.sin((1 - t) * theta) / sin_theta).to(a.dtype)
    c1 = (torch.sin(t * theta) / sin_theta).to(a.dtype)
    result = torch.where(collinear.to(a.device), (1 - t) * a + t * b, c0 * a + c1 * b)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(m: MergeInputs) -> torch.Tensor:
    w0, w1 = (p["weight"] for p in m.per_input)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise, flatten = m.shared["nuslerp_row_wise"], m.shared["nuslerp_flatten"]
    a, b = m.others
    if m.base is None:
        return nuslerp_tensors(t, a, b, row_wise, flatten)
    delta = nuslerp_tensors(
        t, _delta(a, m.base, m.scratch), _delta(b, m.base, m.scratch), row_wise, flatten
    )
    return delta.add_(m.base)


def model_stock(m: MergeInputs) -> torch.Tensor:
    """Interpolate between the base and the fine-tunes' average by their mean pairwise angle."""
    shape = m.base.shape
    filter_wise = m.shared["filter_wise"]
    if filter_wise:
        w0 = m.base.unsqueeze(0) if m.base.dim() == 1 else m.base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in m.others]
    else:
        w0 = m.base.reshape(-1)
        ws = [x.reshape(-1) for x in m.others]
    average = _sum(ws).div_(len(ws))
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = reduce.row_norms(a) * reduce.row_norms(b)
            cosines.append((reduce.row_dots(a, b) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular,
        torch.zeros_like(cos),
        count * cos / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    t = t.to(w0.dtype)
    return (t * average + (1 - t) * w0).reshape(shape)


def sce(m: MergeInputs) -> torch.Tensor:
    """Select (top-variance entries), Calculate (energy weights), Erase (minority signs)."""
    base = m.base
    if not m.others:
        return base.clone()
    deltas = [_delta(x, base, m.scratch) for x in m.others]
    select_topk = m.shared["select_topk"]
    if select_topk < 1:
        stacked = torch.stack(deltas)
        variance = stacked.var(0, unbiased=False).reshape(-1)
        del stacked
        k = int(int(torch.count_nonzero(variance)) * select_topk)
        keep = largest_mask(variance.abs_(), k).reshape(base.shape)
        for delta in deltas:
            delta.masked_fill_(~keep, 0.0)
    energies = [reduce.squares(d) / max(d.numel(), 1) for d in deltas]
    total = sum(energies)
    weights = (
        [1.0 / len(deltas)] * len(deltas) if abs(total) < 1e-6 else [e / total for e in energies]
    )
    positive = _sum(deltas) >= 0
    mixed = torch.zeros_like(base)
    weight_sum = torch.zeros_like(base)
    for delta, w in zip(deltas, weights):
        agrees = torch.where(positive, delta > 0, delta < 0)
        mixed.add_(delta.masked_fill_(~agrees, 0.0), alpha=w)
        weight_sum.add_(agrees, alpha=w)
    return mixed.div_(weight_sum.clamp_(min=1e-6)).add_(base)


def nearswap(m: MergeInputs) -> torch.Tensor:
    """Take the other model's value where it lies within `t` of the base's, and move toward it
    in proportion t / |difference| elsewhere."""
    base, other = m.base, m.others[0]
    gap = other - base
    weight = torch.abs(gap).clamp_(min=1e-6).reciprocal_().mul_(m.shared["t"]).clamp_(0, 1)
    return gap.mul_(weight).add_(base)


def arcee_fusion(m: MergeInputs) -> torch.Tensor:
    """Keep the other model's change only where its importance (|change| times the row's KL
    divergence of softmaxed weights) is an outlier: above median + 1.5 IQR. Quantiles are exact
    order statistics (mergekit samples a random million entries above that size)."""
    base, other = m.base, m.others[0]
    kl = reduce.row_kl(other, base).to(base.dtype)
    gap = other - base
    importance = gap.abs().mul_(kl.unsqueeze(-1) if base.dim() > 1 else kl)
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (
        float(flat.kthvalue(int(fraction * last) + 1).values) for fraction in (0.25, 0.5, 0.75)
    )
    keep = importance >= median + 1.5 * (q3 - q1)
    return gap.mul_(keep).add_(base)


def multislerp(m: MergeInputs) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: the inputs (task vectors, with a base) are
    projected to the unit sphere, averaged in the tangent space at their weighted mean, mapped
    back and rescaled to their weighted mean norm."""
    if len(m.others) == 1:
        return m.others[0].clone()
    eps = m.shared["eps"]
    weights = [p["weight"] for p in m.per_input]
    if m.shared["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    vectors = [x if m.base is None else _delta(x, m.base, m.scratch) for x in m.others]
    norms = [reduce.norm(v) for v in vectors]
    units = [v / (n + eps) for v, n in zip(vectors, norms)]
    mean = _sum([u * w for u, w in zip(units, weights)])
    mean_norm = reduce.norm(mean)
    if mean_norm < eps:
        if len(vectors) != 2:
            raise EvomergeError(
                "multislerp: the weighted inputs cancel out (antipodal task vectors with "
                "balancing weights); change the weights"
            )
        result = vectors[0] * weights[0] + vectors[1] * weights[1]
        return result if m.base is None else result.add_(m.base)
    mean.div_(mean_norm)
    tangent = torch.zeros_like(mean)
    for u, w in zip(units, weights):
        tangent.add_(u.sub_(mean * reduce.dot(u, mean)), alpha=w)
    length = reduce.norm(tangent) + eps
    result = mean.mul_(math.cos(length)).add_(tangent, alpha=math.sin(length) / length)
    result.mul_(sum(n * w for n, w in zip(norms, weights)))
    return result if m.base is None else result.add_(m.base)


def karcher(m: MergeInputs) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the inputs' directions on the unit sphere, by
    fixed-point iteration from their normalised average, scaled to their mean norm. The norms
    and dot products that decide each step are float64 sums."""
    xs = m.others
    if len(xs) == 1:
        return xs[0].clone()
    tol, alphas = m.shared["tol"], [1.0 / len(xs)] * len(xs)
    norms = [reduce.norm(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = _sum([u * w for u, w in zip(units, weights)])
    length = reduce.norm(mean)
    mean = units[0].clone() if length < tol else mean.div_(length)
    for _ in range(m.shared["max_iter"]):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            dot = min(1.0, max(-1.0, reduce.dot(mean, u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent.add_(u - mean * dot, alpha=w * theta / math.sin(theta))
        step = reduce.norm(tangent)
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        length = reduce.norm(mean)
        if length > tol:
            mean.div_(length)
    return mean.mul_(sum(a * n for a, n in zip(alphas, norms)))


def ram_family(plus: bool) -> Callable[[MergeInputs], torch.Tensor]:
    """RAM: entries that one task vector alone changes (|delta| > epsilon) are kept whole,
    entries several change are averaged over those that do. RAM+ (tensor-local) scales each
    model's unique entries by 1 + r * clamp(shared / unique count, 0, alpha)."""

    def merge(m: MergeInputs) -> torch.Tensor:
        base = m.base
        if not m.others:
            return base.clone()
        eps = m.shared["epsilon"]
        deltas = [_delta(x, base, m.scratch) for x in m.others]
        present = [d.abs() > eps for d in deltas]
        counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
        for keep in present:
            counts.add_(keep)
        unique, overlap = counts == 1, counts > 1
        share = overlap / counts.clamp(min=1)
        merged = torch.zeros_like(base)
        for delta, keep in zip(deltas, present):
            delta.mul_(keep)
            scale = 1.0
            if plus:
                rho = int((keep & overlap).sum()) / max(int((keep & unique).sum()), eps)
                scale = 1 + m.shared["r"] * min(max(rho, 0.0), m.shared["alpha"])
            merged.add_(delta * unique * scale + delta * share)
        return merged.add_(base)

    return merge


def passthrough(m: MergeInputs) -> torch.Tensor:
    scale = m.per_input[0].get("scale")
    x = m.others[0]
    return x if scale is None else x * scale


# ----- the registry ---
def _gta_params(normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    return (
        # mergekit stores sign masks as int8 with it to save memory; results are the same, so it
        # is accepted and has nothing to change here (tests/test_parity_mergekit.py proves it)
        Param("int8_mask", bool, "shared", False),
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0, _finite),
        Param("weight", float, "non_base", check=_finite),
        Param("density", float, "non_base", 1.0, _unit_interval),
        *extra,
    )


_GAMMA = Param("gamma", float, "non_base", 0.01, _fraction)
_EPSILON = Param("epsilon", float, "non_base", 0.15, _fraction)

for _name, _sparse, _consensus, _norm, _rescale, _extra, _ref in (
    ("task_arithmetic", None, False, False, False, (), "arXiv:2212.04089"),
    ("ties", "magnitude", True, True, False, (), "arXiv:2306.01708"),
    ("dare_ties", "random", True, False, True, (), "arXiv:2311.03099"),
    ("dare_linear", "random", False, False, True, (), "arXiv:2311.03099"),
    ("breadcrumbs", "breadcrumbs", False, False, False, (_GAMMA,), "arXiv:2312.06795"),
    ("breadcrumbs_ties", "breadcrumbs", True, False, False, (_GAMMA,), "arXiv:2312.06795"),
    ("della", "della", True, True, True, (_EPSILON,), "arXiv:2406.11617"),
    ("della_linear", "della", False, False, True, (_EPSILON,), "arXiv:2406.11617"),
):
    register(
        Method(
            name=_name,
            fn=task_arithmetic_family(_sparse, _consensus),
            params=_gta_params(_norm, _rescale, _extra),
            base="required",
            stochastic=_sparse in ("random", "della"),
            reference=_ref,
            task_vector=True,
            # magnitude and rank pruning look at the whole tensor, and so does L1 rescaling
            entrywise=(lambda shared: True)
            if _sparse is None
            else (lambda shared: not shared.get("rescale", False))
            if _sparse == "random"
            else (lambda shared: False),
        )
    )

register(
    Method(
        "linear",
        linear,
        (
            Param("weight", float, "input", check=_finite),
            Param("normalize", bool, "shared", True),
        ),
        reference="arXiv:2203.05482",
        entrywise=lambda shared: True,
    )
)
register(
    Method(
        "slerp",
        slerp,
        (Param("t", float, "shared", check=_finite),),
        base="required",
        min_inputs=2,
        max_inputs=2,
    )
)
register(
    Method(
        "nuslerp",
        nuslerp,
        (
            Param("weight", float, "non_base", check=_finite),
            Param("nuslerp_row_wise", bool, "shared", False),
            Param("nuslerp_flatten", bool, "shared", True),
        ),
        base="optional",
        min_non_base=2,
        max_non_base=2,
    )
)
register(
    Method(
        "model_stock",
        model_stock,
        (Param("filter_wise", bool, "shared", False),),
        base="required",
        min_inputs=3,
        reference="arXiv:2403.19522",
    )
)
register(
    Method(
        "sce",
        sce,
        (
            Param("int8_mask", bool, "shared", False),
            Param("select_topk", float, "shared", 1.0, _fraction),
        ),
        base="required",
        reference="arXiv:2408.07990",
    )
)
register(
    Method(
        "passthrough",
        passthrough,
        (Param("scale", float, "input", None),),
        max_inputs=1,
        entrywise=lambda shared: True,
    )
)
register(
    Method(
        "nearswap",
        nearswap,
        (Param("t", float, "shared", check=_finite),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        reference="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        entrywise=lambda shared: True,
    )
)
register(Method("arcee_fusion", arcee_fusion, (), base="required", min_inputs=2, max_inputs=2))
register(
    Method(
        "multislerp",
        multislerp,
        (
            Param("weight", float, "non_base", check=_finite),
            Param("normalize_weights", bool, "shared", True),
            Param("eps", float, "shared", 1e-8, _finite),
        ),
        base="optional",
        min_non_base=1,
        reference="goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
register(
    Method(
        "karcher",
        karcher,
        (
            Param("max_iter", int, "shared", 10, lambda v: None if v >= 1 else "must be >= 1"),
            Param("tol", float, "shared", 1e-5, _finite),
        ),
        reference="arXiv:2603.04972",
    )
)
_RAM_EPSILON = Param("epsilon", float, "shared", 1e-5, _finite)
register(
    Method("ram", ram_family(False), (_RAM_EPSILON,), base="required", reference="arXiv:2601.13572")
)
register(
    Method(
        "ramplus_tl",
        ram_family(True),
        (
            Param("r", float, "shared", 0.1, _finite),
            Param("alpha", float, "shared", 0.2, _finite),
            _RAM_EPSILON,
        ),
        base="required",
        reference="arXiv:2601.13572",
    )
)
