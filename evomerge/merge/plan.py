"""Recipe -> per-tensor operations, with every parameter resolved and checked up front.

Planning reads only headers and configs. Every error a user can make in a recipe (unknown
parameter, bad density, missing tensor, shape mismatch, wrong number of inputs) surfaces here,
before a single output byte is written. Layer placement and parameter interpolation follow
mergekit: a per-layer list is read at t = layer / (n_layers - 1) within its slice; tensors
outside the layers (embeddings, final norm, lm_head) read it at t = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.io import ModelSource, TensorInfo, parse_dtype
from evomerge.merge.layer_path import build_dataflow_plan
from evomerge.merge.learned import Coefficients
from evomerge.merge.methods import Method, Param, get_method
from evomerge.merge.nested import MergedSource
from evomerge.merge.ops import POST_NAME, MergePlan, TensorOp, split_layer_name
from evomerge.merge.statistics import Statistics
from evomerge.recipe import (
    FilteredValue,
    OutputSlice,
    Parameters,
    Recipe,
    Setting,
    SliceSource,
    coerce,
    resolve_setting,
)

NESTED_REF = "<nested recipe {name}>"  # a source key no path or hub name can spell


class _Scope:
    """Where parameter settings come from, highest precedence first (mergekit's order)."""

    def __init__(self, recipe: Recipe, out_slice: OutputSlice) -> None:
        self.recipe = recipe
        self.out_slice = out_slice

    def settings(self, model: Optional[str]) -> Iterable[Optional[Parameters]]:
        if model is not None:
            for src in self.out_slice.sources:
                if src.model == model:
                    yield src.parameters
        yield self.out_slice.parameters
        yield self.recipe.parameters


def _resolve(
    param: Param, settings: Iterable[Optional[Parameters]], tensor: str, t: float, where: str
) -> Any:
    for scope in settings:
        if scope and param.name in scope:
            try:
                value = resolve_setting(scope[param.name], tensor, t, param.kind)
            except ValueError as exc:
                raise EvomergeError(f"parameter '{param.name}' ({where}): {exc}") from None
            if value is not None:
                break
    else:
        if param.required:
            raise EvomergeError(
                f"parameter '{param.name}' is required by this method ({where}); add it under "
                "'parameters'"
            )
        return param.default
    if param.check is not None and (problem := param.check(value)):
        raise EvomergeError(f"parameter '{param.name}' ({where}, tensor {tensor}): {problem}")
    return value


def _check_parameter_settings(recipe: Recipe, method: Method) -> None:
    """Every parameter named anywhere in the recipe exists and every value in it is valid,
    including values that a higher-precedence setting shadows."""
    scopes: list[tuple[str, Optional[Parameters]]] = [("parameters", recipe.parameters)]
    for i, m in enumerate(recipe.models or []):
        scopes.append((f"models.{i}.parameters", m.parameters))
    for i, s in enumerate(recipe.slices or []):
        scopes.append((f"slices.{i}.parameters", s.parameters))
        scopes += [
            (f"slices.{i}.sources.{j}.parameters", src.parameters)
            for j, src in enumerate(s.sources)
        ]
    for where, params in scopes:
        for name, setting in (params or {}).items():
            param = method.param_index.get(name)
            if param is None:
                known = ", ".join(sorted(method.param_index)) or "none"
                raise EvomergeError(
                    f"field '{where}.{name}': unknown parameter for {method.name}; known: {known}"
                )
            for value in _literal_values(setting):
                try:
                    value = coerce(value, param.kind)
                except ValueError as exc:
                    raise EvomergeError(f"field '{where}.{name}': {exc}") from None
                if param.check is not None and (problem := param.check(value)):
                    raise EvomergeError(f"field '{where}.{name}': {problem}")


def _literal_values(setting: Setting) -> Iterable[Any]:
    if isinstance(setting, FilteredValue):
        yield from _literal_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _literal_values(item)
    else:
        yield setting


def _normalize_slices(recipe: Recipe, sources: dict[str, ModelSource]) -> list[OutputSlice]:
    """`models:` becomes one slice over every layer, with the base appended when unlisted."""
    if recipe.slices:
        return recipe.slices
    entries = list(recipe.models or [])
    listed = {m.model for m in entries}
    depths = {m.model: sources[m.model].num_layers for m in entries}
    if recipe.base_model and recipe.base_model not in listed:
        depths[recipe.base_model] = sources[recipe.base_model].num_layers
    if len(set(depths.values())) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in depths.items())
        raise EvomergeError(f"models have different numbers of layers ({detail}); use 'slices'")
    depth = next(iter(depths.values()))
    slice_sources = [
        SliceSource(model=m.model, layer_range=(0, depth), parameters=m.parameters) for m in entries
    ]
    if recipe.base_model and recipe.base_model not in listed:
        slice_sources.append(SliceSource(model=recipe.base_model, layer_range=(0, depth)))
    return [OutputSlice(sources=slice_sources)]


def _check_inputs(
    method: Method, models: list[str], base: Optional[str], where: str
) -> Optional[int]:
    if len(set(models)) != len(models):
        raise EvomergeError(f"{where}: a model is listed twice")
    base_index = models.index(base) if base in models else None
    if method.base == "ignored":
        base_index = None
    elif base is not None and base_index is None:
        raise EvomergeError(f"{where}: base_model {base!r} is not among the inputs")
    if method.base == "required" and base_index is None:
        raise EvomergeError(f"merge method {method.name} needs a base_model ({where})")
    count = len(models)
    non_base = count - (base_index is not None)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        span = (
            f"exactly {method.min_inputs}"
            if method.min_inputs == method.max_inputs
            else f"at least {method.min_inputs}"
            if method.max_inputs is None
            else f"{method.min_inputs} to {method.max_inputs}"
        )
        raise EvomergeError(
            f"merge method {method.name} takes {span} models including the base; "
            f"got {count} ({where})"
        )
    if non_base < method.min_non_base or (
        method.max_non_base is not None and non_base > method.max_non_base
    ):
        raise EvomergeError(
            f"merge method {method.name} takes {method.min_non_base} non-base models; got "
            f"{non_base} ({where})"
        )
    return base_index


def build_plan(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    sources: Optional[dict[str, ModelSource]] = None,
    search_dirs: Iterable = (),
    statistics_required: bool = True,
) -> MergePlan:
    """Check a recipe against its models and lay out every output tensor (a data-aware one
    opens its statistics, unless they are not made yet: `statistics_required` false)."""
    sources = dict(sources or {})
    out_dtype = _out_dtype(recipe)
    if recipe.merge_method == "dataflow":
        _open_sources(recipe, sources, allow_pickle, search_dirs)
        refs = _nested_sources(recipe, sources, allow_pickle, statistics_required)
        return build_dataflow_plan(recipe, refs, sources, out_dtype)
    method = get_method(recipe.merge_method)
    _check_parameter_settings(recipe, method)
    _open_sources(recipe, sources, allow_pickle, search_dirs)
    _check_compatible({ref: sources[ref] for ref in recipe.referenced_models()})

    slices = _normalize_slices(recipe, sources)
    layout = _Layout(recipe, method, sources, out_dtype)
    before, after = _outer_tensors(sources[slices[0].sources[0].model])
    layout.outer(before, slices[0], "embeddings")
    for si, out_slice in enumerate(slices):
        layout.layers(si, out_slice)
    layout.outer(after, slices[-1], "final norm/head")
    donor = recipe.base_model or slices[0].sources[0].model
    tokenizer = _tokenizer_source(recipe, donor, sources, allow_pickle, search_dirs)
    if recipe.lines is not None:
        _apply_lines(recipe, method, layout.ops, len(layout.layer_sources))
    plan = MergePlan(
        recipe,
        method,
        layout.ops,
        donor,
        tokenizer,
        layout.layer_sources if recipe.slices else None,
        sources,
    )
    if method.statistics and (statistics_required or recipe.statistics is not None):
        plan.statistics = _open_statistics(recipe, method, search_dirs)
    if method.learned and statistics_required:  # a run learns them before the first merge
        plan.statistics = _open_coefficients(recipe, method, search_dirs)
    return plan


def _out_dtype(recipe: Recipe) -> Optional[torch.dtype]:
    """The dtype every merged floating-point tensor is written in; None keeps each input's."""
    if recipe.dtype:
        parse_dtype(recipe.dtype, "dtype")
    named = recipe.out_dtype or recipe.dtype
    return parse_dtype(named, "out_dtype") if named else None


def _nested_sources(
    recipe: Recipe, sources: dict[str, ModelSource], allow_pickle: bool, statistics_required: bool
) -> dict[str, str]:
    """A dataflow recipe's model name -> source reference; a nested recipe (PS then DFS)
    becomes a source read tensor by tensor from its own plan."""
    refs: dict[str, str] = {}
    for name, model in (recipe.models or {}).items():
        if not isinstance(model, Recipe):
            refs[name] = model
            continue
        try:
            inner = build_plan(
                model,
                allow_pickle=allow_pickle,
                sources=sources,
                statistics_required=statistics_required,
            )
        except EvomergeError as exc:
            raise EvomergeError(f"models.{name} (nested recipe): {exc}") from None
        refs[name] = NESTED_REF.format(name=name)
        sources[refs[name]] = MergedSource(refs[name], inner)
    return refs


def _outer_tensors(source: ModelSource) -> tuple[list[str], list[str]]:
    """The tensors outside the layers, in order: before them (embeddings) and after them (the
    final norm, lm_head)."""
    before, after = [], []
    for name in source.index:
        if split_layer_name(name) is None:
            (after if POST_NAME.search(name) else before).append(name)
    return before, after


def _tokenizer_source(
    recipe: Recipe,
    donor: str,
    sources: dict[str, ModelSource],
    allow_pickle: bool,
    search_dirs: Iterable,
) -> str:
    """The model whose tokenizer the merge ships (opened if no input is that model)."""
    tokenizer = recipe.tokenizer_source
    if tokenizer in (None, "base"):
        return donor
    if tokenizer == "union":
        raise EvomergeError(
            "field 'tokenizer_source': 'union' is not supported; name one model or 'base'"
        )
    if tokenizer not in sources:
        sources[tokenizer] = ModelSource(
            tokenizer, allow_pickle=allow_pickle, search_dirs=search_dirs
        )
    return tokenizer


class _Layout:
    """The merge's output tensors, laid out one at a time in the checkpoint's order, each with
    its inputs checked and its parameters resolved for where it sits."""

    def __init__(
        self,
        recipe: Recipe,
        method: Method,
        sources: dict[str, ModelSource],
        out_dtype: Optional[torch.dtype],
    ) -> None:
        self.recipe, self.method, self.sources, self.out_dtype = recipe, method, sources, out_dtype
        self.ops: list[TensorOp] = []
        self.layer_sources: list[tuple[str, int]] = []  # (model, layer) each output layer is
        self._layer_tensors: dict[str, list[tuple[str, str]]] = {}

    def outer(self, names: list[str], out_slice: OutputSlice, where: str) -> None:
        """Tensors outside the layers, from the slice's models, parameters read at t = 0."""
        models = [s.model for s in out_slice.sources]
        base = out_slice.base_model or self.recipe.base_model
        for name in names:
            inputs = [(m, name) for m in models]
            self.tensor(name, inputs, _Scope(self.recipe, out_slice), base, 0.0, where)

    def layers(self, si: int, out_slice: OutputSlice) -> None:
        """One output slice's layers, each from the same offset in every source's range."""
        lengths = {src.layer_range[1] - src.layer_range[0] for src in out_slice.sources}
        if len(lengths) != 1:
            raise EvomergeError(f"slices.{si}: every source must span the same number of layers")
        n = lengths.pop()
        for src in out_slice.sources:
            depth = self.sources[src.model].num_layers
            if src.layer_range[1] > depth:
                raise EvomergeError(
                    f"slices.{si}: layer_range {list(src.layer_range)} is out of "
                    f"range for {src.model!r}, which has {depth} layers"
                )
        base = out_slice.base_model or self.recipe.base_model
        scope = _Scope(self.recipe, out_slice)
        lead = out_slice.sources[0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            out_index = len(self.layer_sources)
            lead_layer = lead.layer_range[0] + offset
            where = f"slices.{si} layer {out_index}" if self.recipe.slices else f"layer {out_index}"
            for prefix, rest in self._tensors_of(lead.model, lead_layer):
                inputs = [
                    (src.model, f"{prefix}{src.layer_range[0] + offset}.{rest}")
                    for src in out_slice.sources
                ]
                self.tensor(f"{prefix}{out_index}.{rest}", inputs, scope, base, t, where)
            self.layer_sources.append((lead.model, lead_layer))

    def _tensors_of(self, model: str, layer: int) -> list[tuple[str, str]]:
        key = f"{model}:{layer}"
        if key not in self._layer_tensors:
            self._layer_tensors[key] = _layer_tensors(self.sources[model], layer)
        return self._layer_tensors[key]

    def tensor(
        self,
        name: str,
        inputs: list[tuple[str, str]],
        scope: _Scope,
        base: Optional[str],
        t: float,
        where: str,
    ) -> None:
        """One output tensor: its inputs checked, then its parameters resolved (a tensor that
        is not floating point is copied from the base, or the first input)."""
        base_index = _check_inputs(self.method, [m for m, _ in inputs], base, where)
        first = self._input_headers(name, inputs)[base_index if base_index is not None else 0]
        if not first.dtype.is_floating_point:
            self.ops.append(
                TensorOp(name, inputs, base_index, {}, [], first.dtype, first.shape, True)
            )
            return
        shared = {
            p.name: _resolve(p, scope.settings(None), name, t, where)
            for p in self.method.shared_params()
        }
        per_input = [
            {
                p.name: _resolve(p, scope.settings(model), tensor, t, f"{where}, model {model}")
                for p in self.method.input_params()
            }
            for i, (model, tensor) in enumerate(inputs)
            if i != base_index
        ]
        dtype = self.out_dtype or first.dtype
        self.ops.append(TensorOp(name, inputs, base_index, shared, per_input, dtype, first.shape))

    def _input_headers(self, name: str, inputs: list[tuple[str, str]]) -> list[TensorInfo]:
        """Each input's header entry; a missing tensor or mismatched shapes end here."""
        headers = []
        for model, tensor in inputs:
            info = self.sources[model].index.get(tensor)
            if info is None:
                raise EvomergeError(
                    f"model {model!r} has no tensor {tensor!r} (needed for {name}); "
                    "are the architectures the same?"
                )
            headers.append(info)
        if len({i.shape for i in headers}) != 1:
            detail = ", ".join(f"{m}: {list(i.shape)}" for (m, _), i in zip(inputs, headers))
            raise EvomergeError(f"tensor {name} has mismatched shapes ({detail})")
        return headers


def _apply_lines(recipe: Recipe, method: Method, ops: list[TensorOp], layers: int) -> None:
    """Each op's LiNeS scale of its task vectors, from its output layer's depth."""
    if not method.task_vector:
        raise EvomergeError(
            f"field 'lines': a LiNeS schedule scales task vectors, and {method.name} merges "
            "none; use it with task_arithmetic, ties, dare_ties, dare_linear, della, "
            "breadcrumbs or pcb"
        )
    for op in ops:
        if op.copy_only or op.base_index is None:
            continue
        parts = split_layer_name(op.name)
        after = parts is None and POST_NAME.search(op.name) is not None
        op.scale = recipe.lines.scale(parts[1] if parts else None, layers, after)


def _open_statistics(recipe: Recipe, method: Method, search_dirs: Iterable) -> Statistics:
    """The calibration statistics a data-aware recipe names, checked for every input model."""
    if recipe.statistics is None:
        raise EvomergeError(
            f"field 'statistics': {method.name} weighs parameters by statistics of its models "
            "on calibration text; name their folder, or run `evomerge merge RECIPE OUT "
            "--calibration FILE` to compute them"
        )
    statistics = Statistics(_found(recipe.statistics, search_dirs, Path.is_dir))
    statistics.check(dict.fromkeys(_inputs(recipe)), method.statistics)
    return statistics


def _open_coefficients(recipe: Recipe, method: Method, search_dirs: Iterable) -> Coefficients:
    """The trained coefficient file a learned merge names, checked against its inputs."""
    if recipe.coefficients is None:
        raise EvomergeError(
            f"field 'coefficients': {method.name} merges with learned coefficients; name their "
            "file, or train one with `evomerge learn CONFIG --method dam|adamerging --out DIR`"
        )
    coefficients = Coefficients(_found(recipe.coefficients, search_dirs, Path.is_file))
    merged = [ref for ref in dict.fromkeys(_inputs(recipe)) if ref != recipe.base_model]
    coefficients.check(merged, method.name, recipe.base_model)
    return coefficients


def _found(named: str, search_dirs: Iterable, exists: Callable[[Path], bool]) -> Path:
    """A path a recipe names: as it is, or, when relative, in the first search folder (the
    recipe's own) that holds it."""
    path = Path(named)
    if not path.is_absolute():
        for where in search_dirs:
            if where is not None and exists(Path(where) / path):
                return Path(where) / path
    return path


def _inputs(recipe: Recipe) -> list[str]:
    """The models a recipe's merge reads, in recipe order (repeats kept)."""
    return [m.model for m in recipe.models or []] or [
        src.model for out in recipe.slices or [] for src in out.sources
    ]


def _layer_tensors(source: ModelSource, layer: int) -> list[tuple[str, str]]:
    found = []
    for name in source.index:
        parts = split_layer_name(name)
        if parts is not None and parts[1] == layer:
            found.append((parts[0], parts[2]))
    if not found:
        raise EvomergeError(f"model {source.ref!r} has no tensors for layer {layer}")
    return found


def _open_sources(
    recipe: Recipe, sources: dict[str, ModelSource], allow_pickle: bool, search_dirs: Iterable
) -> None:
    """Open (headers and configs only) every model the recipe reads that is not open yet."""
    for ref in recipe.referenced_models():
        if ref not in sources:
            sources[ref] = ModelSource(ref, allow_pickle=allow_pickle, search_dirs=search_dirs)


def _check_compatible(sources: dict[str, ModelSource]) -> None:
    """One architecture and one vocabulary: parameter-space merges add tensors element-wise."""
    seen: dict[str, str] = {}
    for ref, source in sources.items():
        seen[ref] = source.architecture
    if len(set(seen.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in seen.items())
        raise EvomergeError(f"models have different architectures ({detail})")
    vocab = {ref: s.vocab_size for ref, s in sources.items() if s.vocab_size is not None}
    if len(set(vocab.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in vocab.items())
        raise EvomergeError(
            f"models have different vocabularies (vocab_size {detail}); parameter-space merges "
            "need one tokenizer: merge only models that share it"
        )
