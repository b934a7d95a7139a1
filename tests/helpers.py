"""Test helpers: read a checkpoint folder's tensors, write recipes."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_recipe(folder: Path, data: dict, name: str = "recipe.yml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
