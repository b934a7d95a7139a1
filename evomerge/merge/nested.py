"""A nested recipe seen as a model: a data-flow path can read layers of a parameter-space merge
(the paper's PS-then-DFS) without that merge ever touching disk.

`MergedSource` answers the questions the planner asks of a checkpoint (config, tensor names,
shapes, dtypes) from the nested plan, and makes a tensor only when one is fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.io import OutputTensor
from evomerge.merge.ops import Fetch, MergePlan, TensorOp, merge_tensor


class MergedSource:
    """The output of `plan`, addressable tensor by tensor like a `ModelSource`."""

    def __init__(self, ref: str, plan: MergePlan) -> None:
        self.ref = ref
        self.plan = plan
        self.config: dict[str, Any] = plan.output_config()
        self._ops: dict[str, TensorOp] = {op.name: op for op in plan.ops}
        self.index: dict[str, OutputTensor] = {
            op.name: OutputTensor(op.name, op.out_dtype, op.shape) for op in plan.ops
        }
        # the tensor made last: a stage read twice for one output tensor (as base and as
        # model) is merged once
        self._last: Optional[tuple[str, torch.Tensor]] = None

    @property
    def path(self) -> Path:
        """Where the nested merge's tokenizer lives."""
        return self.plan.sources[self.plan.tokenizer_source].path

    @property
    def architecture(self) -> str:
        return self.plan.sources[self.plan.donor].architecture

    @property
    def vocab_size(self) -> Optional[int]:
        return self.config.get("vocab_size")

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def make(
        self, name: str, fetch: Fetch, device: torch.device, private: bool = False
    ) -> torch.Tensor:
        """Merge one tensor of the nested recipe from inputs that `fetch` supplies (`private`:
        the fetched tensors are the caller's to overwrite)."""
        op = self._ops.get(name)
        if op is None:
            raise EvomergeError(f"nested recipe {self.ref!r}: has no tensor {name!r}")
        return merge_tensor(
            op,
            self.plan.method,
            fetch,
            device,
            self.plan.recipe.seed,
            inputs_are_private=private,
            statistics=self.plan.statistics,
        )

    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor, merged from the nested recipe's own (disk) sources."""
        if self._last is not None and self._last[0] == name:
            return self._last[1].clone()
        sources = self.plan.sources
        fetch = lambda ref, tensor: sources[ref].get(tensor)  # noqa: E731
        tensor = self.make(name, fetch, torch.device("cpu"), private=True)
        self._last = (name, tensor)
        return tensor.clone()

    def close(self) -> None:
        self._last = None
        self.plan.close()
