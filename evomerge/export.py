"""Hand over what a run found: chosen evaluations re-made as ordinary Hugging Face folders.

Each folder is made by the streaming merge engine from the recipe that was scored (same
seeds), so its weights equal the ones the worker scored. Beside the weights: config, tokenizer,
our recipe YAML, a mergekit YAML where the merge has one, and a README model card with the
objective values and held-out scores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import yaml

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.engine import merge_to_disk
from evomerge.pareto import pareto_records
from evomerge.recipe import Recipe
from evomerge.store import Record, RunStore

log = logging.getLogger("evomerge")


def choose(
    store: RunStore,
    config: RunConfig,
    pareto: bool = False,
    best: Optional[str] = None,
    index: Optional[int] = None,
) -> list[Record]:
    records = [r for r in store.records() if not r.failed]
    if not records:
        raise EvomergeError(f"{store.folder}: no successful evaluation to export yet")
    if index is not None:
        found = [r for r in records if r.index == index]
        if not found:
            raise EvomergeError(f"--id {index}: no successful evaluation with that index")
        return found[:1]
    if best is not None:
        objective = next((o for o in config.objectives if o.name == best), None)
        if objective is None:
            names = ", ".join(o.name for o in config.objectives)
            raise EvomergeError(f"--best {best}: not an objective of this run ({names})")
        sign = 1 if objective.direction == "maximize" else -1
        return [max(records, key=lambda r: sign * r.values[best])]
    return pareto_records(store.records(), config.objectives)


def model_card(record: Record, config: RunConfig, run_folder: Path) -> str:
    recipe = yaml.safe_load(record.recipe)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        f"# evomerge evaluation {record.index}",
        "",
        f"Found by the evomerge run `{run_folder.name}` ({config.optimizer.name}, "
        f"budget {config.budget}, seed {config.seed}); merge method "
        f"`{recipe.get('merge_method')}`. The weights are re-made from the recipe that was "
        "scored (`evomerge_recipe.yaml`, seeds included).",
        "",
        "| objective | direction | value |",
        "|---|---|---|",
    ]
    for o in config.objectives:
        lines.append(f"| {o.name} | {o.direction} | {record.values[o.name]:.6g} |")
    if record.held_out:
        lines += [
            "",
            "Held-out scores (not seen by the search):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(record.held_out.items())]
    if config.trust_remote_code:
        lines += ["", "Note: the run loaded its models with trust_remote_code enabled."]
    lines += ["", "Source models:", ""]
    lines += [f"- {name}: `{ref}`" for name, ref in config.models.items()]
    return "\n".join(lines) + "\n"


def already_exported(out: Path, recipe: Recipe) -> bool:
    """A folder is published by one rename when complete, so one holding this very recipe is
    done; anything else at `out` is left to merge_to_disk to refuse."""
    try:
        return (out / "evomerge_recipe.yaml").read_text() == recipe.to_yaml()
    except OSError:
        return False


def export(
    run_folder: Path,
    to: Path,
    *,
    pareto: bool = False,
    best: Optional[str] = None,
    index: Optional[int] = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> list[Path]:
    store = RunStore.open(run_folder)
    config = RunConfig.load(run_folder / "run.yaml")
    chosen = choose(store, config, pareto=pareto, best=best, index=index)
    written = []
    for record in chosen:
        out = Path(to) / f"eval-{record.index:05d}"
        recipe = Recipe.from_yaml_text(record.recipe)
        if not force and already_exported(out, recipe):
            log.info("%s: already exported, kept", out)  # a re-run after an interruption
            written.append(out)
            continue
        merge_to_disk(
            recipe,
            out,
            device=device,
            force=force,
            allow_pickle=config.allow_pickle,
            progress=progress,
            extra_files={"README.md": model_card(record, config, Path(run_folder))},
        )
        written.append(out)
    return written
