"""Search spaces: read a space file (or inline mapping), build the genome layout, decode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ValidationError

from evomerge.errors import EvomergeError
from evomerge.recipe import describe_validation_error
from evomerge.spaces.base import SearchSpace
from evomerge.spaces.dataflow_space import CombinedSpace, CombinedSpec, DataflowSpace, DataflowSpec
from evomerge.spaces.layer_swap import LayerSwapSpace, LayerSwapSpec
from evomerge.spaces.parameter import ParameterSpace, ParameterSpaceSpec

KINDS = {
    "parameter": ParameterSpaceSpec,
    "layer_swap": LayerSwapSpec,
    "dataflow": DataflowSpec,
    "ps_dfs": CombinedSpec,
}

__all__ = ["KINDS", "SearchSpace", "build_space", "read_space_spec"]


def read_space_spec(source: Union[str, Path, dict[str, Any]], where: str = "search_space"):
    """A search-space spec from a file path or an inline mapping, validated."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvomergeError(f"field '{where}': file {path} not found") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise EvomergeError(
                f"field '{where}': cannot read {path} ({type(exc).__name__})"
            ) from None
    if not isinstance(data, dict):
        raise EvomergeError(f"field '{where}': expected a mapping with 'kind'")
    kind = data.get("kind", "parameter")
    if not isinstance(kind, str) or kind not in KINDS:
        raise EvomergeError(
            f"field '{where}.kind': unknown kind {kind!r}; use one of {', '.join(KINDS)}"
        )
    try:
        return KINDS[kind].model_validate(data)
    except ValidationError as exc:
        raise EvomergeError(f"{where}: {describe_validation_error(exc)}") from None


def build_space(
    spec, models: dict[str, str], base: Optional[str], depth_of: Callable[[str], int]
) -> SearchSpace:
    if isinstance(spec, ParameterSpaceSpec):
        return ParameterSpace(spec, models, base, depth_of)
    if isinstance(spec, LayerSwapSpec):
        return LayerSwapSpace(spec, models, base, depth_of)
    if isinstance(spec, DataflowSpec):
        return DataflowSpace(spec, models, depth_of)
    return CombinedSpace(spec, models, base, depth_of)
