"""Hand over what a run found: chosen evaluations re-made as ordinary Hugging Face folders.

Each folder is made by the streaming merge engine from the recipe that was scored (same
seeds), so its weights equal the ones the worker scored. Beside the weights: config, tokenizer,
our recipe YAML, a mergekit YAML where the merge has one, and a README model card in the
Hugging Face Hub's conventions (`base_model` listing the sources, `base_model_relation: merge`,
tags, the shared license) with the objective values and held-out scores. `push_to_hub` uploads
each folder as its own model repository.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import HfApi, ModelCard, get_token

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.learned import as_stored
from evomerge.recipe import Recipe
from evomerge.results.pareto import pareto_records
from evomerge.results.store import Record, RunStore

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
        full = [r for r in records if r.final] or records  # racing: measured on every document
        return [max(full, key=lambda r: sign * r.values[best])]
    return pareto_records(store.records(), config.objectives)


def hub_name(ref: str) -> str:
    """How the Hub names a source: its hub id, or a local folder's name."""
    return Path(ref).name if Path(ref).exists() else ref


def shared_license(refs: list[str]) -> Optional[str]:
    """The license every source's own model card declares, when they all declare the same."""
    licenses = set()
    for ref in refs:
        card = Path(ref) / "README.md"
        if not card.is_file():
            return None
        try:
            licenses.add(ModelCard.load(card).data.to_dict().get("license"))
        except Exception:  # an unreadable card: no license can be claimed
            return None
    return licenses.pop() if len(licenses) == 1 and None not in licenses else None


def card_metadata(config: RunConfig) -> dict[str, Any]:
    refs = list(dict.fromkeys(config.models.values()))
    data: dict[str, Any] = {
        "base_model": [hub_name(ref) for ref in refs],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "evomerge"],
    }
    license_ = shared_license(refs)
    if license_:
        data["license"] = license_
    return data


def model_card(record: Record, config: RunConfig, run_folder: Path) -> str:
    recipe = yaml.safe_load(record.recipe)
    lines = [
        "---",
        yaml.safe_dump(card_metadata(config), sort_keys=False).rstrip(),
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
    lines += [f"- {name}: `{hub_name(ref)}`" for name, ref in config.models.items()]
    lines += ["", "Recipe (`evomerge_recipe.yaml`):", "", "```yaml", record.recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def hub_repos(repo: str, records: list[Record]) -> dict[int, str]:
    """One Hub repository per exported model: ORG/NAME for a single one, else
    ORG/NAME-eval-NNNNN for each."""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise EvomergeError(f"--push-to-hub {repo}: give ORG/NAME")
    if len(records) == 1:
        return {records[0].index: repo}
    return {r.index: f"{repo}-eval-{r.index:05d}" for r in records}


def hub_api() -> Any:
    """An authenticated Hub client, or one line saying why there is none (checked before any
    model is merged: an upload that cannot happen must not cost the export first)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise EvomergeError("--push-to-hub: HF_HUB_OFFLINE is set; unset it to upload")
    token = get_token()
    if not token:
        raise EvomergeError(
            "--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN"
        )
    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as exc:  # no network, a bad token, a Hub outage: all end here
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise EvomergeError(f"--push-to-hub: cannot reach the Hub ({reason})") from None
    return api


def already_exported(out: Path, recipe: Recipe) -> bool:
    """A folder is published by one rename when complete, so one holding this very recipe is
    done; anything else at `out` is left to merge_to_disk to refuse."""
    try:
        return (out / "evomerge_recipe.yaml").read_text() == as_stored(recipe).to_yaml()
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
    push_to_hub: Optional[str] = None,
) -> list[Path]:
    store = RunStore.open(run_folder)
    config = RunConfig.load(run_folder / "run.yaml")
    chosen = choose(store, config, pareto=pareto, best=best, index=index)
    repos = hub_repos(push_to_hub, chosen) if push_to_hub else {}
    api = hub_api() if push_to_hub else None
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
    for record, out in zip(chosen, written):
        if api is not None:
            repo = repos[record.index]
            api.create_repo(repo, repo_type="model", exist_ok=True)
            api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model")
            log.info("%s: pushed to https://huggingface.co/%s", out, repo)
    return written
