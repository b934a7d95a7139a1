"""Low-rank adapters for the real zoo's experts: trained on a frozen base, shipped as their
factors (a few MB, never a full checkpoint), and folded into the base's weights to make an
ordinary checkpoint."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
TARGETS = MLP  # the default: where factual skills live


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


def _sites(
    model: torch.nn.Module, targets: Sequence[str], layers: Optional[Sequence[int]]
) -> list[tuple[int, str, torch.nn.Module, str]]:
    """(layer index, target path, parent module, attribute) of every adapted projection."""
    chosen = range(len(model.model.layers)) if layers is None else layers
    sites = []
    for i in chosen:
        for target in targets:
            parent_name, attribute = target.rsplit(".", 1)
            sites.append((i, target, model.model.layers[i].get_submodule(parent_name), attribute))
    return sites


def attach(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    seed: int,
    targets: Sequence[str] = TARGETS,
    layers: Optional[Sequence[int]] = None,
) -> list[torch.nn.Parameter]:
    """Freeze the model and wrap the `targets` projections of `layers` (all when None);
    returns the trainable factors."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for i, target, parent, attribute in _sites(model, targets, layers):
        k = (MLP + ATTENTION).index(target) if target in MLP + ATTENTION else len(MLP + ATTENTION)
        wrapped = LoRALinear(getattr(parent, attribute), rank, alpha, seed * 1000 + i * 8 + k)
        setattr(parent, attribute, wrapped)
        trainable += [wrapped.A, wrapped.B]
    return trainable


def detach(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Unwrap every adapted projection and return the factors as `<weight name>.lora_A/.lora_B`
    (the scale folded into B), in `dtype`; the model is the base again."""
    factors = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        key = f"{name}.weight"
        factors[f"{key}.lora_A"] = module.A.detach().to(dtype).contiguous()
        factors[f"{key}.lora_B"] = (module.B.detach() * module.scale).to(dtype).contiguous()
        parent_name, attribute = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attribute, module.linear)
    return factors


def row_delta(name: str, ids: list[int], delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """A change to some rows of one weight (an embedding's new words) as `<name>.rows` (the
    rows' deltas, fp16) and `<name>.row_ids`."""
    return {
        f"{name}.rows": delta[ids].to(torch.float16).contiguous(),
        f"{name}.row_ids": torch.tensor(ids, dtype=torch.int64),
    }


def save_factors(factors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Written beside `path` and renamed into place: a kill leaves the old file or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(factors, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def apply_factors(model: torch.nn.Module, path: Path, scale: float = 1.0) -> int:
    """Add `scale * B @ A` (computed in float32) to each named weight, and each row delta to
    its rows; returns how many weights were changed."""
    factors = load_file(str(path))
    weights = dict(model.named_parameters())
    names = sorted({k.rsplit(".lora_", 1)[0] for k in factors if ".lora_" in k})
    rows = sorted(k.removesuffix(".rows") for k in factors if k.endswith(".rows"))
    with torch.no_grad():
        for name in names:
            a = factors[f"{name}.lora_A"].float()
            b = factors[f"{name}.lora_B"].float()
            weights[name].add_(scale * (b @ a))
        for name in rows:
            ids = factors[f"{name}.row_ids"]
            weights[name][ids] += scale * factors[f"{name}.rows"].float()
    return len(names) + len(rows)
