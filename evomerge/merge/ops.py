"""What a merge plan is made of: per-tensor operations, the plan that holds them, and the one
function that turns an operation into a tensor.

This is the merge package's leaf: the planners (plan.py, dataflow.py), the nested-recipe source
(nested.py) and the engine all import it, and it imports none of them, so the package reads
bottom-up: methods -> ops -> nested / dataflow -> plan -> engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from evomerge.merge.io import ModelSource, OutputTensor
from evomerge.merge.methods import MergeInputs, Method
from evomerge.merge.rng import TensorRng
from evomerge.recipe import Recipe

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")
POST_NAME = re.compile(r"(^|\.)(lm_head|norm|ln_f|final_layernorm|final_layer_norm|final_norm)\.")

Fetch = Callable[[str, str], torch.Tensor]  # (source key, tensor name) -> tensor


def split_layer_name(name: str) -> Optional[tuple[str, int, str]]:
    """("model.layers.", 3, "mlp.up_proj.weight") for a decoder layer's tensor, else None."""
    match = LAYER_NAME.match(name)
    if match is None:
        return None
    return match["prefix"], int(match["index"]), match["rest"]


@dataclass
class TensorOp:
    """How one output tensor is made."""

    name: str
    inputs: list[tuple[str, str]]  # (source key, tensor name in that source), recipe order
    base_index: Optional[int]
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]  # aligned with the method's non-base (or all) inputs
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    copy_only: bool = False  # non-float buffers are copied from the first input


@dataclass
class MergePlan:
    recipe: Recipe
    method: Method
    ops: list[TensorOp]
    donor: str  # source whose config the output starts from
    tokenizer_source: Optional[str]
    layer_sources: Optional[list[tuple[str, int]]] = None  # output layer -> (source, layer)
    sources: dict[str, ModelSource] = field(default_factory=dict, repr=False)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def out_layers(self) -> Optional[int]:
        return None if self.layer_sources is None else len(self.layer_sources)

    def output_tensors(self) -> list[OutputTensor]:
        return [OutputTensor(op.name, op.out_dtype, op.shape) for op in self.ops]

    def output_config(self) -> dict[str, Any]:
        """The donor's config with depth, per-layer lists and dtype made true for the output."""
        config = dict(self.sources[self.donor].config)
        if self.layer_sources is not None:
            depth = self.sources[self.donor].num_layers
            for key, value in list(config.items()):
                if isinstance(value, list) and len(value) == depth and key != "architectures":
                    config[key] = [
                        self.sources[model].config[key][layer]
                        if isinstance(self.sources[model].config.get(key), list)
                        else value[min(layer, depth - 1)]
                        for model, layer in self.layer_sources
                    ]
            config["num_hidden_layers"] = len(self.layer_sources)
        config.update(self.config_overrides)
        dtypes = {op.out_dtype for op in self.ops if op.out_dtype.is_floating_point}
        if len(dtypes) == 1:
            name = str(dtypes.pop()).removeprefix("torch.")
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
        return config

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def merge_tensor(
    op: TensorOp,
    method: Method,
    fetch: Fetch,
    device: torch.device,
    seed: int,
    inputs_are_private: bool,
) -> torch.Tensor:
    """One output tensor, in its output dtype, on `device` (`inputs_are_private`: the fetched
    tensors are the caller's to overwrite, so the method may work in them)."""
    raw = [fetch(model, name) for model, name in op.inputs]
    if op.copy_only:
        return raw[op.base_index or 0].to(device)
    work = [r.to(device=device, dtype=torch.float32) for r in raw]
    scratch = inputs_are_private or all(w is not r for w, r in zip(work, raw))
    del raw
    base = work[op.base_index] if op.base_index is not None else None
    others = [w for i, w in enumerate(work) if i != op.base_index]
    rng = TensorRng(seed, op.name) if method.stochastic else None
    merged = method.fn(MergeInputs(base, others, op.shared, op.per_input, rng, scratch))
    return merged.to(op.out_dtype)
