"""Random state for stochastic merge methods, derived from (recipe seed, tensor name).

Never a global RNG: each tensor gets its own generator, so the weights of one tensor do not
depend on which other tensors were merged before it, on thread order or on the device. Draws
come from torch's CPU Mersenne Twister (the same stream on every machine) and are moved to the
compute device afterwards.
"""

from __future__ import annotations

import hashlib

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

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        draws = torch.rand(shape, generator=self._generator, dtype=torch.float32)
        return draws.to(device, non_blocking=False)

    def fork(self, label: str) -> TensorRng:
        """An independent stream for the next input of the same tensor."""
        return TensorRng(self.seed, label)
