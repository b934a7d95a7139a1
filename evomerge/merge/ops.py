"""What a merge plan is made of: per-tensor operations, the plan that holds them, and the one
function that turns an operation into a tensor.

This is the merge package's leaf: the planners (plan.py, layer_path.py), the nested-recipe source
(nested.py) and the engine all import it, and it imports none of them, so the package reads
bottom-up: methods -> ops -> nested / layer_path -> plan -> engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from evomerge.merge.io import ModelSource, OutputTensor
from evomerge.merge.learned import Coefficients
from evomerge.merge.methods import MergeInputs, Method
from evomerge.merge.rng import TensorRng
from evomerge.merge.statistics import Statistics
from evomerge.recipe import Recipe

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")
POST_NAME = re.compile(r"(^|\.)(lm_head|norm|ln_f|final_layernorm|final_layer_norm|final_norm)\.")

Fetch = Callable[[str, str], torch.Tensor]  # (source key, tensor name) -> tensor
CHUNK_BYTES = 256 * 2**20  # default cap on one input's fp32 piece of a large tensor's merge


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
    scale: Optional[float] = None  # LiNeS: the merged task vector's scale at this depth


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
    # what a data-aware method (Statistics) or a learned merge (Coefficients) reads
    statistics: Optional[Union[Statistics, Coefficients]] = field(default=None, repr=False)

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


def row_chunks(op: TensorOp, method: Method, chunk_bytes: Optional[int]) -> list[Optional[slice]]:
    """The pieces `op` is merged in: [None] (the whole tensor at once), or row ranges whose fp32
    inputs hold at most `chunk_bytes` each when the method works entry by entry (a method that
    looks at the whole tensor, such as a magnitude top-k, is always merged whole)."""
    if (
        not chunk_bytes
        or op.copy_only
        or len(op.shape) == 0
        or math.prod(op.shape) * 4 <= chunk_bytes
        or not method.entrywise(op.shared)
    ):
        return [None]
    rows = max(1, chunk_bytes // (math.prod(op.shape[1:]) * 4))
    return [slice(lo, min(lo + rows, op.shape[0])) for lo in range(0, op.shape[0], rows)]


def fetch_inputs(op: TensorOp, fetch: Fetch, rows: Optional[slice] = None) -> list[torch.Tensor]:
    """The op's input tensors (or the rows of them that one piece merges), wherever they are
    held."""
    raw = [fetch(model, name) for model, name in op.inputs]
    return raw if rows is None else [t[rows] for t in raw]


def merge_tensor(
    op: TensorOp,
    method: Method,
    fetch: Fetch,
    device: torch.device,
    seed: int,
    inputs_are_private: bool,
    rows: Optional[slice] = None,
    raw: Optional[list[torch.Tensor]] = None,
    statistics: Optional[Union[Statistics, Coefficients]] = None,
) -> torch.Tensor:
    """One output tensor (or its `rows`), in its output dtype, on `device`
    (`inputs_are_private`: the fetched tensors are the caller's to overwrite, so the method may
    work in them; `raw`: the inputs, already fetched; `statistics`: what a data-aware method
    reads)."""
    if raw is None:
        raw = fetch_inputs(op, fetch, rows)
    if op.copy_only:
        return raw[op.base_index or 0].to(device)
    work = [r.to(device=device, dtype=torch.float32) for r in raw]
    scratch = inputs_are_private or all(w is not r for w, r in zip(work, raw))
    del raw
    base = work[op.base_index] if op.base_index is not None else None
    others = [w for i, w in enumerate(work) if i != op.base_index]
    rng = None
    if method.stochastic:  # a chunk's draws are the ones its entries get in the whole tensor
        start = 0 if rows is None else rows.start * math.prod(op.shape[1:])
        rng = TensorRng(seed, op.name, start=start)
    stats = None
    kind = method.statistics or method.learned
    if kind and statistics is not None:
        stats = []
        for i, (model, name) in enumerate(op.inputs):
            if i != op.base_index:
                value = statistics.get(model, kind, name)
                stats.append(None if value is None else value.to(device, torch.float32))
    keep = base.clone() if op.scale is not None and scratch and base is not None else base
    merged = method.fn(MergeInputs(base, others, op.shared, op.per_input, rng, scratch, stats))
    if op.scale is not None and keep is not None:  # LiNeS: base + scale x merged task vector
        merged = merged.sub_(keep).mul_(op.scale).add_(keep)
    return merged.to(op.out_dtype)


def merge_whole(
    op: TensorOp,
    method: Method,
    fetch: Fetch,
    device: torch.device,
    seed: int,
    inputs_are_private: bool,
    chunk_bytes: Optional[int] = None,
    statistics: Optional[Union[Statistics, Coefficients]] = None,
) -> torch.Tensor:
    """One output tensor, merged in row chunks where the method allows and the tensor is larger
    than `chunk_bytes`, so merge temporaries stay bounded; the result is the same either way."""
    pieces = row_chunks(op, method, chunk_bytes)
    if pieces == [None]:
        return merge_tensor(
            op, method, fetch, device, seed, inputs_are_private, statistics=statistics
        )
    whole = fetch_inputs(op, fetch)  # read once (a disk read is of the whole tensor)
    out = torch.empty(op.shape, dtype=op.out_dtype, device=device)
    for rows in pieces:
        raw = [t[rows] for t in whole]
        out[rows] = merge_tensor(
            op, method, fetch, device, seed, inputs_are_private, rows, raw, statistics
        )
    return out
