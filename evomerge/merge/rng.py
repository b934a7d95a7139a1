"""Random state for stochastic merge methods, derived from (recipe seed, tensor name).

Never a global RNG: each tensor gets its own stream, so the weights of one tensor do not depend
on which other tensors were merged before it, on thread order, on chunking or on the device.

The stream is counter-based: draw e of a tensor is a keyed hash of (key, e) (two rounds of a
32-bit integer hash, each 32-bit output giving the 16-bit draws of elements 2j and 2j+1), so any
range of it can be made anywhere, in any order. On a CPU it is computed with numpy's uint32
arithmetic; on any other device with torch int64 operations, with every product kept below 2^63
so that nothing overflows. Both compute the same integers, so a mask made on a GPU worker equals
the one an export makes on a CPU, bit for bit (tests/test_stochastic.py checks both against a
pure-Python reference).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # a well-mixing 32-bit hash's (xor-shift-multiply)
SHIFTS = (16, 15, 16)
CHUNK = 1 << 20  # hash outputs per step: temporaries stay small (and in cache on a CPU)


def tensor_seed(recipe_seed: int, tensor_name: str, stream: str = "") -> int:
    """A 63-bit seed that depends only on the recipe seed, the tensor name and a stream label."""
    key = f"{int(recipe_seed)}\x00{tensor_name}\x00{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def hash_pairs_numpy(first: int, count: int, keys: tuple[int, int]) -> np.ndarray:
    """uint32 hash outputs for pair counters first .. first + count - 1 (CPU)."""
    if first + count <= 1 << 32:
        x = np.arange(first, first + count, dtype=np.uint32)
    else:  # tensors past 8.6G elements: the counter wraps at 2^32
        x = np.arange(first, first + count, dtype=np.uint64).astype(np.uint32)
    t = np.empty_like(x)
    for key in keys:
        x ^= np.uint32(key)
        for shift, multiplier in zip(SHIFTS, (*MULTIPLIERS, None)):
            np.right_shift(x, shift, out=t)
            x ^= t
            if multiplier is not None:
                x *= np.uint32(multiplier)
    return x


def _mul32(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """(x * multiplier) mod 2^32 for 0 <= x < 2^32 in int64, with no product past 2^48."""
    low = x * (multiplier & 0xFFFF)
    high = torch.bitwise_and(x * (multiplier >> 16), 0xFFFF).bitwise_left_shift_(16)
    return low.add_(high).bitwise_and_(MASK32)


def hash_pairs_torch(
    first: int, count: int, keys: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The same hash outputs as int64 values in [0, 2^32), computed on `device`."""
    x = torch.arange(first, first + count, dtype=torch.int64, device=device)
    for key in keys:
        x.bitwise_xor_(key)
        for shift, multiplier in zip(SHIFTS, (*MULTIPLIERS, None)):
            x.bitwise_xor_(x >> shift)
            if multiplier is not None:
                x = _mul32(x, multiplier)
    return x


def _halves(x: np.ndarray) -> np.ndarray:
    """Each uint32's low 16 bits, then its high 16 bits: on a little-endian machine that is
    exactly how the words lie in memory, so no work is done."""
    if sys.byteorder == "little":
        return x.view(np.uint16)
    return np.stack([x & 0xFFFF, x >> 16], axis=1).reshape(-1).astype(np.uint16)


class TensorRng:
    """16-bit draws for one tensor; each call continues the same stream where the last ended."""

    def __init__(
        self, recipe_seed: int, tensor_name: str, stream: str = "", start: int = 0
    ) -> None:
        self.seed = tensor_seed(recipe_seed, tensor_name, stream)
        self.keys = (self.seed & MASK32, (self.seed >> 32) & MASK32)
        # draws consumed so far; a row chunk of a tensor starts at its first element's draw
        self.start = self.position = start

    def _chunks(
        self, count: int, device: torch.device, use_numpy: Optional[bool] = None
    ) -> Iterator[tuple[slice, Any]]:
        """The next `count` draws, chunk by chunk: (where in the count they go, the draws as a
        numpy uint16 array on a CPU, else as an int64 tensor on `device`). `use_numpy=False`
        takes the torch path on a CPU too (the tests compare the two)."""
        if use_numpy is None:
            use_numpy = device.type == "cpu"
        start, self.position = self.position, self.position + count
        for lo in range(start, start + count, 2 * CHUNK):
            hi = min(lo + 2 * CHUNK, start + count)
            first, last = lo // 2, (hi - 1) // 2  # the pairs holding draws lo .. hi - 1
            skip, span = lo - 2 * first, slice(lo - start, hi - start)
            if use_numpy:
                values = _halves(hash_pairs_numpy(first, last - first + 1, self.keys))
            else:
                x = hash_pairs_torch(first, last - first + 1, self.keys, device)
                values = torch.stack([x & 0xFFFF, x >> 16], dim=1).reshape(-1)
            yield span, values[skip : skip + hi - lo]

    def draws(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The next `count` draws, as int32 values in [0, 65536), made on `device`."""
        device = torch.device(device)
        out = torch.empty(count, dtype=torch.int32, device=device)
        sink = out.numpy() if device.type == "cpu" else out
        for span, values in self._chunks(count, device):
            sink[span] = values
        return out

    def keep_mask(
        self, shape: torch.Size | tuple[int, ...], probability: float, device: torch.device
    ) -> torch.Tensor:
        """Float 0/1 tensor, each entry 1 with `probability` (resolution 2**-16)."""
        threshold = round(probability * 65536)
        device = torch.device(device)
        keep = torch.empty(math.prod(shape), dtype=torch.float32, device=device)
        sink = keep.numpy() if device.type == "cpu" else None
        for span, values in self._chunks(keep.numel(), device):
            if sink is not None:  # compare straight into the float output: one pass
                np.less(values, threshold, out=sink[span], casting="unsafe")
            else:
                keep[span] = values < threshold
        return keep.reshape(shape)

    def keep_where(
        self, probability: torch.Tensor, index: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Bool tensor shaped like `index`: entry i kept with probability[index[i]] (a float64
        table, resolution 2**-16). The decision is an integer comparison, so it is the same on
        every device and for every dtype the caller computes in."""
        thresholds = (probability * 65536).round_().to(torch.int32).to(device)
        return self.draws(index.numel(), device).reshape(index.shape) < thresholds[index]

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform floats in (0, 1) on a 2**-16 grid."""
        draws = self.draws(math.prod(shape), device).to(torch.float32)
        return draws.add_(0.5).div_(65536).reshape(shape)

    def fork(self, label: str) -> TensorRng:
        """An independent stream for the next input of the same tensor."""
        return TensorRng(self.seed, label, start=self.start)
