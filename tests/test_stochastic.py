"""DARE and DELLA: same seed -> bit-identical weights; different seed -> different; masks follow
the method's definition."""

import hashlib

import pytest
import torch

from evomerge.merge.engine import merge_to_disk
from evomerge.merge.methods import della_prune, random_prune
from evomerge.merge.rng import TensorRng
from evomerge.recipe import Recipe


def digest(folder) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        h.update(file.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_same_seed_same_bytes_other_seed_differs(llama, tmp_path, method):
    def recipe(seed: int) -> Recipe:
        return Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": str(llama["base"]),
                "seed": seed,
                "models": [
                    {"model": str(llama["ft0"]), "parameters": {"weight": 0.6, "density": 0.5}},
                    {
                        "model": str(llama["ft1"]),
                        "parameters": {"weight": 0.4, "density": [0.3, 0.7]},
                    },
                ],
            }
        )

    first = merge_to_disk(recipe(7), tmp_path / "a", progress=False, device="cpu")
    again = merge_to_disk(
        recipe(7), tmp_path / "b", progress=False, device="cpu", shard_bytes=50_000
    )
    other = merge_to_disk(recipe(8), tmp_path / "c", progress=False, device="cpu")
    from .helpers import load_folder

    a, b, c = load_folder(first), load_folder(again), load_folder(other)
    assert all(torch.equal(a[k], b[k]) for k in a), "same recipe, different weights"
    assert digest(first) != digest(other)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tensor_rng_depends_on_seed_and_name_only():
    a = TensorRng(3, "model.layers.0.mlp.up_proj.weight").uniform((1000,), torch.device("cpu"))
    b = TensorRng(3, "model.layers.0.mlp.up_proj.weight").uniform((1000,), torch.device("cpu"))
    c = TensorRng(3, "model.layers.1.mlp.up_proj.weight").uniform((1000,), torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_rate_and_rescale(density):
    delta = torch.randn(400, 500, generator=torch.Generator().manual_seed(0))
    pruned = random_prune(delta.clone(), density, rescale=True, rng=TensorRng(0, "w"))
    kept = pruned != 0
    rate = kept.float().mean().item()
    assert abs(rate - density) < 4 * (density * (1 - density) / delta.numel()) ** 0.5 + 1e-3
    # kept entries are scaled by one factor, ~1/density, that restores the L1 norm
    factor = pruned[kept] / delta[kept]
    assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-5)
    assert abs(factor[0].item() - 1 / density) < 0.03 / density
    assert torch.isclose(pruned.abs().sum(), delta.abs().sum(), rtol=1e-4)
    unscaled = random_prune(delta.clone(), density, rescale=False, rng=TensorRng(0, "w"))
    assert torch.equal(unscaled != 0, kept) and torch.equal(unscaled[kept], delta[kept])


def test_della_keep_probability_rises_with_magnitude_rank():
    density, epsilon = 0.5, 0.2
    delta = torch.randn(200, 1000, generator=torch.Generator().manual_seed(1))
    pruned = della_prune(delta.clone(), density, epsilon, rescale=False, rng=TensorRng(1, "w"))
    kept = (pruned != 0).float()
    ranks = delta.abs().argsort(1).argsort(1)
    low = kept[ranks < 100].mean().item()  # smallest 10% of each row
    high = kept[ranks >= 900].mean().item()  # largest 10% of each row
    assert abs(kept.mean().item() - density) < 0.01
    assert abs(low - (density - epsilon + 0.1 * epsilon)) < 0.02
    assert abs(high - (density + epsilon - 0.1 * epsilon)) < 0.02


def reference_draws(rng: TensorRng, start: int, count: int) -> list[int]:
    """The stream written out in plain Python from its definition: pair j hashes j under both
    keys (xor the key, then xor-shift-multiply rounds, mod 2^32); draw 2j is its low 16 bits,
    draw 2j + 1 its high 16 bits."""
    from evomerge.merge.rng import MULTIPLIERS

    def word(j: int) -> int:
        x = j % 2**32
        for key in rng.keys:
            x ^= key
            x ^= x >> 16
            x = (x * MULTIPLIERS[0]) % 2**32
            x ^= x >> 15
            x = (x * MULTIPLIERS[1]) % 2**32
            x ^= x >> 16
        return x

    return [(word(e // 2) >> (16 * (e % 2))) & 0xFFFF for e in range(start, start + count)]


@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy (CPU)", "torch (GPU path)"])
def test_stream_equals_its_reference_on_both_paths_in_any_chunking(use_numpy, monkeypatch):
    """The CPU path (numpy uint32) and the path every other device takes (torch int64, run
    here on the CPU) give the reference's integers, from any offset, in any chunk size: a mask
    made on a GPU worker equals the export's."""
    import evomerge.merge.rng as rng_module

    for chunk in (rng_module.CHUNK, 5):
        monkeypatch.setattr(rng_module, "CHUNK", chunk)
        rng = TensorRng(11, "model.layers.3.mlp.down_proj.weight", "input1")
        got = []
        for count in (1, 6, 33, 200):  # odd offsets: pairs split across calls
            chunks = list(rng._chunks(count, torch.device("cpu"), use_numpy=use_numpy))
            assert [(c.start, c.stop) for c, _ in chunks][0][0] == 0
            assert chunks[-1][0].stop == count and all(
                c.stop - c.start == len(v) for c, v in chunks
            )
            got += [int(v) for _, values in chunks for v in values]
        assert got == reference_draws(rng, 0, 240)


def test_masks_are_the_draws_under_a_threshold():
    shape = (37, 53)
    mask = TensorRng(5, "w").keep_mask(shape, 0.3, torch.device("cpu"))
    draws = TensorRng(5, "w").draws(37 * 53)
    assert torch.equal(mask, (draws < round(0.3 * 65536)).float().reshape(shape))
