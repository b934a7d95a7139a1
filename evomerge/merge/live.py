"""The live model a worker writes each candidate into.

It is built with its parameters on the meta device (shapes only: no memory and no random
initialisation, which for a 7B model costs more than a merge) and then given empty storage on
the worker's device; buffers computed from the config (rotary frequencies) are built for real.
Empty storage holds whatever memory held before, so every parameter and persistent buffer must
be written by the candidate's plan: `unwritten` names what a plan would leave as garbage.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional

import torch

LAYER = re.compile(r"^((?:.*\.)?(?:layers|h|blocks)\.(\d+))\.")  # a decoder layer's module


def build_live_model(
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    devices: Optional[list[torch.device]] = None,
) -> torch.nn.Module:
    """An uninitialised model of `config` on `device`, in `dtype`, in eval mode; with several
    `devices` (a worker spanning GPUs), its decoder layers spread over them (spread_layers)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=trust_remote_code, dtype=dtype
        )
    spread = spread_layers(model, devices) if devices and len(devices) > 1 else None
    materialize_parameters(model, lambda module: spread[module] if spread else device)
    model.tie_weights()  # tied embeddings share one tensor, as from_pretrained leaves them
    if spread:
        from accelerate import dispatch_model

        # hooks move activations between devices; forced so that a one-device map still works
        model = dispatch_model(
            model, device_map={k: str(v) for k, v in spread.items()}, force_hooks=True
        )
    return model.eval()


def spread_layers(model: torch.nn.Module, devices: list[torch.device]) -> dict[str, torch.device]:
    """Module name -> device for a model spanning several devices: the decoder layers in
    contiguous runs of near-equal length, one run per device in order; everything outside the
    layers (embeddings, final norm, head: tied tensors stay together) on the first device."""
    modules: dict[str, Optional[int]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        found = LAYER.match(name)
        if found:
            modules[found.group(1)] = int(found.group(2))
        else:
            modules[name.rpartition(".")[0]] = None
    depth = 1 + max((i for i in modules.values() if i is not None), default=0)
    return {
        module: devices[0] if index is None else devices[index * len(devices) // depth]
        for module, index in modules.items()
    }


def materialize_parameters(
    model: torch.nn.Module, device_of: Callable[[str], torch.device]
) -> None:
    """Empty storage for every meta parameter, on the device `device_of` gives its module (or
    the decoder layer holding it); a parameter several modules share (tied embeddings) stays
    one tensor."""
    made: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                found = LAYER.match(f"{module_name}.{name}")
                device = device_of(found.group(1) if found else module_name)
                made[id(param)] = torch.nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=False
                )
            module._parameters[name] = made[id(param)]


def unwritten(model: torch.nn.Module, written: set[str]) -> list[str]:
    """The model's parameters and persistent buffers that no name in `written` reaches (a
    tensor with several names, like tied embeddings, is written when any of them is)."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    return [names[0] for names in names_of.values() if not any(n in written for n in names)]
