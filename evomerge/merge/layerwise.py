"""RegMean++ (arXiv:2508.03121): RegMean whose Gram matrices come from the merged model's own
activations, layer after layer. The inputs of every source's decoder layer l are the hidden
states the merged layers 0 .. l-1 produce on the calibration text, so each merge accounts for
how the layers before it were merged (RegMean takes every source's inputs from that source's
own layers).

The live model does the work: embeddings, final norm and head are merged first (weighted
averages: the head's inputs are the same for every source, where RegMean's closed form is that
average); then for each layer l, each source's layer-l weights are written into the live
model's layer l and the calibration text is run up to the end of that layer, with hooks adding
up X^T X at every linear layer's input; the layer is merged by RegMean's closed form from those
Gram matrices and written into the live model, and the next layer sees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import MergeInputs
from evomerge.merge.ops import MergePlan, TensorOp, split_layer_name
from evomerge.merge.statistics import read_texts


class _LayerDone(Exception):
    """Raised by a hook at the end of the layer being measured: nothing after it runs."""


def merge_layerwise(
    plan: MergePlan,
    fetch: Callable[[str, str], torch.Tensor],
    model: torch.nn.Module,
    tokenizer: Any,
    max_length: int = 256,
) -> None:
    """Write the RegMean++ merge of `plan` into `model` (the output architecture's live model)."""
    texts = read_texts(plan.statistics.folder)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    device = next(iter(targets.values())).device
    by_layer: dict[int, list[TensorOp]] = {}
    outside: list[TensorOp] = []
    for op in plan.ops:
        parts = split_layer_name(op.name)
        (by_layer.setdefault(parts[1], []) if parts else outside).append(op)

    def write(op: TensorOp, grams: Optional[list] = None) -> None:
        if op.copy_only:
            merged = fetch(*op.inputs[0]).to(device)
        else:  # no Gram matrices (outside the layers, or not a linear weight): the average
            merged = _regmean(plan, op, fetch, device, grams or [None] * len(op.inputs))
        targets[op.name].copy_(merged)

    batches = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)[
            "input_ids"
        ].to(device)
        for text in texts
    ]
    with torch.no_grad():
        for op in outside:
            write(op)
        for layer in sorted(by_layer):
            ops = by_layer[layer]
            grams = [
                _grams_of_source(model, targets, ops, k, fetch, batches)
                for k in range(len(ops[0].inputs))
            ]
            for op in ops:
                write(op, [g.get(op.name) for g in grams])


def _grams_of_source(
    model: torch.nn.Module,
    targets: dict[str, torch.Tensor],
    ops: list[TensorOp],
    k: int,
    fetch: Callable[[str, str], torch.Tensor],
    batches: list[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """X^T X / tokens at every linear input of the layer `ops` make, with source k's weights
    in that layer and the merged layers before it."""
    for op in ops:  # source k's own layer, in place in the live model
        model_ref, name = op.inputs[k]
        targets[op.name].copy_(fetch(model_ref, name))
    names = {op.name for op in ops}
    linears = {
        f"{module_name}.weight": module
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and f"{module_name}.weight" in names
    }
    if not linears:
        raise EvomergeError(
            "regmean_plus: the decoder layers have no torch.nn.Linear modules to hook; use "
            "fisher or pcb for this architecture"
        )
    layer = _layer_module(model, ops[0].name)
    grams: dict[str, torch.Tensor] = {}
    tokens = 0
    hooks = []
    for weight_name, module in linears.items():

        def hook(module, args, name=weight_name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            product = x.T @ x
            grams[name] = grams[name] + product if name in grams else product

        hooks.append(module.register_forward_pre_hook(hook))

    def stop(module, args, output) -> None:
        raise _LayerDone

    hooks.append(layer.register_forward_hook(stop))
    try:
        for ids in batches:
            tokens += ids.numel()
            with contextlib.suppress(_LayerDone):
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: (g / max(tokens, 1)).to(torch.float32) for name, g in grams.items()}


def _layer_module(model: torch.nn.Module, tensor_name: str) -> torch.nn.Module:
    prefix, index, _rest = split_layer_name(tensor_name)
    return model.get_submodule(f"{prefix}{index}")


def _regmean(
    plan: MergePlan,
    op: TensorOp,
    fetch: Callable[[str, str], torch.Tensor],
    device: torch.device,
    grams: list,
) -> torch.Tensor:
    """RegMean's closed form for one tensor with the given per-source Gram matrices (None: not
    a linear weight, averaged)."""
    work = [fetch(m, n).to(device=device, dtype=torch.float32) for m, n in op.inputs]
    merged = plan.method.fn(MergeInputs(None, work, op.shared, op.per_input, None, True, grams))
    return merged.to(op.out_dtype)
