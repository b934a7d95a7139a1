"""The live model a worker writes each candidate into.

It is built with its parameters on the meta device (shapes only: no memory and no random
initialisation, which for a 7B model costs more than a merge) and then given empty storage on
the worker's device; buffers computed from the config (rotary frequencies) are built for real.
Empty storage holds whatever memory held before, so every parameter and persistent buffer must
be written by the candidate's plan: `unwritten` names what a plan would leave as garbage.
"""

from __future__ import annotations

from typing import Any

import torch


def build_live_model(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, trust_remote_code: bool
) -> torch.nn.Module:
    """An uninitialised model of `config` on `device`, in `dtype`, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=trust_remote_code, dtype=dtype
        )
    materialize_parameters(model, device)
    model.tie_weights()  # tied embeddings share one tensor, as from_pretrained leaves them
    return model.eval()


def materialize_parameters(model: torch.nn.Module, device: torch.device) -> None:
    """Empty storage on `device` for every meta parameter; a parameter several modules share
    (tied embeddings) stays one tensor."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
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
