"""Rank selection keeps exactly the elements a full sort would keep."""

import pytest
import torch

from evomerge.merge.select import (
    keep_largest_,
    kth_smallest,
    largest_mask,
    rank_window_mask,
    smallest_mask,
)


@pytest.mark.parametrize("n", [10, 1000, 300_000, 1_000_003])
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.97])
def test_largest_mask_equals_argsort(n, fraction):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    k = max(1, int(fraction * n))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(values, descending=True)[:k]] = True
    assert torch.equal(largest_mask(values, k), expected)


def test_ties_keep_exactly_k_earliest_first():
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    mask = largest_mask(values, 3)
    assert mask.tolist() == [False, True, True, True, False, False]
    assert int(smallest_mask(torch.zeros(500_000), 1234).sum()) == 1234


def test_kth_smallest_on_skewed_data_matches_kthvalue():
    values = torch.cat([torch.zeros(400_000), torch.rand(100_000) * 1e-3, torch.ones(10)])
    for k in (1, 399_999, 400_001, 499_000, 500_010):
        assert kth_smallest(values, k) == torch.kthvalue(values, k).values


def test_rank_window_is_the_middle_of_the_sort():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    order = torch.argsort(values)
    expected = torch.zeros(2000, dtype=torch.bool)
    expected[order[100:1500]] = True
    assert torch.equal(rank_window_mask(values, 100, 1500), expected)


@pytest.mark.parametrize("n", [7, 300_000, 1_000_003])
def test_keep_largest_in_place_matches_bool_mask(n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    values[: n // 3] = values[0]  # many ties at one value
    for k in (1, n // 4, n // 2, n - 1):
        expected = largest_mask(values, k).float()
        assert torch.equal(keep_largest_(values.clone(), k), expected)
