"""Low-rank adapters for the real zoo's experts: trained on a frozen base, shipped as their
factors (a few MB, never a full checkpoint), and folded into the base's weights to make an
ordinary checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TARGETS = ("gate_proj", "up_proj", "down_proj")  # the MLP: where factual skills live


class LoRALinear(torch.nn.Module):
    """`linear(x) + B A x`: B starts at zero, so training starts from the base exactly."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.linear = linear
        generator = torch.Generator().manual_seed(seed)
        scale = 1 / math.sqrt(linear.in_features)
        self.A = torch.nn.Parameter(
            torch.randn(rank, linear.in_features, generator=generator) * scale
        )
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.A.T) @ self.B.T * self.scale


def attach(model: torch.nn.Module, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the model and wrap its MLP projections; returns the trainable factors."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for i, layer in enumerate(model.model.layers):
        for k, name in enumerate(TARGETS):
            wrapped = LoRALinear(getattr(layer.mlp, name), rank, alpha, seed * 1000 + i * 8 + k)
            setattr(layer.mlp, name, wrapped)
            trainable += [wrapped.A, wrapped.B]
    return trainable


def detach(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Unwrap the projections and return the factors as `<weight name>.lora_A/.lora_B` (the
    scale folded into B), in `dtype`; the model is the base again."""
    factors = {}
    for i, layer in enumerate(model.model.layers):
        for name in TARGETS:
            wrapped = getattr(layer.mlp, name)
            key = f"model.layers.{i}.mlp.{name}.weight"
            factors[f"{key}.lora_A"] = wrapped.A.detach().to(dtype).contiguous()
            factors[f"{key}.lora_B"] = (wrapped.B.detach() * wrapped.scale).to(dtype).contiguous()
            setattr(layer.mlp, name, wrapped.linear)
    return factors


def save_factors(factors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(factors, str(path), metadata=metadata)


def apply_factors(model: torch.nn.Module, path: Path) -> int:
    """Add `B @ A` (computed in float32) to each named weight; returns how many were changed."""
    factors = load_file(str(path))
    weights = dict(model.named_parameters())
    names = sorted({k.rsplit(".lora_", 1)[0] for k in factors})
    with torch.no_grad():
        for name in names:
            a = factors[f"{name}.lora_A"].float()
            b = factors[f"{name}.lora_B"].float()
            weights[name].add_(b @ a)
    return len(names)
