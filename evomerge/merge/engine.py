"""Run a merge plan: streamed to a checkpoint folder, or written into a live model in place."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from evomerge.errors import EvomergeError
from evomerge.merge.io import ModelSource, ShardedWriter, copy_tokenizer
from evomerge.merge.layerwise import merge_layerwise
from evomerge.merge.learned import COEFFICIENTS, LOG, Coefficients, as_stored
from evomerge.merge.live import build_live_model, unwritten
from evomerge.merge.memory import keep_freed_memory
from evomerge.merge.ops import (
    CHUNK_BYTES,
    Fetch,
    MergePlan,
    TensorOp,
    fetch_inputs,
    merge_tensor,
    merge_whole,
    row_chunks,
)
from evomerge.merge.plan import build_plan
from evomerge.merge.stages import Stages
from evomerge.recipe import Recipe


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(
            f"--device {name}: CUDA is not available on this machine; use cpu or auto"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise EvomergeError(
            f"--device: unknown device {name!r}; use cpu, cuda, cuda:N or auto"
        ) from None


def merge_to_disk(
    recipe: Union[Recipe, Stages],
    out: Path,
    *,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    shard_bytes: int = 5 * 10**9,
    progress: bool = True,
    recipe_dir: Optional[Path] = None,
    extra_files: Optional[dict[str, str]] = None,
    chunk_bytes: Optional[int] = CHUNK_BYTES,
) -> Path:
    """Materialize a recipe (or a multi-stage file's output) as a Hugging Face folder; nothing
    lands at `out` unless it succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise EvomergeError(f"output folder {out} exists; choose another or pass --force")
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"output path {out} is a file, not a folder")
    dev = pick_device(device)
    keep_freed_memory()
    stages = recipe if isinstance(recipe, Stages) else None
    search_dirs = [recipe_dir] if recipe_dir else []
    if stages is not None:
        plan = stages.plan(allow_pickle=allow_pickle, search_dirs=search_dirs)
        recipe = stages.final
    else:
        plan = build_plan(recipe, allow_pickle=allow_pickle, search_dirs=search_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = scratch(out, "partial")
    remove_abandoned(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writer: Optional[ShardedWriter] = None
    try:
        writer = ShardedWriter(staging, plan.output_tensors(), shard_bytes)
        fetch = lambda model, name: plan.sources[model].get(name)  # noqa: E731
        if plan.method.layerwise:  # merged in a live model, then written out
            _merge_layerwise_to(writer, plan, dev)
        ops = [] if plan.method.layerwise else plan.ops
        bar = tqdm(ops, desc="merging", unit="tensor", disable=not progress)
        for op in bar:
            tensor = merge_whole(
                op,
                plan.method,
                fetch,
                dev,
                recipe.seed,
                inputs_are_private=True,
                chunk_bytes=chunk_bytes,
                statistics=plan.statistics,
            )
            writer.write(op.name, tensor)
            del tensor
        writer.finish()
        _write_metadata(plan, staging, stages)
        for name, text in (extra_files or {}).items():
            (staging / Path(name).name).write_text(text)  # names only: nothing lands outside
        _publish(staging, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        plan.close()
    return out


def _merge_layerwise_to(writer: ShardedWriter, plan: MergePlan, device: torch.device) -> None:
    """A layer-after-layer merge (RegMean++) made in a live model on `device`, then written."""
    model = build_live_model(plan.output_config(), device, torch.float32, False)
    tensors = {ref: _DiskTensors(source) for ref, source in plan.sources.items()}
    merge_into_model(plan, tensors, model, chunk_bytes=None)
    state = model.state_dict()
    for op in plan.ops:
        writer.write(op.name, state[op.name].to(op.out_dtype))


class _DiskTensors(Mapping):
    """A source's tensors, read from its checkpoint when asked for."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source.get(name)

    def __iter__(self):
        return iter(self.source.index)

    def __len__(self) -> int:
        return len(self.source.index)


SCRATCH_KINDS = ("partial", "old")  # a merge being written; a replaced folder being removed


def scratch(out: Path, kind: str, pid: Optional[int] = None) -> Path:
    """The hidden staging ("partial") or trash ("old") folder beside `out` of process `pid`
    (default: this one); remove_abandoned finds leftovers by the same name."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def remove_abandoned(out: Path) -> None:
    """Staging and trash folders of merges into `out` whose process is gone (killed mid-write)."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        pid = leftover.name.rpartition("-")[2]
        if not pid.isdigit() or leftover not in {scratch(out, k, int(pid)) for k in SCRATCH_KINDS}:
            continue
        remove_if_orphaned(leftover, int(pid))


def remove_if_orphaned(leftover: Path, pid: int) -> None:
    """Remove a folder that process `pid` was writing, if that process is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        shutil.rmtree(leftover, ignore_errors=True)
    except PermissionError:  # alive, someone else's
        pass


def _write_metadata(plan: MergePlan, folder: Path, stages: Optional[Stages] = None) -> None:
    (folder / "config.json").write_text(json.dumps(plan.output_config(), indent=2) + "\n")
    tokenizer_dir = plan.sources[plan.tokenizer_source].path
    copy_tokenizer(tokenizer_dir, folder)
    gen = tokenizer_dir / "generation_config.json"
    if gen.exists():
        shutil.copy2(gen, folder / gen.name)
    recipe = plan.recipe
    if isinstance(plan.statistics, Coefficients):  # the folder carries what it was merged from
        (folder / COEFFICIENTS).parent.mkdir()
        shutil.copy2(plan.statistics.path, folder / COEFFICIENTS)
        log = plan.statistics.path.with_name(LOG)
        if log.is_file():
            shutil.copy2(log, (folder / COEFFICIENTS).with_name(LOG))
        recipe = as_stored(recipe)
    if stages is not None and not stages.single:  # the whole chain: `merge` makes it again
        (folder / "evomerge_recipe.yaml").write_text(stages.to_yaml())
        mergekit = [*stages.named.values(), stages.final]
        if all(r.merge_method != "dataflow" for r in mergekit):
            (folder / "mergekit_config.yml").write_text(stages.to_mergekit_yaml())
        return
    (folder / "evomerge_recipe.yaml").write_text(recipe.to_yaml())
    if plan.recipe.merge_method != "dataflow" and not plan.method.learned:  # mergekit has neither
        (folder / "mergekit_config.yml").write_text(plan.recipe.to_mergekit_yaml())


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished folder into place; an old folder (with --force) is removed only after."""
    if out.exists():
        trash = scratch(out, "old")
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


# ----- in-memory path (workers) -------------------------------------------------------------------
def load_source_tensors(
    sources: Mapping[str, ModelSource],
    device: torch.device | str,
    dtype: Optional[torch.dtype] = None,
    pin: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every source, once, on `device` (optionally cast to `dtype`); `pin`:
    in page-locked host memory, so copies to a GPU can run while it computes."""
    loaded = {}
    for ref, source in sources.items():
        if not isinstance(source, ModelSource):
            continue  # nested recipes are merged from the loaded tensors when fetched
        tensors = {}
        for name in source.index:
            t = source.get(name)
            t = t.to(device=device, dtype=dtype if dtype and t.is_floating_point() else t.dtype)
            tensors[name] = t.pin_memory() if pin else t
        source.close()
        loaded[ref] = tensors
    return loaded


class Stager:
    """Brings the inputs of the next piece of a merge to its target's device while the current
    one is merged (sources held on the host): on a GPU the copies run on a side stream from
    pinned memory, so transfer and math overlap; inputs already on the target's device are used
    where they are."""

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.streams: dict[torch.device, Any] = {}

    def start(
        self, op: TensorOp, rows: Optional[slice], device: torch.device
    ) -> tuple[list[torch.Tensor], Any, bool]:
        """(inputs, the event their copy completes, whether they are private copies)."""
        raw = fetch_inputs(op, self.fetch, rows)
        if all(t.device == device for t in raw):
            return raw, None, False
        if device.type != "cuda":
            moved = [t.to(device) for t in raw]
            return moved, None, all(m is not r for m, r in zip(moved, raw))
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            moved = [t.to(device, non_blocking=True) for t in raw]
            private = all(m is not r for m, r in zip(moved, raw))  # none was there already
            return moved, stream.record_event(), private

    def take(self, staged: tuple[list[torch.Tensor], Any, bool]) -> list[torch.Tensor]:
        tensors, ready, _ = staged
        if ready is not None:
            current = torch.cuda.current_stream(tensors[0].device)
            current.wait_event(ready)
            for t in tensors:  # made on the side stream, used and freed on this one
                t.record_stream(current)
        return tensors


def merge_into_model(
    plan: MergePlan,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    model: torch.nn.Module,
    chunk_bytes: Optional[int] = CHUNK_BYTES,
) -> None:
    """Write every merged tensor of `plan` into `model`'s existing parameters, in place: large
    tensors in row chunks where the method allows, sources held on the host brought over piece
    by piece, the next piece's copy overlapping the current piece's math."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    missing = [op.name for op in plan.ops if op.name not in targets]
    if missing:
        raise EvomergeError(
            f"live model has no parameter {missing[0]!r}; is it the same architecture?"
        )
    left = unwritten(model, {op.name for op in plan.ops})
    if left:  # the live model is uninitialised: an unwritten tensor would be scored as garbage
        raise EvomergeError(
            f"the recipe writes no value for the live model's {left[0]!r} ({len(left)} "
            "tensor(s) unwritten): its sources lack that tensor; merge models whose "
            "checkpoints hold every tensor of their architecture"
        )
    for op in plan.ops:
        if tuple(targets[op.name].shape) != op.shape:
            raise EvomergeError(
                f"live model's {op.name} has shape {list(targets[op.name].shape)}, "
                f"the recipe gives {list(op.shape)}"
            )

    def fetch(model_ref: str, name: str) -> torch.Tensor:
        held = tensors.get(model_ref)
        if held is not None:
            return held[name]
        return plan.sources[model_ref].make(name, fetch, device)  # a nested recipe's tensor

    device = next(iter(targets.values())).device  # a nested recipe's tensors are made here
    if plan.method.layerwise:  # RegMean++: merged layer after layer in this very model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.sources[plan.tokenizer_source].path)
        merge_layerwise(plan, fetch, model, tokenizer)
        return
    pieces = [(op, rows) for op in plan.ops for rows in row_chunks(op, plan.method, chunk_bytes)]
    stager = Stager(fetch)
    keep_freed_memory()
    with torch.no_grad():
        staged = stager.start(*pieces[0], targets[pieces[0][0].name].device) if pieces else None
        for i, (op, rows) in enumerate(pieces):
            private = staged[2]
            raw = stager.take(staged)
            if i + 1 < len(pieces):
                after, after_rows = pieces[i + 1]
                staged = stager.start(after, after_rows, targets[after.name].device)
            target = targets[op.name]
            merged = merge_tensor(
                op,
                plan.method,
                fetch,
                target.device,
                plan.recipe.seed,
                inputs_are_private=private,
                rows=rows,
                raw=raw,
                statistics=plan.statistics,
            )
            (target if rows is None else target[rows]).copy_(merged)
            del merged, raw


def plan_for(
    recipe: Recipe, sources: Mapping[str, ModelSource], statistics_required: bool = True
) -> MergePlan:
    """Plan against already-open sources (workers keep them for the whole run)."""
    return build_plan(recipe, sources=dict(sources), statistics_required=statistics_required)
