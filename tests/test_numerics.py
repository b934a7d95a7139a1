"""Real-size numerics: every method on tensors of 30M elements equals the same math done in
float64, decisions included (slerp's lerp fall-back, top-k thresholds, DARE/DELLA masks)."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import reduce
from evomerge.merge.methods import METHODS, MergeInputs, slerp_tensors
from evomerge.merge.rng import TensorRng

pytestmark = pytest.mark.slow

SHAPE = (6000, 5000)  # 30M elements: where fp32 accumulation drifts by 0.1%
# weights exact in binary: a sign election over sums that are exactly 0 must not hinge on the
# rounding of 0.6 * delta, which fp32 and float64 round differently
SETTINGS = {"weight": 0.75, "density": 0.5, "t": 0.3, "gamma": 0.01, "epsilon": 0.1}
ONE_INPUT = {"passthrough"}
BASE_AND_ONE = {"slerp", "nearswap", "arcee_fusion"}
PER_METHOD = {"nearswap": {"t": 0.002}}  # below most differences on the grid: a real blend
NO_BASE = {"linear", "nuslerp", "passthrough", "karcher"}


@pytest.fixture(scope="module")
def grid_tensors() -> list[torch.Tensor]:
    """A base and three fine-tunes whose differences are exact in fp32 (values on a 2^-18
    grid), so float32 and float64 runs see the same task vectors and any gap is the math's."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-512, 512, SHAPE, generator=g).float() * 2**-12
    return [base] + [
        base + torch.randint(-1024, 1024, SHAPE, generator=g).float() * 2**-18 for _ in range(3)
    ]


def inputs_for(name: str, tensors: list[torch.Tensor], dtype: torch.dtype) -> MergeInputs:
    method = METHODS[name]
    count = 1 if name in ONE_INPUT | BASE_AND_ONE else 2 if name == "nuslerp" else 3
    base = None if name in NO_BASE else tensors[0].to(dtype, copy=True)
    others = [t.to(dtype, copy=True) for t in tensors[1 : 1 + count]]  # methods overwrite them
    settings = {**SETTINGS, **PER_METHOD.get(name, {})}
    shared = {p.name: settings.get(p.name, p.default) for p in method.shared_params()}
    per_input = [
        {p.name: settings.get(p.name, p.default) for p in method.input_params()} for _ in others
    ]
    rng = TensorRng(7, "model.layers.0.mlp.up_proj.weight") if method.stochastic else None
    stats = None
    if method.statistics == "fisher":  # a Fisher on the same exact grid, one per input
        stats = [t.sub(tensors[0]).abs().to(dtype) * 2**10 for t in tensors[1 : 1 + count]]
    elif method.statistics:  # no Gram at this size (RegMean's closed form: test_data_aware)
        stats = [None] * count
    elif method.learned == "dam":  # a column vector per input, values exact in binary
        stats = [torch.full(SHAPE[-1:], 0.375 + k / 8, dtype=dtype) for k in range(count)]
    elif method.learned:  # one lambda per input
        stats = [torch.tensor(0.375 + k / 8, dtype=dtype) for k in range(count)]
    return MergeInputs(base, others, shared, per_input, rng, True, stats)


# TIES's sign election takes the sign of a sum of rescaled task vectors; where that sum nearly
# cancels, the sign follows the summands' last bits, in any precision. Those few entries may
# differ from the float64 run (measured: 1 of 30M for della); every other entry may not.
SIGN_ELECTION = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
FLIPS_PER_ELEMENT = 1e-6


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_equals_float64_math_at_30m_elements(grid_tensors, name):
    method = METHODS[name]
    got = method.fn(inputs_for(name, grid_tensors, torch.float32))
    want = method.fn(inputs_for(name, grid_tensors, torch.float64))
    assert got.dtype == torch.float32
    scale = max(float(t.abs().max()) for t in grid_tensors)
    off = (got.to(torch.float64) - want).abs() > 1e-6 * scale
    allowed = int(FLIPS_PER_ELEMENT * off.numel()) if name in SIGN_ELECTION else 0
    assert int(off.sum()) <= allowed, f"{name}: {int(off.sum())} entries off"


def test_slerp_decision_at_30m_elements():
    """Cosine 0.99925, just under slerp's 0.9995 lerp threshold, with a mean offset that makes
    fp32 norms drift: the float64-accumulated cosine must keep the spherical branch."""
    g = torch.Generator().manual_seed(1)
    v0 = torch.randn(28_000_000, generator=g) * 0.02 + 0.001
    ortho = torch.randn(28_000_000, generator=g) * 0.02
    ortho -= v0 * (reduce.dot(ortho, v0) / reduce.squares(v0))
    cos = 0.99925
    v1 = v0 + ortho * (math.tan(math.acos(cos)) * reduce.norm(v0) / reduce.norm(ortho))
    true_cos = reduce.dot(v0, v1) / (reduce.norm(v0) * reduce.norm(v1))
    assert abs(true_cos - cos) < 1e-6  # float64 says it is below the threshold
    got = slerp_tensors(0.5, v0, v1)
    want = slerp_tensors(0.5, v0.double(), v1.double())
    lerp = 0.5 * v0.double() + 0.5 * v1.double()
    scale = float(v1.abs().max())
    assert float((got.double() - want).abs().max()) <= 1e-6 * scale
    assert float((want - lerp).abs().max()) > 1e-5 * scale  # the branches do differ here


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5), (2, 3, 4), (3, 9000), (1 << 23,)])
def test_reductions_match_float64_and_chunking(shape, monkeypatch):
    """Two-level sums (blocks in fp32, block sums in float64) stay within 5e-7 of the float64
    sum, relative to the terms' magnitudes (fp32 rounding of the products and of blocks of
    4096), at any size and in any chunking: the error does not grow with the tensor."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(shape, generator=g) + 0.5
    b = torch.randn(shape, generator=g)
    a64, b64 = a.double(), b.double()

    def close(got, want, magnitude) -> bool:
        return bool(torch.all(torch.as_tensor(got - want).abs() <= 5e-7 * magnitude + 1e-12))

    for chunk in (reduce.CHUNK, 3):
        monkeypatch.setattr(reduce, "CHUNK", chunk)
        if len(shape) > 1:
            bound = (a64 * b64).abs().sum(-1)
            assert close(reduce.row_dots(a, b), (a64 * b64).sum(-1), bound)
            squares = a64.square().sum(-1)
            assert close(reduce.row_norms(a).square(), squares, squares)
        if shape[0] > 1 << 20 and chunk == 3:
            continue  # 3-element chunks of 8M: checked at full chunks
        assert close(reduce.dot(a, b), float((a64 * b64).sum()), float((a64 * b64).abs().sum()))
        l1 = float(a64.abs().sum())
        assert close(reduce.abs_total(a), l1, l1)
        assert close(reduce.squares(a), float(a64.square().sum()), float(a64.square().sum()))
