"""Mutations of valid input files, and the checks every mutant must pass: evomerge's front door
(run configs, search-space files, merge recipes) either accepts a file and works, or answers with
one clear error line and writes nothing. Shared by tests/test_fuzz.py and benchmarks/fuzz_inputs.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.errors import EvomergeError

MUTATIONS = (
    "delete",
    "wrong_type",
    "huge",
    "negative",
    "zero",
    "nan",
    "empty",
    "unicode",
    "unknown_key",
    "nested_unknown",
)
Path_ = tuple[Any, ...]


def paths(value: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every key/index path in a YAML-shaped value, parents before children."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


def mutate(data: Any, path: Path_, how: str) -> Any:
    """A deep copy of `data` with the value at `path` broken in the way `how` names."""
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    key = path[-1]
    value = target[key]
    if how == "delete":
        del target[key]
    elif how == "wrong_type":
        target[key] = {"x": [1, 2]} if not isinstance(value, dict) else 7
    elif how == "huge":
        target[key] = 10**30
    elif how == "negative":
        target[key] = -1
    elif how == "zero":
        target[key] = 0
    elif how == "nan":
        target[key] = float("nan")
    elif how == "empty":
        target[key] = [] if isinstance(value, list) else {} if isinstance(value, dict) else ""
    elif how == "unicode":
        target[key] = "λ\u202e☃"
    elif how == "unknown_key" and isinstance(target, dict):
        target["frobnicate"] = 1
    elif how == "nested_unknown" and isinstance(value, dict):
        value["frobnicate"] = 1
    return data


def single_mutations(data: Any) -> Iterator[tuple[str, Any]]:
    """Every path x every mutation, once: the exhaustive one-fault neighbourhood of a file."""
    for path in list(paths(data)):
        for how in MUTATIONS:
            yield f"{'.'.join(map(str, path))}:{how}", mutate(data, path, how)


class FuzzBug(Exception):
    """A mutant that evomerge neither accepted cleanly nor refused in one line."""


def require(condition: bool, problem: str) -> None:
    """An explicit check (not `assert`, which `python -O` removes)."""
    if not condition:
        raise FuzzBug(problem)


def require_one_line(exc: EvomergeError) -> None:
    message = str(exc)
    require(
        bool(message) and "\n" not in message and "Traceback" not in message,
        f"error is not one line: {message!r}",
    )


# ----- valid files to start from ----------------------------------------------------------------
def recipe_seeds(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Merge recipes over a base and two fine-tunes: mergekit YAML (per-model, per-layer and
    filtered parameters, slices, an interpolation method, a stochastic one) and evomerge's own
    data-flow recipes, plain and with a PS recipe nested in them."""
    base, a, b = (str(models[k]) for k in ("base", "ft0", "ft1"))
    return {
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                {
                    "model": b,
                    "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]},
                },
            ],
            "parameters": {"normalize": True},
            "dtype": "float16",
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.7}},
                {"model": b, "parameters": {"weight": 0.4, "density": 0.3}},
            ],
            "seed": 3,
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "slices": [
                {
                    "sources": [
                        {"model": a, "layer_range": [0, 2]},
                        {"model": b, "layer_range": [0, 2]},
                    ]
                }
            ],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
            "dtype": "bfloat16",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 1]}]},
                {"sources": [{"model": b, "layer_range": [1, 2]}]},
            ],
        },
        "dataflow": {  # evomerge's own format: a layer path with scales
            "merge_method": "dataflow",
            "embed_from": "a",
            "models": {"a": a, "b": b},
            "path": [
                {"model": "a", "layer": 0},
                {"model": "b", "layer": 1, "scale": 0.8},
                {"model": "a", "layer": 1, "scale": 1.25},
            ],
        },
        "ps_then_dfs": {  # a PS recipe nested as a data-flow source
            "merge_method": "dataflow",
            "embed_from": "merged",
            "models": {
                "merged": {
                    "merge_method": "dare_ties",
                    "base_model": base,
                    "models": [
                        {"model": a, "parameters": {"weight": 0.5, "density": 0.6}},
                        {"model": b, "parameters": {"weight": 0.5, "density": 0.6}},
                    ],
                    "seed": 5,
                },
                "b": b,
            },
            "path": [{"model": "merged", "layer": 0}, {"model": "b", "layer": 1, "scale": 1.5}],
        },
    }


def space_seeds(folder: Path) -> dict[str, dict[str, Any]]:
    """The ready search-space files (`folder`: the repository's search_spaces/)."""
    seeds = {}
    for file in sorted(Path(folder).glob("*.yaml")):
        seeds[file.stem] = yaml.safe_load(file.read_text())
        if seeds[file.stem].get("method") == "slerp":  # two models: the base and one expert
            seeds[file.stem]["models"] = ["a"]
    seeds["ps_fixed_models"] = {
        "kind": "parameter",
        "method": "della",
        "models": ["a", "b"],
        "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.2, "high": 0.9}},
        "fixed": {"epsilon": 0.05},
        "layer_groups": 2,
        "dtype": "bfloat16",
    }
    seeds["dfs_low_rank"] = {
        "kind": "dataflow",
        "models": ["a", "b"],
        "embed_from": "b",
        "repetitions": 1,
        "scaling": "low_rank",
        "rank": 1,
        "scale_bounds": [0.8, 1.25],
    }
    return seeds


# ----- the checks ---------------------------------------------------------------------------------
def check_run_config(config: dict[str, Any]) -> str:
    """'valid' when the config prepares, 'error' on one clear line; anything else is a bug."""
    from evomerge.config import RunConfig
    from evomerge.search.prepare import prepare

    try:
        prepare(RunConfig.from_dict(config))
    except EvomergeError as exc:
        require_one_line(exc)
        return "error"
    return "valid"


def check_search_space(
    space: Any, config: dict[str, Any], folder: Path, sources: dict[str, Any], seed: int = 0
) -> str:
    """A search-space file in a run config: refused in one line, or every genome it can produce
    (start, both corners, random points) decodes to a recipe whose merge plan builds."""
    from evomerge.config import RunConfig
    from evomerge.merge.engine import plan_for
    from evomerge.search.prepare import prepare

    file = folder / "space.yaml"
    file.write_text(yaml.safe_dump(space, sort_keys=False, allow_unicode=True))
    try:
        _, built = prepare(RunConfig.from_dict({**config, "search_space": str(file)}))
    except EvomergeError as exc:
        require_one_line(exc)
        return "error"
    low, high = built.bounds()
    rng = np.random.default_rng(seed)
    genomes = [built.initial(), low, high, *(rng.uniform(low, high) for _ in range(3))]
    for genome in genomes:
        recipe = built.decode(np.asarray(genome, dtype=float), seed=seed)
        plan_for(recipe, sources).close()
    return "valid"


def check_merge(recipe: Any, folder: Path) -> str:
    """`evomerge merge` on a recipe: a complete output folder and exit 0, or exit 2 with one
    `evomerge: error:` line and no output or staging folder left behind."""
    from safetensors.torch import load_file

    from evomerge.cli import main
    from evomerge.merge.io import read_safetensors_header

    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "recipe.yml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["merge", str(file), str(out), "--quiet"])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("evomerge: error:")]
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".out")]
    require(not leftovers, f"staging left behind: {leftovers}")
    if code == 2:
        require(len(lines) == 1 and not out.exists(), f"refusal is not one line: {err.getvalue()}")
        return "error"
    require(code == 0 and not lines, f"exit {code}: {err.getvalue()}")
    require((out / "config.json").is_file(), "output has no config.json")
    for shard in out.glob("*.safetensors"):
        read_safetensors_header(shard)  # evomerge's own checks of the header
        for name, tensor in load_file(shard).items():
            if tensor.is_floating_point():
                require(bool(tensor.isfinite().all()), f"{name}: merged weights are not finite")
    return "valid"
