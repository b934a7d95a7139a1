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


def scale_layer_inputs(model, scales) -> None:
    """Multiply the hidden state entering decoder layer i by scales[i] (forward pre-hooks): the
    data-flow path run with its scales applied explicitly, to compare a folded export with."""
    for layer, scale in zip(model.model.layers, scales):

        def scale_input(module, args, kwargs, s=scale):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

        layer.register_forward_pre_hook(scale_input, with_kwargs=True)
