"""The merge engine: recipe -> plan -> merged tensors, on disk or in a live model."""

from evomerge.merge import (
    informed,  # noqa: F401  (registers fisher, regmean(_plus), pcb)
    learned,  # noqa: F401  (registers dam, adamerging)
)
from evomerge.merge.engine import load_source_tensors, merge_into_model, merge_to_disk, plan_for
from evomerge.merge.methods import METHODS, get_method
from evomerge.merge.ops import MergePlan
from evomerge.merge.plan import build_plan

__all__ = [
    "METHODS",
    "MergePlan",
    "build_plan",
    "get_method",
    "load_source_tensors",
    "merge_into_model",
    "merge_to_disk",
    "plan_for",
]
