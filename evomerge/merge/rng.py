"""Random state for stochastic merge methods, derived from (recipe seed, tensor name).

Never a global RNG: each tensor gets its own generator, so the weights of one tensor do not
depend on which other tensors were merged before it, on thread order or on the device. Draws
come from torch's CPU Mersenne Twister (the same stream on every machine), 16 bits per entry,
and are moved to the compute device afterwards.
"""

from __future__ import annotations

import hashlib
import math

import torch


def tensor_seed(recipe_seed: int, tensor_name: str, stream: str = "") -> int:
    """A 63-bit seed that depends only on the recipe seed, the tensor name and a stream label."""
    key = f"{int(recipe_seed)}\x00{tensor_name}\x00{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class TensorRng:
    """Uniform draws for one tensor; each call to `uniform` continues the same stream."""

    def __init__(self, recipe_seed: int, tensor_name: str, stream: str = "") -> None:
        self.seed = tensor_seed(recipe_seed, tensor_name, stream)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    def _bits16(self, numel: int) -> torch.Tensor:
        """numel uniform 16-bit integers (as int16), four per 64-bit draw."""
        words = torch.randint(
            -(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, generator=self._generator
        )
        return words.view(torch.int16)[:numel]

    def keep_mask(
        self, shape: torch.Size | tuple[int, ...], probability: float, device: torch.device
    ) -> torch.Tensor:
        """Float 0/1 tensor, each entry 1 with `probability` (resolution 2**-16)."""
        numel = math.prod(shape)
        threshold = round(probability * 65536) - 32768
        keep = torch.empty(numel, dtype=torch.float32)
        torch.lt(self._bits16(numel), threshold, out=keep)
        return keep.reshape(shape).to(device)

    def keep_where(
        self, probability: torch.Tensor, index: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Bool tensor shaped like `index`: entry i kept with probability[index[i]] (a float64
        table, resolution 2**-16). The decision is an integer comparison, so it is the same on
        every device and for every dtype the caller computes in."""
        thresholds = (probability * 65536).round_().to(torch.int32).sub_(32768).to(device)
        draws = self._bits16(index.numel()).to(device=device, dtype=torch.int32)
        return draws.reshape(index.shape) < thresholds[index]

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform floats in (0, 1) on a 2**-16 grid."""
        draws = self._bits16(math.prod(shape)).to(torch.float32).add_(32768.5).div_(65536)
        return draws.reshape(shape).to(device)

    def fork(self, label: str) -> TensorRng:
        """An independent stream for the next input of the same tensor."""
        return TensorRng(self.seed, label)
